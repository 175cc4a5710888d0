"""Node configuration: one frozen dataclass, validated before anything starts.

Each field is one ``kv-node`` flag: its default, its help text and its parser live on the
field, and ``kv_node.main`` builds the argument parser from them, the cluster map publishes
the limits from them, and ``kv_node.testing`` overrides them by name. Adding a flag is one
field here.

Every problem is reported as one ``ConfigError`` line so that a misconfigured node refuses
to start with a clear message and exit code 2, never a traceback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from kv_common.cluster_map import ClusterMap, ClusterMapError, Limits, Member
from kv_common.limits import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_OPS,
    DEFAULT_MAX_VALUE_BYTES,
    MAX_KEY_BYTES,
)
from kv_common.placement import DEFAULT_PARTITIONS, DEFAULT_VNODES
from kv_node.replication.runtime import DEFAULT_COMPACT_AFTER, DEFAULT_KEEP_AFTER_COMPACT
from kv_node.store.lmdb_store import DEFAULT_MAP_SIZE

DEFAULT_FORWARD_TIMEOUT = 5.0
"""Seconds a forwarded request may take when the caller set no deadline."""

DEFAULT_DRAIN_SECONDS = 5.0
"""On SIGTERM, how long in-flight requests get to finish before they are cancelled."""

DEFAULT_MAX_IN_FLIGHT = 512
"""Requests a node works on at once; beyond it, new ones are refused at once as OVERLOADED.

Each request in flight holds its decoded message and a task; a bound keeps memory and
latency bounded under a flood, and a prompt refusal lets clients back off instead of
timing out in a queue."""

MAX_SECONDS = 24 * 3600.0
"""Longest timeout a flag accepts: beyond a day it is a typo, not a setting."""

GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC sizes messages with a signed 32-bit int; no request limit may need more."""

MESSAGE_FRAMING_BYTES = 64 * 1024
"""Room above the largest key, value or batch for field tags and lengths."""

MIN_LMDB_MAP_SIZE = 1 << 20
MAX_LMDB_MAP_SIZE = 1 << 46
"""LMDB needs a few pages to open at all, and cannot map more than the address space."""

MAX_VNODES = 4096
"""Ring points per node; the ring is built at start, so this bounds start-up time."""

DEFAULT_REPLICATION_FACTOR = 3
"""Three copies: any one node may die and every partition keeps a quorum."""
MAX_REPLICATION_FACTOR = 7
"""More copies than this is a typo: every write waits for a majority of them."""

DEFAULT_RAFT_TICK_MS = 100
MIN_RAFT_TICK_MS = 10
MAX_RAFT_TICK_MS = 10_000
"""A tick below 10 ms would spend the node on timers; above 10 s failover takes minutes."""

MIN_RAFT_COMPACT_AFTER = 10
MAX_RAFT_COMPACT_AFTER = 100_000_000
"""Below 10 entries nearly every write would compact; the ceiling only catches typos."""

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


def parse_path(text: str) -> Path:
    """A path flag; an empty one would silently mean the current directory."""
    if not text.strip():
        raise ValueError("empty path")
    return Path(text)


