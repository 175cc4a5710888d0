"""Placement: key -> partition -> replica set.

This is the one definition of the placement rule. The node and the SDK both import it, so it is
pure (no I/O, no clock, no randomness) and depends only on the standard library. Every hash is
fixed by the protocol and described in docs/placement.md; golden vectors in the tests pin it.

The rule:

* ``key_hash(key)`` is BLAKE2b of the key with an 8-byte digest, read as a big-endian unsigned
  64-bit integer.
* A key's partition is the top ``log2(P)`` bits of its hash, so partition ``p`` covers the hash
  range ``[p << (64 - log2 P), (p + 1) << (64 - log2 P))``.
* Each node owns ``V`` points on a 64-bit ring; point ``i`` of node ``n`` is the BLAKE2b-64 of
  ``VNODE_TAG || u32be(len(n_utf8)) || n_utf8 || u32be(i)``.
* Partition ``p`` sits on the ring at the start of its hash range. Its replica set is the first
  ``RF`` distinct nodes met walking clockwise from there: the first node point at or after the
  partition's point, wrapping past ``2**64 - 1`` to ``0``. Equal points (a 64-bit collision) are
  ordered by node id.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

__all__ = [
    "DEFAULT_PARTITIONS",
    "DEFAULT_REPLICATION_FACTOR",
    "DEFAULT_VNODES",
    "MAX_PARTITIONS",
    "VNODE_TAG",
    "Placement",
    "PlacementError",
    "key_hash",
    "partition_of",
]

HASH_BITS = 64
_HASH_BYTES = HASH_BITS // 8

# Chosen by measurement (docs/placement.md, "Defaults"): every partition is a Raft group on each
# of its replicas, and a 3-node cluster at RF 3 with 4096 of them could not finish electing their
# leaders on 2 loaded cores; 1024 elect in seconds. The price is balance: 4096 kept every 3..16
# node cluster within 1.25x of the mean at RF 1, 1024 within 1.48x (RF 3 balances better).
DEFAULT_PARTITIONS: int = 1024
DEFAULT_VNODES: int = 512
DEFAULT_REPLICATION_FACTOR = 1
"""The library's default only (a replica set cannot outnumber the nodes, and ``build`` refuses
more). Nodes keep three copies by default, capped at the member count: ``kv_node.config``."""

# A table of more than a million partitions is a configuration mistake (each partition becomes a
# Raft group); refusing it keeps a typo from hanging the node while it builds the table.
MAX_PARTITIONS: int = 1 << 20

# Namespace for ring-point inputs, so a hash derived later for another purpose can't collide.
VNODE_TAG: bytes = b"kv/vnode"


class PlacementError(ValueError):
    """Placement parameters that describe no valid cluster (bad P, RF, V or node ids)."""


def key_hash(key: bytes) -> int:
    """The protocol's stable 64-bit key hash (independent of PYTHONHASHSEED and platform)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=_HASH_BYTES).digest(), "big")


def _partition_bits(partitions: int) -> int:
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise PlacementError(f"partition count must be an int, got {partitions!r}")
    if partitions < 1 or partitions & (partitions - 1):
        raise PlacementError(f"partition count must be a power of two >= 1, got {partitions}")
    bits = partitions.bit_length() - 1
    if bits > HASH_BITS:
        raise PlacementError(f"partition count must be at most 2**{HASH_BITS}, got {partitions}")
    return bits


def partition_of(key: bytes, partitions: int) -> int:
    """The partition holding ``key``: the top log2(partitions) bits of ``key_hash(key)``."""
    return key_hash(key) >> (HASH_BITS - _partition_bits(partitions))


def _vnode_point(node_utf8: bytes, index: int) -> int:
    data = VNODE_TAG + len(node_utf8).to_bytes(4, "big") + node_utf8 + index.to_bytes(4, "big")
    return int.from_bytes(hashlib.blake2b(data, digest_size=_HASH_BYTES).digest(), "big")


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlacementError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise PlacementError(f"{name} must be >= {low}, got {value}")


def _normalize_node_ids(node_ids: Iterable[str]) -> tuple[str, ...]:
    if isinstance(node_ids, str | bytes):
        raise PlacementError("node_ids must be a collection of ids, not a single string")
    ids = tuple(node_ids)
    if not ids:
        raise PlacementError("a placement needs at least one node")
    for node_id in ids:
        if not isinstance(node_id, str):
            raise PlacementError(f"node ids must be str, got {node_id!r}")
        if not node_id:
            raise PlacementError("node ids must be non-empty")
    ordered = tuple(sorted(ids))
    for previous, current in pairwise(ordered):
        if previous == current:
            raise PlacementError(f"duplicate node id {current!r}")
    return ordered


