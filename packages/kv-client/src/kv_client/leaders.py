"""Where each replicated partition's leader is, as far as this client has learned (pure).

With replication, only a partition's leader serves it. The cluster map says which nodes hold a
partition, not which of them leads; the client learns that from the nodes themselves: a node
that does not lead a partition refuses an SDK request with ``NOT_LEADER`` and the leader it
knows of, and the next attempt goes straight there (Redis's MOVED, TiKV's region cache). Until
it learns one that way, a call goes to the leader named in the cluster map the client fetched
(each partition's leader as the answering node knew it), else to the key's first replica.

One table per client, shared by all its calls; entries belong to one map epoch and are dropped
with it. No I/O, no clock: the drivers call ``learned`` and ``unreachable`` with what happened.

The table also remembers which nodes are *suspect*: one that refused a connection, or left an
attempt unanswered past the policy's patience (a paused or cut-off leader accepts requests and
never answers). For ``SUSPECT_SECONDS`` after the last such sign, or until the node answers
again, calls go to another replica rather than to it, and a NOT_LEADER hint naming it is not
followed (its followers keep naming it until they notice it is gone): so one stuck node does
not hold every call of its partitions until their deadlines while the others elect a successor.
"""

from __future__ import annotations

from kv_common.cluster_map import ClusterMap

SUSPECT_SECONDS = 1.0
"""How long a node stays suspect after the last sign that it is not answering: about an
election timeout, after which its partitions have a new leader that the other replicas name.
A node still down is suspected again at its next refused connect or unanswered attempt."""


class Leaders:
    def __init__(self) -> None:
        self._epoch: int | None = None
        self._by_partition: dict[int, str] = {}
        self._suspect_until: dict[str, float] = {}

    def suspect(self, node_id: str, now: float) -> None:
        """``node_id`` did not answer (a refused connect, an attempt past its patience)."""
        self._suspect_until[node_id] = now + SUSPECT_SECONDS

    def answered(self, node_id: str) -> None:
        """``node_id`` answered a call (a reply or its own refusal): it is not stuck."""
        if self._suspect_until:
            self._suspect_until.pop(node_id, None)

    def is_suspect(self, node_id: str, now: float) -> bool:
        until = self._suspect_until.get(node_id)
        if until is None:
            return False
        if until <= now:
            del self._suspect_until[node_id]
            return False
        return True

    def _table(self, cluster_map: ClusterMap) -> dict[int, str]:
        if cluster_map.epoch != self._epoch:
            self._epoch = cluster_map.epoch
            self._by_partition = {}
        return self._by_partition

    def target(self, cluster_map: ClusterMap, key: bytes, *, now: float) -> str:
        """The node to send an operation on ``key`` to: its partition's leader as learned,
        else as the map names it, else the key's owner (first replica); when that node is
        suspect, the next replica in ring order that is not (the suspect one if all are)."""
        if cluster_map.replication_factor < 2:
            return cluster_map.placement.owner_of_key(key)
        partition = cluster_map.placement.partition_of(key)
        replicas = cluster_map.placement.replicas(partition)
        leader = self._table(cluster_map).get(partition)
        if leader is None:
            hinted = cluster_map.leaders[partition] if cluster_map.leaders else ""
            leader = hinted if hinted in replicas else None
        chosen = leader if leader is not None else replicas[0]
        if self._suspect_until and self.is_suspect(chosen, now):
            start = replicas.index(chosen)
            for step in range(1, len(replicas)):
                candidate = replicas[(start + step) % len(replicas)]
                if not self.is_suspect(candidate, now):
                    return candidate
        return chosen

    def learned(self, cluster_map: ClusterMap, key: bytes, leader: str, *, now: float) -> bool:
        """A node named ``leader`` as the leader of ``key``'s partition; False (and nothing
        learned) when that node is not one of the partition's replicas, or is suspect."""
        partition = cluster_map.placement.partition_of(key)
        if leader not in cluster_map.placement.replicas(partition):
            return False
        if self._suspect_until and self.is_suspect(leader, now):
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
