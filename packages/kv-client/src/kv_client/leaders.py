"""Where each replicated partition's leader is, as far as this client has learned (pure).

With replication, only a partition's leader serves it. The cluster map says which nodes hold a
partition, not which of them leads; the client learns that from the nodes themselves: a node
that does not lead a partition refuses an SDK request with ``NOT_LEADER`` and the leader it
knows of, and the next attempt goes straight there (Redis's MOVED, TiKV's region cache). Until
it learns one that way, a call goes to the leader named in the cluster map the client fetched
(each partition's leader as the answering node knew it), else to the key's first replica.

One table per client, shared by all its calls; entries belong to one map epoch and are dropped
with it. No I/O, no clock: the drivers call ``learned`` and ``unreachable`` with what happened.
"""

from __future__ import annotations

from kv_common.cluster_map import ClusterMap


class Leaders:
    def __init__(self) -> None:
        self._epoch: int | None = None
        self._by_partition: dict[int, str] = {}

    def _table(self, cluster_map: ClusterMap) -> dict[int, str]:
        if cluster_map.epoch != self._epoch:
            self._epoch = cluster_map.epoch
            self._by_partition = {}
        return self._by_partition

    def target(self, cluster_map: ClusterMap, key: bytes) -> str:
        """The node to send an operation on ``key`` to: its partition's leader as learned,
        else as the map names it, else the key's owner (first replica)."""
        if cluster_map.replication_factor < 2:
            return cluster_map.placement.owner_of_key(key)
        partition = cluster_map.placement.partition_of(key)
        leader = self._table(cluster_map).get(partition)
        if leader is not None:
            return leader
        replicas = cluster_map.placement.replicas(partition)
        hinted = cluster_map.leaders[partition] if cluster_map.leaders else ""
        return hinted if hinted in replicas else replicas[0]

    def learned(self, cluster_map: ClusterMap, key: bytes, leader: str) -> bool:
        """A node named ``leader`` as the leader of ``key``'s partition; False (and nothing
        learned) when that node is not one of the partition's replicas."""
        partition = cluster_map.placement.partition_of(key)
        if leader not in cluster_map.placement.replicas(partition):
            return False
        self._table(cluster_map)[partition] = leader
        return True

    def unreachable(self, cluster_map: ClusterMap, key: bytes, node_id: str) -> str:
        """``node_id`` could not serve ``key`` (unreachable, or no leader yet): forget it as
        leader, and name the next replica in ring order to try instead."""
        partition = cluster_map.placement.partition_of(key)
        table = self._table(cluster_map)
        if table.get(partition) == node_id:
            del table[partition]
        replicas = cluster_map.placement.replicas(partition)
        following = replicas[(replicas.index(node_id) + 1) % len(replicas)]
        table[partition] = following
        return following

    def known(self) -> int:
        """Partitions whose leader this client knows (for tests and stats)."""
        return len(self._by_partition)
