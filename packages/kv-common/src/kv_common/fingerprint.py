"""The fingerprint of a cluster map: what two nodes compare before they replicate together.

Nodes started with different ``--cluster``, ``--partitions``, ``--vnodes`` or
``--replication-factor`` would place keys differently and number Raft nodes differently (a Raft
node id is 1 + the member's position in the sorted member ids), so replicating between them
would corrupt data quietly. Peers exchange this fingerprint when they connect and refuse each
other when it differs.

It covers exactly what routing depends on: the members (ids and addresses, sorted by id, so the
order a map was built in does not matter), the partition count, the vnodes per node and the
replication factor. It leaves out the epoch (a counter, not a routing input) and the request
limits (each node's own business). The encoding is fixed and versioned by ``FINGERPRINT_TAG``;
a golden value in the tests pins it, because nodes of different versions compare digests:

    FINGERPRINT_TAG
    u32be(member count), then per member sorted by id: u32be(len) id_utf8 u32be(len) addr_utf8
    u32be(partitions) u32be(vnodes) u32be(replication factor)

The digest is BLAKE2b-128 of that. The description is for the one line a mismatch logs, so that
an operator sees at a glance which setting differs.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from kv_common.cluster_map import ClusterMap

__all__ = ["FINGERPRINT_TAG", "MapFingerprint", "map_fingerprint"]

FINGERPRINT_TAG = b"kv/map-fingerprint/v1"
"""Versions the encoding: a change to what is covered must change this tag too."""

DIGEST_BYTES = 16
"""128 bits: collisions between two honestly different maps are out of the question."""

SHORT_DIGEST_CHARS = 12
"""Hex characters of the digest shown to people."""

MAX_DESCRIBED_MEMBERS = 8
"""Beyond this the description lists the first members and a count (the digest still
distinguishes); a log line with a hundred addresses helps nobody."""


@dataclass(frozen=True, slots=True)
class MapFingerprint:
    digest: bytes
    description: str

    @property
    def short(self) -> str:
        return self.digest.hex()[:SHORT_DIGEST_CHARS]


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _text(value: str) -> bytes:
    data = value.encode()
    return _u32(len(data)) + data


def map_fingerprint(cluster_map: ClusterMap) -> MapFingerprint:
    members = sorted((m.node_id, m.address) for m in cluster_map.members)
    parts = [FINGERPRINT_TAG, _u32(len(members))]
    for node_id, address in members:
        parts += [_text(node_id), _text(address)]
    parts += [
        _u32(cluster_map.partitions),
        _u32(cluster_map.vnodes),
        _u32(cluster_map.replication_factor),
    ]
    digest = hashlib.blake2b(b"".join(parts), digest_size=DIGEST_BYTES).digest()
    shown = [f"{node_id}@{address}" for node_id, address in members[:MAX_DESCRIBED_MEMBERS]]
    if len(members) > MAX_DESCRIBED_MEMBERS:
        shown.append(f"and {len(members) - MAX_DESCRIBED_MEMBERS} more")
    description = (
        f"{len(members)} members [{', '.join(shown)}], {cluster_map.partitions} partitions, "
        f"{cluster_map.vnodes} vnodes, RF {cluster_map.replication_factor} "
        f"(fingerprint {digest.hex()[:SHORT_DIGEST_CHARS]})"
    )
    return MapFingerprint(digest, description)
