"""Start and stop the processes under test: echo, kv nodes, etcd, Redis.

Everything binds 127.0.0.1 on free ports with a fresh temporary data directory, logs to a
file in that directory, and is stopped (SIGTERM, then SIGKILL) when the ``Servers`` context
ends. Anchors (etcd, Redis) are looked up on PATH and in /usr/bin and /usr/sbin; nothing is
ever installed: a missing binary is reported as ``Unavailable`` with the reason.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kv_tools import launcher
from kv_tools.launcher import free_port

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class ServerError(Exception):
    """A server that did not start."""


@dataclass(frozen=True)
class Unavailable:
    """A target that cannot run here, and why (shown in the report)."""

    reason: str


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ServerError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_bytes(path: Path) -> tuple[int, int]:
    """(apparent size, allocated bytes) of every file under ``path``."""
    apparent = allocated = 0
    for file in path.rglob("*"):
        if file.is_file():
            stat = file.stat()
            apparent += stat.st_size
            allocated += stat.st_blocks * 512
    return apparent, allocated


@dataclass
class Process:
    name: str
    popen: launcher.Process
    log: Path
    data_dir: Path
    address: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _wait_port(process: Process, timeout: float = READY_TIMEOUT) -> None:
    try:
        launcher.wait_until(
            launcher.accepts_connections(process.address),
            process.popen,
            name=process.name,
            deadline=time.monotonic() + timeout,
        )
    except launcher.LaunchError as exc:
        raise ServerError(f"{exc}:\n{process.log_tail()}") from None


@dataclass
class Servers:
    """Owns every process it starts; use as a context manager."""

    root: Path | None = None
    processes: list[Process] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Servers:
        if self.root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kv-bench-")
            self.root = Path(self._tmp.name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _dir(self, name: str) -> Path:
        if self.root is None:
            raise ServerError("Servers used outside its context")
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        return path

    def _spawn(self, name: str, argv: Sequence[str], data_dir: Path, address: str) -> Process:
        log = data_dir / "server.log"
        # Own session: a Ctrl-C of the bench reaches us, not them; they die with the bench.
        popen = launcher.spawn(argv, log, cwd=data_dir)
        process = Process(name, popen, log, data_dir, address)
        self.processes.append(process)
        return process

    def stop(self, process: Process) -> None:
        launcher.stop([process.popen], timeout=STOP_TIMEOUT)
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        launcher.stop([p.popen for p in self.processes], timeout=STOP_TIMEOUT)
        self.processes.clear()

    # --- the targets -------------------------------------------------------------------

    def start_echo(self, value_size: int = 100) -> Process:
        data_dir = self._dir("echo")
        address = f"127.0.0.1:{free_port()}"
        argv = [
            sys.executable,
            "-m",
            "kv_tools.bench.echo_server",
            "--listen",
            address,
            "--value-size",
            str(value_size),
        ]
        process = self._spawn("echo", argv, data_dir, address)
        _wait_port(process)
        return process

    def start_kv(self, nodes: int, engine: str) -> list[Process]:
        """A kv cluster of ``nodes`` real node processes; returns them in id order."""
        ids = [f"n{i}" for i in range(1, nodes + 1)]
        addresses = {node_id: f"127.0.0.1:{free_port()}" for node_id in ids}
        cluster = launcher.cluster_spec(addresses)
        started = []
        for node_id in ids:
            data_dir = self._dir(f"kv-{engine}-{node_id}")
            spec = launcher.NodeSpec(
                node_id,
                addresses[node_id],
                cluster,
                data_dir / "data",
                engine=engine,
                extra=("--listen", addresses[node_id]),
            )
            started.append(
                self._spawn(f"kv-{engine}-{node_id}", spec.argv(), data_dir, addresses[node_id])
            )
        try:
            launcher.wait_nodes_serving((p.name, p.address, p.popen, p.log) for p in started)
        except launcher.LaunchError as exc:
            raise ServerError(str(exc)) from None
        return started

    def start_etcd(self) -> Process | Unavailable:
        binary = find_binary("etcd")
        if binary is None:
            return Unavailable("etcd not found on PATH or in /usr/bin (Debian: etcd-server)")
        data_dir = self._dir("etcd")
        client = f"127.0.0.1:{free_port()}"
        peer = f"127.0.0.1:{free_port()}"
        argv = [
            binary,
            "--name",
            "bench",
            "--data-dir",
            str(data_dir / "data"),
            "--listen-client-urls",
            f"http://{client}",
            "--advertise-client-urls",
            f"http://{client}",
            "--listen-peer-urls",
            f"http://{peer}",
            "--initial-advertise-peer-urls",
            f"http://{peer}",
            "--initial-cluster",
            f"bench=http://{peer}",
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-level",
            "error",
        ]
        process = self._spawn("etcd", argv, data_dir, client)
        _wait_port(process)
        return process

    def start_redis(self, *, durable: bool) -> Process | Unavailable:
        binary = find_binary("redis-server")
        if binary is None:
            return Unavailable(
                "redis-server not found on PATH or in /usr/bin (Debian: redis-server)"
            )
        name = "redis-aof" if durable else "redis"
        data_dir = self._dir(name)
        port = free_port()
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if durable
            else ["--appendonly", "no"]
        )
        argv = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            *persistence,
        ]
        process = self._spawn(name, argv, data_dir, f"127.0.0.1:{port}")
        _wait_port(process)
        return process
