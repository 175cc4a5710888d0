"""What ``kv cluster status`` and ``kv locate`` ask one node about replication.

The SDK's ``NodeStatus`` and its cached map carry what routing needs; an operator also wants
each node's own view of its Raft groups (leaders, partitions without one, followers behind)
and the leaders the map names. Those are fields of the same RPCs, read here from the raw
replies, one short-lived channel per node, so that the SDK stays the routing library it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from kv.v1 import cluster_pb2, cluster_pb2_grpc
from kv_common.cluster_map import ClusterMap


def node_status(address: str, timeout: float) -> cluster_pb2.GetNodeStatusResponse | None:
    """The node's status, or None when it does not answer within ``timeout``."""
    with grpc.insecure_channel(address) as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        try:
            return stub.GetNodeStatus(cluster_pb2.GetNodeStatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return None


def map_with_leaders(address: str, timeout: float) -> ClusterMap | None:
    """The node's map with every partition's replicas and the leader it knows; None when
    the node does not answer."""
    with grpc.insecure_channel(address) as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        try:
            reply = stub.GetClusterMap(
                cluster_pb2.GetClusterMapRequest(include_partitions=True), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return ClusterMap.from_proto(reply.cluster_map)


def leader_of(
    partition: int, addresses: Iterable[str], timeout: float
) -> tuple[str | None, str | None]:
    """The leader of ``partition`` as the first of ``addresses`` (its replicas, who host its
    group) that knows one sees it, and the address that said so; (None, None) if none does."""
    for address in addresses:
        seen = map_with_leaders(address, timeout)
        if seen is not None and seen.leaders and seen.leaders[partition]:
            return seen.leaders[partition], address
    return None, None


def without_quorum(cluster_map: ClusterMap, up: set[str]) -> int:
    """Partitions fewer than a majority of whose replicas are among the ``up`` nodes: they
    cannot elect a leader or commit a write until enough come back."""
    placement = cluster_map.placement
    count = 0
    for partition in range(cluster_map.partitions):
        replicas = placement.replicas(partition)
        live = sum(1 for node_id in replicas if node_id in up)
        if live <= len(replicas) // 2:
            count += 1
    return count