def _encode_node_id(node_id: str) -> bytes:
    try:
        return node_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PlacementError(f"node id {node_id!r} is not encodable as UTF-8") from exc


def _build_table(
    node_ids: tuple[str, ...], partitions: int, replication_factor: int, vnodes: int
) -> tuple[tuple[str, ...], ...]:
    ring = sorted(
        (_vnode_point(_encode_node_id(node_id), i), node_id)
        for node_id in node_ids
        for i in range(vnodes)
    )
    ring_points = [point for point, _ in ring]
    ring_nodes = [node_id for _, node_id in ring]
    ring_size = len(ring)
    shift = HASH_BITS - _partition_bits(partitions)

    # Many partitions start their walk at the same ring point; walk once per distinct start.
    walks: dict[int, tuple[str, ...]] = {}
    table: list[tuple[str, ...]] = []
    for partition in range(partitions):
        start = bisect_left(ring_points, partition << shift)
        if start == ring_size:
            start = 0
        replicas = walks.get(start)
        if replicas is None:
            chosen: list[str] = []
            index = start
            while len(chosen) < replication_factor:
                node_id = ring_nodes[index]
                if node_id not in chosen:
                    chosen.append(node_id)
                index += 1
                if index == ring_size:
                    index = 0
            replicas = tuple(chosen)
            walks[start] = replicas
        table.append(replicas)
    return tuple(table)


@dataclass(frozen=True)
class Placement:
    """The replica set of every partition of one cluster map (members, P, RF, V).

    Immutable and computed once: a new membership is a new ``Placement``. Construct it with
    ``Placement.build``; constructing it directly also works and validates the same way.
    """

    node_ids: tuple[str, ...]
    partitions: int
    replication_factor: int
    vnodes: int
    _table: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        node_ids = _normalize_node_ids(self.node_ids)
        _partition_bits(self.partitions)
        if self.partitions > MAX_PARTITIONS:
            raise PlacementError(
                f"partition count must be at most {MAX_PARTITIONS}, got {self.partitions}"
            )
        _check_count("replication factor", self.replication_factor, 1)
        if self.replication_factor > len(node_ids):
            raise PlacementError(
                f"replication factor {self.replication_factor} exceeds the "
                f"{len(node_ids)} node(s) in the placement"
            )
        _check_count("vnodes", self.vnodes, 1)
        object.__setattr__(self, "node_ids", node_ids)
        table = _build_table(node_ids, self.partitions, self.replication_factor, self.vnodes)
        object.__setattr__(self, "_table", table)

    @classmethod
    def build(
        cls,
        node_ids: Iterable[str],
        *,
        partitions: int = DEFAULT_PARTITIONS,
        replication_factor: int = DEFAULT_REPLICATION_FACTOR,
        vnodes: int = DEFAULT_VNODES,
    ) -> Placement:
        """Validate the parameters and compute the whole table (ids are sorted; order is moot)."""
        return cls(
            node_ids=_normalize_node_ids(node_ids),
            partitions=partitions,
            replication_factor=replication_factor,
            vnodes=vnodes,
        )

    def _check_partition(self, partition: int) -> None:
        if isinstance(partition, bool) or not isinstance(partition, int):
            raise PlacementError(f"partition must be an int, got {partition!r}")
        if not 0 <= partition < self.partitions:
            raise PlacementError(f"partition {partition} is outside 0..{self.partitions - 1}")

    def replicas(self, partition: int) -> tuple[str, ...]:
        """The partition's replica set in ring order; the first is the owner."""
        self._check_partition(partition)
        return self._table[partition]

    def owner(self, partition: int) -> str:
        self._check_partition(partition)
        return self._table[partition][0]

    def partition_of(self, key: bytes) -> int:
        return key_hash(key) >> (HASH_BITS - (self.partitions.bit_length() - 1))

    def replicas_for_key(self, key: bytes) -> tuple[str, ...]:
        return self._table[self.partition_of(key)]

    def owner_of_key(self, key: bytes) -> str:
        if len(self.node_ids) == 1:  # every partition is on the one node: skip the hash
            return self.node_ids[0]
        return self._table[self.partition_of(key)][0]

    def partitions_by_node(self) -> dict[str, list[int]]:
        """Partitions each node replicates (any position), ascending; every member is a key."""
        result: dict[str, list[int]] = {node_id: [] for node_id in self.node_ids}
        for partition, replicas in enumerate(self._table):
            for node_id in replicas:
                result[node_id].append(partition)
        return result

    def owned_partitions(self, node_id: str) -> list[int]:
        """Partitions whose first replica is ``node_id``, ascending (empty for a non-member)."""
        return [p for p, replicas in enumerate(self._table) if replicas[0] == node_id]
