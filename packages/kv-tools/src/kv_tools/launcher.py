"""The one way kv's tools start, watch and stop server processes.

``kv cluster up``, the end-to-end test harness and the benchmark all launch kv-node (and the
benchmark's other servers) through these functions, so a fix to how a process is started,
awaited or stopped lands everywhere at once.

Every process gets a log file (its stdout and stderr), no stdin, and optionally a parent-death
signal: the kernel sends it when the launching thread dies, however it dies (even kill -9), so
a killed test runner or a killed ``kv cluster up`` does not leave nodes behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kv_client import Client, KvError

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
PROBE_TIMEOUT = 0.5

# prctl(2) option from <linux/prctl.h>: deliver a signal to this process when its parent dies.
PR_SET_PDEATHSIG = 1
# Run as `python -I -c _PDEATHSIG_EXEC SIGNUM PARENT_PID ARGV...`: arm the parent-death signal,
# give up if the parent is already gone (it died before prctl took effect), then become ARGV.
_PDEATHSIG_EXEC = f"""
import ctypes, os, sys
ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, int(sys.argv[1]), 0, 0, 0)
if os.getppid() != int(sys.argv[2]):
    os._exit(1)
os.execvp(sys.argv[3], sys.argv[3:])
"""

Process = subprocess.Popen[bytes]


class LaunchError(Exception):
    """A process that did not start serving (it exited, or time ran out)."""


@dataclass(frozen=True)
class NodeSpec:
    """How to run one kv-node: the flags that matter to the tools, plus any extras."""

    node_id: str
    address: str
    cluster: str  # every member as id=host:port,...
    data_dir: Path
    engine: str = "lmdb"
    metrics: str | None = None
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "kv_node",
            "--id",
            self.node_id,
            "--cluster",
            self.cluster,
            "--data-dir",
            str(self.data_dir),
            "--engine",
            self.engine,
        ]
        if self.metrics:
            argv += ["--metrics-listen", self.metrics]
        return [*argv, *self.extra]


def cluster_spec(addresses: dict[str, str]) -> str:
    """The ``--cluster`` value for these node ids and addresses."""
    return ",".join(f"{node_id}={address}" for node_id, address in addresses.items())


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server's own bind is the real check)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent(argv: Sequence[str], signum: int) -> list[str]:
    """``argv`` behind a tiny exec wrapper that first asks the kernel to send ``signum`` when
    the launching thread dies (the request survives exec).

    Not a ``preexec_fn``: Python code between fork and exec in a process that runs gRPC
    threads can abort the child (gRPC's poller sees its fds vanish); the wrapper is a fresh
    interpreter, and Popen can use vfork again.
    """
    return [sys.executable, "-I", "-c", _PDEATHSIG_EXEC, str(signum), str(os.getpid()), *argv]


def spawn(
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    own_session: bool = True,
    parent_death_signal: int | None = signal.SIGKILL,
) -> Process:
    """Start ``argv`` with its output appended to ``log``.

    ``own_session`` keeps a terminal's Ctrl-C from reaching the child directly, so that the
    launcher decides how its children stop. ``parent_death_signal`` is sent to the child when
    the thread that called ``spawn`` exits (Linux only; None disables it). Call ``spawn`` from
    a thread that lives as long as the child should.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    if parent_death_signal is not None and sys.platform == "linux":
        argv = _die_with_parent(argv, parent_death_signal)
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=own_session,
        )


def spawn_node(
    spec: NodeSpec,
    log: Path,
    *,
    own_session: bool = True,
    parent_death_signal: int | None = signal.SIGKILL,
) -> Process:
    """Start one kv-node (``python -m kv_node``) as ``spec`` describes; see ``spawn``."""
    return spawn(spec.argv(), log, own_session=own_session, parent_death_signal=parent_death_signal)


def _exited(name: str, process: Process, log: Path | None) -> LaunchError:
    where = f"; see {log}" if log is not None else ""
    return LaunchError(f"{name} exited with code {process.returncode}{where}")


def wait_until(
    ready: Callable[[], bool],
    process: Process,
    *,
    name: str,
    deadline: float,
    log: Path | None = None,
) -> None:
    """Poll ``ready`` until it is true; fail if ``process`` exits or ``deadline`` passes."""
    while True:
        if process.poll() is not None:
            raise _exited(name, process, log)
        if ready():
            return
        if time.monotonic() > deadline:
            where = f"; see {log}" if log is not None else ""
            raise LaunchError(f"{name} did not start serving in time{where}")
        time.sleep(POLL_INTERVAL)


def answers_status(client: Client, address: str) -> Callable[[], bool]:
    """Readiness of a kv node: it answers NodeStatus and its health check says SERVING (a
    replicated node answers the first before its partitions have leaders, the second after)."""

    def probe() -> bool:
        try:
            client.node_status(address, timeout=PROBE_TIMEOUT)
        except KvError:
            return False
        return reports_serving(address)

    return probe


def reports_serving(address: str) -> bool:
    """Whether the node at ``address`` answers the standard health check with SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def accepts_connections(address: str) -> Callable[[], bool]:
    """Readiness of any TCP server: it accepts a connection."""
    host, port = address.rsplit(":", 1)

    def probe() -> bool:
        try:
            with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT):
                return True
        except OSError:
            return False

    return probe


def wait_nodes_serving(
    nodes: Iterable[tuple[str, str, Process, Path | None]], *, timeout: float = READY_TIMEOUT
) -> None:
    """Wait until every (node id, address, process, log) answers, within one shared deadline."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    with Client([address for _, address, _, _ in pending], timeout=1.0) as client:
        for node_id, address, process, log in pending:
            wait_until(
                answers_status(client, address),
                process,
                name=f"node {node_id}",
                deadline=deadline,
                log=log,
            )


def stop(processes: Iterable[Process], *, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every process, give them ``timeout`` seconds together, then SIGKILL the rest.

    Never raises for one process part-way, so one failure cannot leave the others running.
    """
    running = [p for p in processes if p.poll() is None]
    for process in running:
        _signal(process, signal.SIGTERM)
        _signal(process, signal.SIGCONT)  # a paused process cannot act on SIGTERM
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(process)


def kill(process: Process) -> None:
    """kill -9: no chance to flush or close anything; returns once the process is gone."""
    _signal(process, signal.SIGKILL)
    process.wait()


def pause(process: Process) -> None:
    """SIGSTOP: the process keeps its sockets but answers nothing until ``resume``."""
    _signal(process, signal.SIGSTOP)


def resume(process: Process) -> None:
    """SIGCONT a paused process."""
    _signal(process, signal.SIGCONT)


def send(process: Process, signum: int) -> None:
    """Send ``signum`` without waiting (for tests that act while the process still runs)."""
    _signal(process, signum)


def _signal(process: Process, signum: int) -> None:
    # Popen.send_signal does nothing for a process it has reaped, so a pid is never reused.
    process.send_signal(signum)


__all__ = [
    "LaunchError",
    "NodeSpec",
    "Process",
    "accepts_connections",
    "answers_status",
    "cluster_spec",
    "free_port",
    "kill",
    "pause",
    "resume",
    "send",
    "spawn",
    "spawn_node",
    "stop",
    "wait_nodes_serving",
    "wait_until",
]
