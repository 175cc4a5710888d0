"""What the two clients share about talking to nodes: options, metadata, bootstrap order."""

from __future__ import annotations

from collections.abc import Sequence

from kv.v1 import cluster_pb2
from kv_client.errors import InvalidArgumentError, KvError, UnavailableError
from kv_client.types import NodeStatus
from kv_common.cluster_map import ClusterMap
from kv_common.wire import EPOCH_METADATA

DEFAULT_TIMEOUT = 5.0
"""Seconds a call may take, retries included, unless the call says otherwise."""

MAP_FETCH_TIMEOUT = 2.0
"""Longest wait for one node's cluster map while bootstrapping or refreshing."""

KEEPALIVE_MS = 1000
"""While calls are in flight, the channel pings its node this often (gRPC's floor is 1 s)..."""
PING_TIMEOUT_MS = 500
"""...and a ping unanswered this long ends the connection: its calls fail UNAVAILABLE.

A paused or frozen node (SIGSTOP, a hung VM) accepts requests and never answers; without
this, every call sent to it waits out its whole deadline, and a caller that sends one call
at a time is stuck there while the other replicas elect a new leader. The ping is answered
by gRPC's own threads, so a node that is merely slow (a long fsync, a busy interpreter)
keeps its calls. The failed calls' node becomes suspect (``leaders``) and the next calls go
to another replica. Etcd's client does the same with its dial keepalive."""

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),  # a frozen node sends no data: keep pinging
    ("grpc.keepalive_permit_without_calls", 0),  # idle channels stay quiet
]

Metadata = Sequence[tuple[str, str]]


def seed_list(addresses: str | Sequence[str]) -> tuple[str, ...]:
    seeds = (addresses,) if isinstance(addresses, str) else tuple(addresses)
    seeds = tuple(a.strip() for s in seeds for a in s.split(",") if a.strip())
    if not seeds:
        raise InvalidArgumentError("give at least one node address (host:port)")
    return seeds


def bootstrap_order(seeds: tuple[str, ...], current: ClusterMap | None) -> list[str]:
    """Addresses to ask for a map: known members first, then the seeds."""
    known = [m.address for m in current.members] if current is not None else []
    return list(dict.fromkeys([*known, *seeds]))


def routed_metadata(
    cluster_map: ClusterMap, metadata: Metadata | None
) -> tuple[tuple[str, str], ...]:
    return (*(metadata or ()), (EPOCH_METADATA, str(cluster_map.epoch)))


def no_map_error(tried: list[str], errors: list[str]) -> KvError:
    detail = "; ".join(errors) if errors else "no address to try"
    return UnavailableError(f"no node answered with a cluster map (tried {len(tried)}): {detail}")


def node_status(response: cluster_pb2.GetNodeStatusResponse) -> NodeStatus:
    return NodeStatus(
        node_id=response.node_id,
        address=response.address,
        uptime_seconds=response.uptime_seconds,
        keys_stored=response.keys_stored,
        engine=response.engine,
        version=response.version,
        requests_served=response.requests_served,
        requests_forwarded=response.requests_forwarded,
        epoch=response.epoch,
    )
