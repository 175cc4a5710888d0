"""The data directory of a local cluster: where ``kv cluster up`` and the other commands agree.

``kv cluster up`` (the supervisor) and ``kv cluster stop|kill|start|restart|status`` run in
different terminals; they share nothing but this directory:

- ``cluster.json``: node ids, addresses and engine, written on first start so that every later
  start brings back the same nodes on the same addresses.
- ``state.json``: written only by the running supervisor (atomically, by rename): its own
  process and, per node, whether it is up, its process, its last exit code, its log.
- ``control/start-<id>``: a request from another terminal to the supervisor to start a node
  (only the supervisor starts nodes, so that every node is its child and its exit is seen).
- ``up.lock``: held (flock) by the running supervisor, so that only one runs per directory.
- ``<id>/`` and ``<id>.log``: each node's data directory and log.

A process is named by its pid *and* its start time (from /proc), so a pid left in state.json
by a supervisor that died, and since reused by an unrelated process, is never signalled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAYOUT_FILE = "cluster.json"
STATE_FILE = "state.json"
CONTROL_DIR = "control"
START_REQUEST = "start-"

OLD_DEFAULT_PARTITIONS = 4096
"""The node's default partition count before three copies became the default."""

UP = "up"
STARTING = "starting"
DOWN = "down"


class LocalClusterError(Exception):
    """A local cluster command that cannot do what was asked (one line for the user)."""


@dataclass(frozen=True)
class LocalNode:
    node_id: str
    address: str
    metrics: str


@dataclass(frozen=True)
class Layout:
    engine: str
    nodes: list[LocalNode]
    replication_factor: int = 1
    """Every node's ``--replication-factor``. Recorded, because a cluster must come back with
    the one it was created with; a layout written before the field existed ran with 1."""
    partitions: int = OLD_DEFAULT_PARTITIONS
    """Every node's ``--partitions``, recorded for the same reason; a layout written before the
    field existed ran with the default of the time, 4,096."""

    @property
    def addresses(self) -> dict[str, str]:
        return {node.node_id: node.address for node in self.nodes}

    def node(self, node_id: str) -> LocalNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        known = ", ".join(n.node_id for n in self.nodes)
        raise LocalClusterError(f"no node {node_id!r} in this cluster (nodes: {known})")


@dataclass(frozen=True)
class ProcessId:
    """A process as the kernel names it: pid plus start time, so that a reused pid never
    matches a stale record."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        started = _start_time(pid)
        return None if started is None else cls(pid, started)

    def alive(self) -> bool:
        """Running (not a zombie waiting to be reaped) and the same process as recorded."""
        return _start_time(self.pid) == self.started


def _start_time(pid: int) -> int | None:
    """The start time of a live, non-zombie process, in clock ticks since boot."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may contain spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of proc_pid_stat(5); fields[0] is field 3


@dataclass
class NodeState:
    state: str = DOWN
    process: ProcessId | None = None
    exit_code: int | None = None
    starts: int = 0

    def running(self) -> bool:
        return self.process is not None and self.process.alive()


@dataclass
class State:
    supervisor: ProcessId | None = None
    nodes: dict[str, NodeState] = field(default_factory=dict)

    def supervised(self) -> bool:
        return self.supervisor is not None and self.supervisor.alive()


def node_data_dir(data: Path, node_id: str) -> Path:
    return data / node_id


def log_path(data: Path, node_id: str) -> Path:
    return data / f"{node_id}.log"


def read_layout(data: Path) -> Layout | None:
    path = data / LAYOUT_FILE
    if not path.exists():
        return None
    recorded = json.loads(path.read_text())
    return Layout(
        str(recorded["engine"]),
        [LocalNode(**n) for n in recorded["nodes"]],
        int(recorded.get("replication_factor", 1)),
        int(recorded.get("partitions", OLD_DEFAULT_PARTITIONS)),
    )


def write_layout(data: Path, layout: Layout) -> None:
    data.mkdir(parents=True, exist_ok=True)
    record = {
        "engine": layout.engine,
        "replication_factor": layout.replication_factor,
        "partitions": layout.partitions,
        "nodes": [asdict(n) for n in layout.nodes],
    }
    _write_atomically(data / LAYOUT_FILE, record)


def require_layout(data: Path) -> Layout:
    layout = read_layout(data)
    if layout is None:
        raise LocalClusterError(f"{data} holds no cluster; start one with kv cluster up --data")
    return layout


def read_state(data: Path) -> State:
    path = data / STATE_FILE
    if not path.exists():
        return State()
    raw = json.loads(path.read_text())
    supervisor = raw.get("supervisor")
    return State(
        supervisor=ProcessId(**supervisor) if supervisor else None,
        nodes={
            node_id: NodeState(
                state=entry["state"],
                process=ProcessId(**entry["process"]) if entry["process"] else None,
                exit_code=entry["exit_code"],
                starts=entry["starts"],
            )
            for node_id, entry in raw["nodes"].items()
        },
    )


def write_state(data: Path, state: State) -> None:
    record = {
        "supervisor": asdict(state.supervisor) if state.supervisor else None,
        "nodes": {node_id: asdict(entry) for node_id, entry in state.nodes.items()},
    }
    _write_atomically(data / STATE_FILE, record)


def request_start(data: Path, node_id: str) -> None:
    control = data / CONTROL_DIR
    control.mkdir(parents=True, exist_ok=True)
    (control / f"{START_REQUEST}{node_id}").touch()


def take_start_requests(data: Path) -> list[str]:
    """Node ids asked to start since the last call (each request is consumed once)."""
    control = data / CONTROL_DIR
    if not control.is_dir():
        return []
    taken = []
    for request in sorted(control.glob(f"{START_REQUEST}*")):
        try:
            request.unlink()
        except FileNotFoundError:
            continue
        taken.append(request.name.removeprefix(START_REQUEST))
    return taken


def _write_atomically(path: Path, record: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
