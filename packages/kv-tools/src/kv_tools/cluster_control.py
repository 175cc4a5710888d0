"""``kv cluster stop|kill|start|restart <id>``: act on one node of a running ``kv cluster up``.

Stop and kill signal the node's process directly (named by pid and start time, so a stale
record is never acted on) and wait until the supervisor has seen it exit. Start asks the
supervisor to start the node (every node is the supervisor's child, so that its exit code is
reported) and waits until it answers or fails.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from kv_tools.cluster_dir import (
    DOWN,
    UP,
    LocalClusterError,
    NodeState,
    State,
    log_path,
    read_state,
    request_start,
    require_layout,
)
from kv_tools.launcher import POLL_INTERVAL, READY_TIMEOUT, STOP_TIMEOUT


def _wait(condition: Callable[[State], bool], data: Path, timeout: float) -> State | None:
    """Poll ``state.json`` until ``condition`` holds; None when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(data)
        if condition(state):
            return state
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_INTERVAL)


def _entry(data: Path, node_id: str) -> tuple[State, NodeState]:
    require_layout(data).node(node_id)  # an unknown id is an error, not "down"
    state = read_state(data)
    return state, state.nodes.get(node_id, NodeState())


def _signal_and_wait(data: Path, node_id: str, signum: int, timeout: float) -> str:
    _, entry = _entry(data, node_id)
    if entry.process is None or not entry.process.alive():
        return f"node {node_id} is already down"
    process = entry.process
    os.kill(process.pid, signum)
    if signum == signal.SIGTERM:
        os.kill(process.pid, signal.SIGCONT)  # a paused node cannot act on SIGTERM

    def exited(state: State) -> bool:
        now = state.nodes.get(node_id, NodeState())
        return not process.alive() and (now.process != process or not state.supervised())

    if _wait(exited, data, timeout) is None:
        if process.alive():
            os.kill(process.pid, signal.SIGKILL)
        if _wait(exited, data, timeout) is None:
            raise LocalClusterError(f"node {node_id} (pid {process.pid}) did not exit")
    return f"node {node_id} is down"


def stop(data: Path, node_id: str) -> str:
    """SIGTERM: the node drains in-flight requests and closes its store (SIGKILL if it hangs)."""
    return _signal_and_wait(data, node_id, signal.SIGTERM, STOP_TIMEOUT)


def kill(data: Path, node_id: str) -> str:
    """kill -9, as a crash would: nothing is flushed or closed."""
    return _signal_and_wait(data, node_id, signal.SIGKILL, STOP_TIMEOUT)


def start(data: Path, node_id: str) -> str:
    """Start a down node on its own address and data; returns once it answers."""
    state, entry = _entry(data, node_id)
    if not state.supervised():
        raise LocalClusterError(
            f"no kv cluster up is running on {data}; run kv cluster up --data {data}"
        )
    if entry.state == UP and entry.running():
        return f"node {node_id} is already up"
    before = entry.starts
    if not entry.running():
        request_start(data, node_id)
        before += 1  # the supervisor's next start of this node is ours

    def settled(now: State) -> bool:
        mine = now.nodes.get(node_id, NodeState())
        return not now.supervised() or (mine.starts >= before and mine.state in (UP, DOWN))

    final = _wait(settled, data, READY_TIMEOUT)
    if final is None:
        raise LocalClusterError(
            f"node {node_id} did not start in time; see {log_path(data, node_id)}"
        )
    result = final.nodes.get(node_id, NodeState())
    if result.state != UP:
        code = "" if result.exit_code is None else f" with code {result.exit_code}"
        raise LocalClusterError(f"node {node_id} exited{code}; see {log_path(data, node_id)}")
    return f"node {node_id} is up"


def restart(data: Path, node_id: str) -> str:
    stop(data, node_id)
    return start(data, node_id)


ACTIONS: dict[str, Callable[[Path, str], str]] = {
    "stop": stop,
    "kill": kill,
    "start": start,
    "restart": restart,
}
