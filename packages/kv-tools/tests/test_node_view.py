"""``kv cluster status`` counts partitions without a quorum from the placement alone."""

from __future__ import annotations

from kv_common.cluster_map import ClusterMap, Member
from kv_tools.node_view import without_quorum

PARTITIONS = 64


def five_nodes(replication_factor: int) -> ClusterMap:
    return ClusterMap.build(
        epoch=1,
        members=tuple(Member(f"n{i}", f"127.0.0.1:{7100 + i}") for i in range(1, 6)),
        partitions=PARTITIONS,
        replication_factor=replication_factor,
        vnodes=16,
    )


def test_a_partition_needs_a_majority_of_its_replicas_up() -> None:
    cluster_map = five_nodes(3)
    everyone = {m.node_id for m in cluster_map.members}
    assert without_quorum(cluster_map, everyone) == 0
    # One node down: every partition keeps two of three.
    assert without_quorum(cluster_map, everyone - {"n1"}) == 0
    # Two down: exactly the partitions that had both of them among their replicas.
    down = {"n1", "n2"}
    expected = sum(
        1 for p in range(PARTITIONS) if len(down & set(cluster_map.placement.replicas(p))) >= 2
    )
    assert 0 < expected < PARTITIONS
    assert without_quorum(cluster_map, everyone - down) == expected
    assert without_quorum(cluster_map, set()) == PARTITIONS