def flag(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] = str,
    name: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field that is also a command-line flag (``--field-name`` unless ``name``)."""
    return field(
        default=default,
        metadata={"help": help, "parse": parse, "name": name, "metavar": metavar},
    )


@dataclass(frozen=True)
class Flag:
    """What ``kv_node.main`` needs to add one field to the argument parser."""

    dest: str
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any]
    required: bool
    metavar: str | None


def _required() -> Any:
    return field(
        metadata={"help": "this node's id, unique in the cluster", "name": "--id", "metavar": "ID"}
    )


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node is started with. Construction validates; an instance is usable.

    ``listen`` and ``advertise`` are resolved in place (from each other and from this
    node's ``--cluster`` entry), and the cluster map is derived from the fields.
    """

    node_id: str = _required()
    # Every default below is a call to ``flag``: the flag's text lives on its field.
    cluster: str | None = flag(
        None,
        "every member as id=host:port,id=host:port (default: a cluster of this node only)",
        metavar="ID=HOST:PORT,...",
    )
    listen: str | None = flag(
        None, "host:port to bind (default: the advertised address)", metavar="HOST:PORT"
    )
    advertise: str | None = flag(
        None, "host:port others dial (default: this node's --cluster entry)", metavar="HOST:PORT"
    )
    data_dir: Path | None = flag(
        None, "where the store and the node identity live", parse=parse_path, metavar="DIR"
    )
    engine: str = flag("lmdb", "storage engine: lmdb (durable) or memory (volatile, for tests)")
    metrics_listen: str | None = flag(
        None, "host:port for Prometheus /metrics (default: off)", metavar="HOST:PORT"
    )
    max_value_bytes: int = flag(DEFAULT_MAX_VALUE_BYTES, "largest value accepted", parse=int)
    max_batch_ops: int = flag(DEFAULT_MAX_BATCH_OPS, "most operations in one Batch", parse=int)
    max_batch_bytes: int = flag(
        DEFAULT_MAX_BATCH_BYTES, "largest encoded Batch request in bytes", parse=int
    )
    partitions: int = flag(
        DEFAULT_PARTITIONS, "partition count; must be the same on every node", parse=int
    )
    vnodes: int = flag(
        DEFAULT_VNODES, "ring points per node; must be the same on every node", parse=int
    )
    forward_timeout: float = flag(
        DEFAULT_FORWARD_TIMEOUT,
        "seconds a forwarded request may take when the caller set no deadline",
        parse=float,
    )
    drain_seconds: float = flag(
        DEFAULT_DRAIN_SECONDS,
        "on SIGTERM, how long in-flight requests may take to finish",
        parse=float,
    )
    lmdb_map_size: int = flag(DEFAULT_MAP_SIZE, "LMDB size ceiling in bytes", parse=int)
    max_in_flight: int = flag(
        DEFAULT_MAX_IN_FLIGHT,
        "requests worked on at once; beyond it new requests are refused as OVERLOADED",
        parse=int,
    )
    replication_factor: int = flag(
        DEFAULT_REPLICATION_FACTOR,
        "copies of each partition, each copy set a Raft group; capped at the member count; "
        "1 keeps one copy and no Raft (and allows the memory engine); must be the same on "
        "every node",
        parse=int,
    )
    raft_tick_ms: int = flag(
        DEFAULT_RAFT_TICK_MS,
        "milliseconds per Raft tick (replication); elections take 10-20 ticks",
        parse=int,
    )
    raft_compact_after: int = flag(
        DEFAULT_COMPACT_AFTER,
        "log entries a Raft group keeps before it compacts; a replica further behind "
        "catches up by snapshot (lowered by tests that exercise that)",
        parse=int,
    )
    peer_via: str | None = flag(
        None,
        "dial these peers' Raft streams at another address (e.g. through a proxy), as "
        "id=host:port,...; clients and the cluster map keep the --cluster addresses",
        metavar="ID=HOST:PORT,...",
    )
    cluster_map: ClusterMap = field(init=False, repr=False, compare=False)
    peer_dial: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        members = parse_cluster(self.cluster) if self.cluster is not None else ()
        listed = {m.node_id: m.address for m in members}
        if members and self.node_id not in listed:
            raise ConfigError(f"node id {self.node_id!r} is not in the cluster list")
        advertise = self.advertise or listed.get(self.node_id) or self.listen
        if advertise is None:
            raise ConfigError("give --listen, or --cluster with this node's address in it")
        parse_address(advertise, what="advertised address")
        if members and listed[self.node_id] != advertise:
            raise ConfigError(
                f"the cluster list gives {self.node_id!r} address {listed[self.node_id]!r} "
                f"but it advertises {advertise!r}"
            )
        listen = self.listen or advertise
        parse_address(listen, what="listen address")
        if self.metrics_listen is not None:
            parse_address(self.metrics_listen, what="metrics address")
        self._check_ranges()
        if self.engine == "lmdb" and self.data_dir is None:
            raise ConfigError("the lmdb engine needs --data-dir (or use --engine memory)")
        try:
            cluster_map = ClusterMap.build(
                epoch=STATIC_EPOCH,
                members=members or (Member(self.node_id, advertise),),
                partitions=self.partitions,
                replication_factor=min(self.replication_factor, len(members) or 1),
                vnodes=self.vnodes,
                limits=self.limits,
            )
        except ClusterMapError as exc:
            raise ConfigError(str(exc)) from exc
        peer_dial: dict[str, str] = {}
        for member in parse_cluster(self.peer_via) if self.peer_via else ():
            if member.node_id not in listed or member.node_id == self.node_id:
                raise ConfigError(f"--peer-via names {member.node_id!r}, which is not a peer")
            peer_dial[member.node_id] = member.address
        if cluster_map.replication_factor > 1 and self.engine != "lmdb":
            raise ConfigError(
                f"--replication-factor {cluster_map.replication_factor} needs the lmdb engine "
                "(the memory engine keeps one copy: give --replication-factor 1)"
            )
        object.__setattr__(self, "peer_dial", peer_dial)
        object.__setattr__(self, "listen", listen)
        object.__setattr__(self, "advertise", advertise)
        object.__setattr__(self, "cluster_map", cluster_map)

    def _check_ranges(self) -> None:
        ceiling = GRPC_MAX_MESSAGE_BYTES - MESSAGE_FRAMING_BYTES - MAX_KEY_BYTES
        for name, value, low, high in (
            ("--max-value-bytes", self.max_value_bytes, 1, ceiling),
            ("--max-batch-ops", self.max_batch_ops, 1, ceiling),
            ("--max-batch-bytes", self.max_batch_bytes, 1, ceiling),
            ("--vnodes", self.vnodes, 1, MAX_VNODES),
            ("--lmdb-map-size", self.lmdb_map_size, MIN_LMDB_MAP_SIZE, MAX_LMDB_MAP_SIZE),
            ("--max-in-flight", self.max_in_flight, 1, 1_000_000),
            ("--replication-factor", self.replication_factor, 1, MAX_REPLICATION_FACTOR),
            ("--raft-tick-ms", self.raft_tick_ms, MIN_RAFT_TICK_MS, MAX_RAFT_TICK_MS),
            (
                "--raft-compact-after",
                self.raft_compact_after,
                MIN_RAFT_COMPACT_AFTER,
                MAX_RAFT_COMPACT_AFTER,
            ),
        ):
            if not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        for name, seconds, positive in (
            ("--forward-timeout", self.forward_timeout, True),
            ("--drain-seconds", self.drain_seconds, False),
        ):
            in_range = seconds > 0 if positive else seconds >= 0
            if not (math.isfinite(seconds) and in_range and seconds <= MAX_SECONDS):
                floor = "more than 0" if positive else "at least 0"
                raise ConfigError(
                    f"{name} must be {floor} and at most {MAX_SECONDS:g} seconds, got {seconds}"
                )

    @property
    def replicated(self) -> bool:
        """Whether partitions are Raft groups (an effective replication factor above 1)."""
        return self.cluster_map.replication_factor > 1

    @property
    def raft_keep_after_compact(self) -> int:
        """Applied entries a compaction keeps: the runtime's default, or half of a lower
        ``--raft-compact-after`` (it must stay below it)."""
        return min(DEFAULT_KEEP_AFTER_COMPACT, self.raft_compact_after // 2)

    @property
    def max_key_bytes(self) -> int:
        return MAX_KEY_BYTES

    @property
    def limits(self) -> Limits:
        """The request limits this node enforces and publishes in its cluster map."""
        return Limits(
            max_key_bytes=self.max_key_bytes,
            max_value_bytes=self.max_value_bytes,
            max_batch_ops=self.max_batch_ops,
            max_batch_bytes=self.max_batch_bytes,
        )

    @property
    def max_message_bytes(self) -> int:
        """gRPC message ceiling: room for the largest single write or batch, plus framing."""
        single = self.max_key_bytes + self.max_value_bytes
        return max(single, self.max_batch_bytes) + MESSAGE_FRAMING_BYTES


def _flag_name(item: Field[Any]) -> str:
    name: str | None = item.metadata.get("name")
    return name or "--" + item.name.replace("_", "-")


def config_flags() -> list[Flag]:
    """The command-line flags, one per configurable field of ``NodeConfig``."""
    flags = []
    for item in fields(NodeConfig):
        if not item.init:
            continue
        required = item.default is MISSING
        flags.append(
            Flag(
                dest=item.name,
                name=_flag_name(item),
                default=None if required else item.default,
                help=item.metadata["help"],
                parse=item.metadata.get("parse", str),
                required=required,
                metavar=item.metadata.get("metavar"),
            )
        )
    return flags
