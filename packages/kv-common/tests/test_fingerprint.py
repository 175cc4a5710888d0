"""Tests for kv_common.fingerprint: equal for the same routing, different for any other."""

from __future__ import annotations

import hashlib
import struct

from hypothesis import given
from hypothesis import strategies as st

from kv_common.cluster_map import ClusterMap, Member
from kv_common.fingerprint import FINGERPRINT_TAG, MAX_DESCRIBED_MEMBERS, map_fingerprint

THREE = (
    Member("n1", "127.0.0.1:5001"),
    Member("n2", "127.0.0.1:5002"),
    Member("n3", "127.0.0.1:5003"),
)

# Pinned: nodes of different versions compare this digest, so an accidental change of the
# encoding must fail here. Change it only together with FINGERPRINT_TAG.
GOLDEN_DIGEST = "9a7eb03649f3cab06038de19e2c34aa6"


def build(
    members: tuple[Member, ...] = THREE,
    *,
    partitions: int = 64,
    replication_factor: int = 3,
    vnodes: int = 16,
    epoch: int = 1,
) -> ClusterMap:
    return ClusterMap.build(
        epoch=epoch,
        members=members,
        partitions=partitions,
        replication_factor=replication_factor,
        vnodes=vnodes,
    )


def test_golden_digest() -> None:
    assert map_fingerprint(build()).digest.hex() == GOLDEN_DIGEST


def test_digest_follows_the_documented_encoding() -> None:
    def text(value: str) -> bytes:
        return struct.pack(">I", len(value.encode())) + value.encode()

    encoded = FINGERPRINT_TAG + struct.pack(">I", 3)
    for member in THREE:
        encoded += text(member.node_id) + text(member.address)
    encoded += struct.pack(">III", 64, 16, 3)
    expected = hashlib.blake2b(encoded, digest_size=16).digest()
    assert map_fingerprint(build()).digest == expected


def test_description_names_everything_covered() -> None:
    fingerprint = map_fingerprint(build())
    assert fingerprint.description == (
        "3 members [n1@127.0.0.1:5001, n2@127.0.0.1:5002, n3@127.0.0.1:5003], "
        "64 partitions, 16 vnodes, RF 3 (fingerprint 9a7eb03649f3)"
    )
    assert fingerprint.short == GOLDEN_DIGEST[:12]


def test_description_of_a_large_cluster_stays_short() -> None:
    members = tuple(Member(f"n{i:02}", f"10.0.0.{i}:5000") for i in range(20))
    description = map_fingerprint(build(members)).description
    assert description.startswith("20 members [n00@10.0.0.0:5000,")
    assert f"and {20 - MAX_DESCRIBED_MEMBERS} more]" in description
    assert "n19" not in description


def test_epoch_and_limits_are_not_covered() -> None:
    assert map_fingerprint(build(epoch=1)) == map_fingerprint(build(epoch=7))


@given(st.permutations(THREE))
def test_member_order_does_not_matter(members: list[Member]) -> None:
    assert map_fingerprint(build(tuple(members))) == map_fingerprint(build())


def test_every_routing_input_changes_the_digest() -> None:
    variants = [
        build(),
        build(THREE[:2], replication_factor=2),
        build((*THREE[:2], Member("n3", "127.0.0.1:5004"))),
        build((*THREE[:2], Member("n4", "127.0.0.1:5003"))),
        build(partitions=128),
        build(vnodes=17),
        build(replication_factor=2),
    ]
    digests = {map_fingerprint(v).digest for v in variants}
    assert len(digests) == len(variants)


@given(st.text(alphabet="ab:", min_size=1, max_size=6), st.text(alphabet="ab:", max_size=6))
def test_length_prefixes_keep_fields_apart(node_id: str, address: str) -> None:
    # Moving characters from an id into its address must change the digest.
    other = Member("other", "10.0.0.9:5000")
    first = build((Member(node_id + "x", address), other), replication_factor=1)
    second = build((Member(node_id, "x" + address), other), replication_factor=1)
    assert map_fingerprint(first).digest != map_fingerprint(second).digest
