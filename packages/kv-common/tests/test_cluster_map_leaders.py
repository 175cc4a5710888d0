"""Leaders in the cluster map are a hint that rides along: parsed, shown by ``locate``, and
never part of the map's identity (a new leader is not a new map)."""

from __future__ import annotations

import pytest

from kv.v1 import cluster_pb2
from kv_common.cluster_map import ClusterMap, ClusterMapError, Member

PARTITIONS = 8


def a_map(leaders: tuple[str, ...] = ()) -> ClusterMap:
    return ClusterMap.build(
        epoch=4,
        members=tuple(Member(f"n{i}", f"127.0.0.1:{7100 + i}") for i in (1, 2, 3)),
        partitions=PARTITIONS,
        replication_factor=3,
        vnodes=16,
        leaders=leaders,
    )


def test_leaders_travel_with_the_partitions_and_locate_names_them() -> None:
    leaders = tuple("n2" if p % 2 else "" for p in range(PARTITIONS))
    sent = a_map(leaders).to_proto(include_partitions=True)
    assert [rs.leader_id for rs in sent.partitions] == list(leaders)
    received = ClusterMap.from_proto(sent)
    assert received.leaders == leaders
    key = next(k for k in (b"k%d" % i for i in range(1000)) if received.locate(k).partition == 1)
    assert received.locate(key).leader == "n2"
    unknown = next(
        k for k in (b"k%d" % i for i in range(1000)) if received.locate(k).partition == 0
    )
    assert received.locate(unknown).leader is None


def test_a_change_of_leader_is_not_a_new_map() -> None:
    one = a_map(("n1",) * PARTITIONS)
    other = a_map(("n3",) * PARTITIONS)
    assert one == other == a_map()
    assert hash(one) == hash(other)


def test_maps_without_partitions_or_any_leader_carry_none() -> None:
    assert ClusterMap.from_proto(a_map().to_proto()).leaders == ()
    assert ClusterMap.from_proto(a_map().to_proto(include_partitions=True)).leaders == ()


def test_a_leader_list_that_does_not_match_the_partitions() -> None:
    with pytest.raises(ClusterMapError):
        a_map(("n1",))
    short = a_map().to_proto()
    short.partitions.append(cluster_pb2.ReplicaSet(node_ids=["n1"], leader_id="n1"))
    assert ClusterMap.from_proto(short).leaders == ()
