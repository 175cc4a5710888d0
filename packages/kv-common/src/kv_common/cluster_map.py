"""The cluster map, and the routing table built from it, as both node and SDK see it.

Pure state with no I/O (aiokafka's ClusterMetadata habit): the clients fetch a
map over gRPC and hand it here; everything that decides where a key goes is
computed from the map with the shared placement rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kv.v1 import cluster_pb2
from kv_common.limits import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_OPS,
    DEFAULT_MAX_VALUE_BYTES,
    MAX_KEY_BYTES,
)
from kv_common.placement import Placement, PlacementError


@dataclass(frozen=True, slots=True)
class Location:
    """Where a key lives: its partition and the owning node (and, replicated, the leader the
    map's node last knew, when the map came with its partitions)."""

    key: bytes
    partition: int
    node_id: str
    address: str
    replicas: tuple[str, ...]
    leader: str | None = None


class ClusterMapError(ValueError):
    """A cluster map that cannot be routed by (inconsistent members or parameters)."""


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    address: str


@dataclass(frozen=True, slots=True)
class Limits:
    """A node's request limits, published in its cluster map."""

    max_key_bytes: int = MAX_KEY_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_batch_ops: int = DEFAULT_MAX_BATCH_OPS
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES

    @classmethod
    def from_proto(cls, message: cluster_pb2.Limits) -> Limits:
        """Zero fields (a node that does not publish limits) keep the defaults."""
        default = cls()
        return cls(
            max_key_bytes=message.max_key_bytes or default.max_key_bytes,
            max_value_bytes=message.max_value_bytes or default.max_value_bytes,
            max_batch_ops=message.max_batch_ops or default.max_batch_ops,
            max_batch_bytes=message.max_batch_bytes or default.max_batch_bytes,
        )

    def to_proto(self) -> cluster_pb2.Limits:
        return cluster_pb2.Limits(
            max_key_bytes=self.max_key_bytes,
            max_value_bytes=self.max_value_bytes,
            max_batch_ops=self.max_batch_ops,
            max_batch_bytes=self.max_batch_bytes,
        )


@dataclass(frozen=True)
class ClusterMap:
    """Members and placement parameters at one epoch.

    ``leaders`` (per partition, "" when unknown) is what the node that sent the map knew of
    its Raft leaders, present only in a map fetched with its partitions. It is a hint, not
    part of the map's identity: two maps of one epoch are equal whatever their leaders, so a
    change of leader never looks like a new map.
    """

    epoch: int
    members: tuple[Member, ...]
    partitions: int
    replication_factor: int
    vnodes: int
    placement: Placement = field(repr=False, compare=False)
    addresses: Mapping[str, str] = field(repr=False, compare=False)
    limits: Limits = field(default_factory=Limits, compare=False)
    leaders: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def build(
        cls,
        *,
        epoch: int,
        members: tuple[Member, ...],
        partitions: int,
        replication_factor: int,
        vnodes: int,
        limits: Limits | None = None,
        leaders: tuple[str, ...] = (),
    ) -> ClusterMap:
        addresses = {m.node_id: m.address for m in members}
        if len(addresses) != len(members):
            raise ClusterMapError("cluster map lists a member id twice")
        try:
            placement = Placement.build(
                addresses,
                partitions=partitions,
                replication_factor=replication_factor,
                vnodes=vnodes,
            )
        except PlacementError as exc:
            raise ClusterMapError(f"cluster map cannot be routed: {exc}") from exc
        if leaders and len(leaders) != partitions:
            raise ClusterMapError(f"{len(leaders)} leaders listed for {partitions} partitions")
        return cls(
            epoch=epoch,
            members=tuple(sorted(members, key=lambda m: m.node_id)),
            partitions=partitions,
            replication_factor=replication_factor,
            vnodes=vnodes,
            placement=placement,
            addresses=addresses,
            limits=limits or Limits(),
            leaders=leaders,
        )

    @classmethod
    def from_proto(cls, message: cluster_pb2.ClusterMap) -> ClusterMap:
        return cls.build(
            epoch=message.epoch,
            members=tuple(Member(m.id, m.address) for m in message.members),
            partitions=message.partition_count,
            replication_factor=message.replication_factor,
            vnodes=message.vnodes,
            limits=Limits.from_proto(message.limits),
            leaders=_leaders(message),
        )

    def to_proto(self, *, include_partitions: bool = False) -> cluster_pb2.ClusterMap:
        message = cluster_pb2.ClusterMap(
            epoch=self.epoch,
            members=[cluster_pb2.Member(id=m.node_id, address=m.address) for m in self.members],
            partition_count=self.partitions,
            replication_factor=self.replication_factor,
            vnodes=self.vnodes,
            limits=self.limits.to_proto(),
        )
        if include_partitions:
            leaders = self.leaders or ("",) * self.partitions
            message.partitions.extend(
                cluster_pb2.ReplicaSet(node_ids=self.placement.replicas(p), leader_id=leaders[p])
                for p in range(self.partitions)
            )
        return message

    def owner_of(self, key: bytes) -> tuple[str, str]:
        """The (node id, address) that owns ``key``."""
        node_id = self.placement.owner_of_key(key)
        return node_id, self.addresses[node_id]

    def address_of(self, node_id: str) -> str:
        return self.addresses[node_id]

    def locate(self, key: bytes) -> Location:
        partition = self.placement.partition_of(key)
        replicas = self.placement.replicas(partition)
        leader = self.leaders[partition] if self.leaders else ""
        owner = replicas[0]
        return Location(key, partition, owner, self.addresses[owner], replicas, leader or None)


def _leaders(message: cluster_pb2.ClusterMap) -> tuple[str, ...]:
    """The leader hints of a map sent with its partitions; none when no leader is known (a
    single copy, or a node just started) or when the list does not match the partitions."""
    leaders = tuple(replica_set.leader_id for replica_set in message.partitions)
    if len(leaders) != message.partition_count or not any(leaders):
        return ()
    return leaders
