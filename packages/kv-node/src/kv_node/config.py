"""Node configuration: parsed and validated before anything starts.

Every problem is reported as one ``ConfigError`` line so that a misconfigured
node refuses to start with a clear message and a non-zero exit, never a trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kv_common.cluster_map import ClusterMap, ClusterMapError, Limits, Member
from kv_common.limits import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_OPS,
    DEFAULT_MAX_VALUE_BYTES,
    MAX_KEY_BYTES,
)
from kv_node.store.lmdb_store import DEFAULT_MAP_SIZE

DEFAULT_FORWARD_TIMEOUT = 5.0
"""Seconds a forwarded request may take when the caller set no deadline."""

DEFAULT_DRAIN_SECONDS = 5.0
"""On SIGTERM, how long in-flight requests get to finish before they are cancelled."""

STATIC_EPOCH = 1
"""Membership is fixed at start in this version, so the map has a single epoch."""

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A configuration the node refuses to start with."""


def parse_address(text: str, *, what: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) and check the port."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{what} {text!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"{what} {text!r} has port {port}, outside 1..65535")
    return host.strip("[]"), port


def check_node_id(node_id: str) -> str:
    if not _NODE_ID.match(node_id):
        raise ConfigError(
            f"node id {node_id!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return node_id


def parse_cluster(text: str) -> tuple[Member, ...]:
    """Parse ``id=host:port,id=host:port`` into members, rejecting duplicates."""
    members: list[Member] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        node_id, sep, address = item.partition("=")
        if not sep:
            raise ConfigError(f"cluster entry {item!r} is not id=host:port")
        check_node_id(node_id.strip())
        parse_address(address, what=f"cluster entry {item!r}: address")
        members.append(Member(node_id.strip(), address.strip()))
    if not members:
        raise ConfigError("the cluster list is empty")
    ids = [m.node_id for m in members]
    addresses = [m.address for m in members]
    for label, values in (("node id", ids), ("address", addresses)):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ConfigError(f"the cluster list names {label} {duplicates[0]!r} twice")
    return tuple(members)


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    listen: str
    advertise: str
    cluster: ClusterMap
    engine: str = "lmdb"
    data_dir: Path | None = None
    metrics_listen: str | None = None
    max_key_bytes: int = MAX_KEY_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_batch_ops: int = DEFAULT_MAX_BATCH_OPS
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    forward_timeout: float = DEFAULT_FORWARD_TIMEOUT
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    lmdb_map_size: int = DEFAULT_MAP_SIZE

    @property
    def max_message_bytes(self) -> int:
        """gRPC message ceiling: room for the largest single write or batch, plus framing."""
        single = self.max_key_bytes + self.max_value_bytes
        return max(single, self.max_batch_bytes) + 64 * 1024


def build_config(
    *,
    node_id: str,
    listen: str | None,
    advertise: str | None,
    cluster: str | None,
    engine: str,
    data_dir: Path | None,
    metrics_listen: str | None,
    max_value_bytes: int,
    max_batch_ops: int,
    max_batch_bytes: int,
    partitions: int,
    vnodes: int,
    forward_timeout: float,
    drain_seconds: float,
    lmdb_map_size: int,
) -> NodeConfig:
    """Check every flag together and produce the node's configuration."""
    check_node_id(node_id)
    members = parse_cluster(cluster) if cluster else ()
    listed = {m.node_id: m.address for m in members}
    if members and node_id not in listed:
        raise ConfigError(f"node id {node_id!r} is not in the cluster list")
    advertise = advertise or listed.get(node_id) or listen
    if advertise is None:
        raise ConfigError("give --listen, or --cluster with this node's address in it")
    parse_address(advertise, what="advertised address")
    if members and listed[node_id] != advertise:
        raise ConfigError(
            f"the cluster list gives {node_id!r} address {listed[node_id]!r} "
            f"but it advertises {advertise!r}"
        )
    listen = listen or advertise
    parse_address(listen, what="listen address")
    if metrics_listen is not None:
        parse_address(metrics_listen, what="metrics address")
    if not members:
        members = (Member(node_id, advertise),)
    for name, value in (
        ("--max-value-bytes", max_value_bytes),
        ("--max-batch-ops", max_batch_ops),
        ("--max-batch-bytes", max_batch_bytes),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if forward_timeout <= 0:
        raise ConfigError(f"--forward-timeout must be positive, got {forward_timeout}")
    if engine == "lmdb" and data_dir is None:
        raise ConfigError("the lmdb engine needs --data-dir (or use --engine memory)")
    try:
        cluster_map = ClusterMap.build(
            epoch=STATIC_EPOCH,
            members=members,
            partitions=partitions,
            replication_factor=1,
            vnodes=vnodes,
            limits=Limits(
                max_key_bytes=MAX_KEY_BYTES,
                max_value_bytes=max_value_bytes,
                max_batch_ops=max_batch_ops,
                max_batch_bytes=max_batch_bytes,
            ),
        )
    except ClusterMapError as exc:
        raise ConfigError(str(exc)) from exc
    return NodeConfig(
        node_id=node_id,
        listen=listen,
        advertise=advertise,
        cluster=cluster_map,
        engine=engine,
        data_dir=data_dir,
        metrics_listen=metrics_listen,
        max_value_bytes=max_value_bytes,
        max_batch_ops=max_batch_ops,
        max_batch_bytes=max_batch_bytes,
        forward_timeout=forward_timeout,
        drain_seconds=drain_seconds,
        lmdb_map_size=lmdb_map_size,
    )
