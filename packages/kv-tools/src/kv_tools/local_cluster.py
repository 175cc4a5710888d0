"""``kv cluster up``: a local cluster of real kv-node processes that you can break and mend.

The running command supervises its nodes: a node that exits is reported (id, exit code, log)
and the others keep serving. ``kv cluster start <id>`` from another terminal asks it, through
the data directory (see ``cluster_dir``), to start that node again on its same address and
data. Ctrl-C (or SIGTERM) stops every node; running ``kv cluster up`` again brings back the
same nodes with their data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kv_client import Client
from kv_common.placement import DEFAULT_PARTITIONS
from kv_node.config import DEFAULT_REPLICATION_FACTOR
from kv_tools import launcher
from kv_tools.cluster_dir import (
    DOWN,
    STARTING,
    UP,
    Layout,
    LocalClusterError,
    LocalNode,
    NodeState,
    ProcessId,
    State,
    log_path,
    node_data_dir,
    read_layout,
    read_state,
    take_start_requests,
    write_layout,
    write_state,
)

DEFAULT_NODES = 3
LOCK_FILE = "up.lock"
TICK_SECONDS = 0.2  # how soon a death or a start request is noticed


def plan(data: Path, nodes: int, engine: str, replication_factor: int = 0) -> Layout:
    """The nodes to run: the ones recorded in ``data`` or a fresh set on free ports.

    ``nodes`` and ``replication_factor`` of 0 mean "as recorded, or the default"."""
    recorded = read_layout(data)
    if recorded is not None:
        if nodes and nodes != len(recorded.nodes):
            raise LocalClusterError(
                f"{data} holds a {len(recorded.nodes)}-node cluster; run with --nodes "
                f"{len(recorded.nodes)} or use another --data directory"
            )
        asked = min(replication_factor, len(recorded.nodes))
        if replication_factor and asked != recorded.replication_factor:
            raise LocalClusterError(
                f"{data} holds a cluster with replication factor {recorded.replication_factor}; "
                f"run with --replication-factor {recorded.replication_factor} or use another "
                "--data directory"
            )
        return recorded
    nodes = nodes or DEFAULT_NODES
    if nodes < 1:
        raise LocalClusterError("--nodes must be at least 1")
    if replication_factor < 0:
        raise LocalClusterError("--replication-factor must be at least 1")
    # The memory engine holds one copy, so it defaults to one (the banner says so).
    default = DEFAULT_REPLICATION_FACTOR if engine == "lmdb" else 1
    copies = min(replication_factor or default, nodes)
    if copies > 1 and engine != "lmdb":
        raise LocalClusterError(
            f"{copies} copies of each partition need the lmdb engine (the memory engine "
            "keeps one copy)"
        )
    layout = Layout(
        engine,
        [
            LocalNode(
                f"n{i}",
                f"127.0.0.1:{launcher.free_port()}",
                f"127.0.0.1:{launcher.free_port()}",
            )
            for i in range(1, nodes + 1)
        ],
        copies,
        DEFAULT_PARTITIONS,
    )
    write_layout(data, layout)
    return layout


def node_spec(data: Path, layout: Layout, node: LocalNode) -> launcher.NodeSpec:
    """How to run ``node``: with the settings its cluster was created with, every time."""
    return launcher.NodeSpec(
        node.node_id,
        node.address,
        launcher.cluster_spec(layout.addresses),
        node_data_dir(data, node.node_id),
        engine=layout.engine,
        metrics=node.metrics,
        extra=(
            "--replication-factor",
            str(layout.replication_factor),
            "--partitions",
            str(layout.partitions),
        ),
    )


def describe_exit(code: int) -> str:
    if code < 0:
        return f"code {code} (killed by {signal.Signals(-code).name})"
    return f"code {code}"


@dataclass
class Supervisor:
    """Owns the node processes of one ``kv cluster up`` and publishes their state."""

    data: Path
    layout: Layout
    client: Client

    def __post_init__(self) -> None:
        self.processes: dict[str, launcher.Process] = {}
        self.state = State(
            supervisor=ProcessId.of(os.getpid()),
            nodes={node.node_id: NodeState() for node in self.layout.nodes},
        )

    def start(self, node_id: str) -> None:
        process = launcher.spawn_node(
            node_spec(self.data, self.layout, self.layout.node(node_id)),
            log_path(self.data, node_id),
            # SIGTERM, not SIGKILL: a killed supervisor's nodes still drain and close cleanly.
            parent_death_signal=signal.SIGTERM,
        )
        self.processes[node_id] = process
        entry = self.state.nodes[node_id]
        entry.state, entry.process, entry.exit_code = STARTING, ProcessId.of(process.pid), None
        entry.starts += 1

    def publish(self) -> None:
        write_state(self.data, self.state)

    def wait_all_serving(self) -> None:
        launcher.wait_nodes_serving(
            (node_id, self.layout.node(node_id).address, process, log_path(self.data, node_id))
            for node_id, process in self.processes.items()
        )
        for entry in self.state.nodes.values():
            entry.state = UP

    def tick(self) -> bool:
        """Notice exits, finished starts and start requests; True when the state changed."""
        changed = False
        for node_id, process in list(self.processes.items()):
            entry = self.state.nodes[node_id]
            code = process.poll()
            if code is not None:
                del self.processes[node_id]
                entry.state, entry.process, entry.exit_code = DOWN, None, code
                print(
                    f"node {node_id} exited with {describe_exit(code)}; "
                    f"log: {log_path(self.data, node_id)}",
                    file=sys.stderr,
                    flush=True,
                )
                changed = True
            elif entry.state == STARTING and self._answers(node_id):
                entry.state = UP
                print(f"node {node_id} is up at {self.layout.node(node_id).address}", flush=True)
                changed = True
        for node_id in take_start_requests(self.data):
            if node_id in self.state.nodes and node_id not in self.processes:
                self.start(node_id)
                changed = True
        return changed

    def _answers(self, node_id: str) -> bool:
        return launcher.answers_status(self.client, self.layout.node(node_id).address)()

    def stop_all(self) -> int:
        running = list(self.processes.values())
        launcher.stop(running)
        for entry in self.state.nodes.values():
            entry.state, entry.process = DOWN, None
        self.processes.clear()
        return len(running)


@contextlib.contextmanager
def _only_supervisor(data: Path) -> Iterator[None]:
    """Hold the data directory's lock for as long as this ``kv cluster up`` runs.

    An flock, not a pid check: two commands started at once cannot both pass it, and the
    kernel releases it however the holder dies.
    """
    data.mkdir(parents=True, exist_ok=True)
    with (data / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_state(data).supervisor
            who = f" (pid {holder.pid})" if holder is not None else ""
            raise LocalClusterError(f"kv cluster up{who} is already running on {data}") from None
        yield


def run(data: Path, nodes: int, engine: str, replication_factor: int = 0) -> int:
    """Run the cluster until Ctrl-C or SIGTERM; returns the exit code."""
    with _only_supervisor(data):
        return _supervise(data, nodes, engine, replication_factor)


def _supervise(data: Path, nodes: int, engine: str, replication_factor: int) -> int:
    layout = plan(data, nodes, engine, replication_factor)
    take_start_requests(data)  # requests left by an earlier run are moot: every node starts
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    # Started in the background by a script, SIGINT arrives ignored (and Python then keeps
    # it ignored); Ctrl-C, or kill -INT, must still stop the cluster.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    stopped = 0
    with Client(list(layout.addresses.values()), timeout=1.0) as client:
        supervisor = Supervisor(data, layout, client)
        try:
            for node in layout.nodes:
                supervisor.start(node.node_id)
            supervisor.publish()
            supervisor.wait_all_serving()
            supervisor.publish()
            _banner(data, layout)
            while not stopping:
                if supervisor.tick():
                    supervisor.publish()
                time.sleep(TICK_SECONDS)
        except KeyboardInterrupt:
            pass
        except launcher.LaunchError as exc:
            raise LocalClusterError(str(exc)) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
            with contextlib.suppress(KeyboardInterrupt):
                stopped = supervisor.stop_all()
                supervisor.state.supervisor = None
                supervisor.publish()
            print(f"stopped {stopped} nodes", flush=True)
    return 0


def _banner(data: Path, layout: Layout) -> None:
    print(
        f"kv cluster of {len(layout.nodes)} nodes ({layout.engine} engine, replication factor "
        f"{layout.replication_factor}) in {data}:"
    )
    for node in layout.nodes:
        print(f"  {node.node_id}  {node.address}  metrics http://{node.metrics}/metrics")
    addresses = ",".join(node.address for node in layout.nodes)
    print(f"try:  kv --addr {addresses} put hello world")
    print(f"      kv cluster kill n1 --data {data}   (then: kv cluster start n1 --data {data})")
    print("Ctrl-C stops every node; run the same command again to bring them back.", flush=True)


__all__ = ["LocalClusterError", "plan", "run"]
