"""The cluster map as the SDK sees it, and the routing table built from it.

Pure state with no I/O (aiokafka's ClusterMetadata habit): the clients fetch a
map over gRPC and hand it here; everything that decides where a key goes is
computed from the map with the shared placement rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kv.v1 import cluster_pb2
from kv_client.placement import Placement, PlacementError
from kv_client.types import Location


class ClusterMapError(ValueError):
    """A cluster map that cannot be routed by (inconsistent members or parameters)."""


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    address: str


@dataclass(frozen=True)
class ClusterMap:
    """Members and placement parameters at one epoch."""

    epoch: int
    members: tuple[Member, ...]
    partitions: int
    replication_factor: int
    vnodes: int
    placement: Placement = field(repr=False, compare=False)
    addresses: Mapping[str, str] = field(repr=False, compare=False)

    @classmethod
    def build(
        cls,
        *,
        epoch: int,
        members: tuple[Member, ...],
        partitions: int,
        replication_factor: int,
        vnodes: int,
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
        return cls(
            epoch=epoch,
            members=tuple(sorted(members, key=lambda m: m.node_id)),
            partitions=partitions,
            replication_factor=replication_factor,
            vnodes=vnodes,
            placement=placement,
            addresses=addresses,
        )

    @classmethod
    def from_proto(cls, message: cluster_pb2.ClusterMap) -> ClusterMap:
        return cls.build(
            epoch=message.epoch,
            members=tuple(Member(m.id, m.address) for m in message.members),
            partitions=message.partition_count,
            replication_factor=message.replication_factor,
            vnodes=message.vnodes,
        )

    def to_proto(self, *, include_partitions: bool = False) -> cluster_pb2.ClusterMap:
        message = cluster_pb2.ClusterMap(
            epoch=self.epoch,
            members=[cluster_pb2.Member(id=m.node_id, address=m.address) for m in self.members],
            partition_count=self.partitions,
            replication_factor=self.replication_factor,
            vnodes=self.vnodes,
        )
        if include_partitions:
            message.partitions.extend(
                cluster_pb2.ReplicaSet(node_ids=self.placement.replicas(p))
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
        return Location(key, partition, replicas[0], self.addresses[replicas[0]], replicas)
