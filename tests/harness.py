"""Real kv-node processes on 127.0.0.1 for end-to-end tests, over ``kv_tools.launcher``.

Every node dies with the test runner (a parent-death signal), and ``Cluster.stop`` stops all of
its nodes in one call that cannot give up part-way, so no path of a test leaves a node behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kv_tools import launcher

STOP_TIMEOUT = 15.0
REPLICATION_FLAG = "--replication-factor"
ONE_COPY = (REPLICATION_FLAG, "1")
"""The node's default is three copies; the tests of sharding, forwarding and the API run one
(a dead node's keys are unavailable, an owner serves its keys) unless they pass the flag."""
LOG_WAIT_TIMEOUT = 30.0


@dataclass
class NodeProcess:
    node_id: str
    address: str
    data_dir: Path
    cluster: str
    engine: str = "lmdb"
    metrics: str | None = None
    extra: list[str] = field(default_factory=list)
    process: launcher.Process | None = None

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.node_id}.log"

    def spec(self) -> launcher.NodeSpec:
        return launcher.NodeSpec(
            self.node_id,
            self.address,
            self.cluster,
            self.data_dir,
            engine=self.engine,
            metrics=self.metrics,
            extra=tuple(self.extra) if REPLICATION_FLAG in self.extra else (*ONE_COPY, *self.extra),
        )

    def start(self) -> None:
        # Same session as the runner: a Ctrl-C of pytest reaches the nodes too.
        self.process = launcher.spawn_node(self.spec(), self.log, own_session=False)

    def running(self) -> launcher.Process:
        assert self.process is not None, f"node {self.node_id} was never started"
        return self.process

    def wait_ready(self) -> None:
        try:
            launcher.wait_nodes_serving([(self.node_id, self.address, self.running(), self.log)])
        except launcher.LaunchError as exc:
            raise AssertionError(f"{exc}: {self.output()}") from None

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for_log(self, text: str, *, timeout: float = LOG_WAIT_TIMEOUT) -> None:
        """Block until ``text`` appears in the node's log (the node's own event)."""
        launcher.wait_until(
            lambda: text in self.output(),
            self.running(),
            name=f"node {self.node_id}",
            deadline=time.monotonic() + timeout,
            log=self.log,
        )

    def kill(self) -> None:
        """kill -9: no chance to flush or close anything."""
        if self.process is not None:
            launcher.kill(self.process)

    def pause(self) -> None:
        launcher.pause(self.running())

    def resume(self) -> None:
        launcher.resume(self.running())

    def terminate(self) -> int:
        process = self.running()
        launcher.stop([process], timeout=STOP_TIMEOUT)
        return process.returncode


class Cluster:
    def __init__(
        self, root: Path, ids: list[str], *, engine: str = "lmdb", extra: list[str] | None = None
    ) -> None:
        addresses = {node_id: f"127.0.0.1:{launcher.free_port()}" for node_id in ids}
        spec = launcher.cluster_spec(addresses)
        self.nodes = {
            node_id: NodeProcess(
                node_id,
                address,
                root / node_id,
                spec,
                engine=engine,
                metrics=f"127.0.0.1:{launcher.free_port()}",
                extra=list(extra or []),
            )
            for node_id, address in addresses.items()
        }

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes.values()]

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_ready()

    def stop(self) -> None:
        """Stop every node at once (SIGTERM, then SIGKILL); never stops part-way."""
        launcher.stop(
            [n.process for n in self.nodes.values() if n.process is not None],
            timeout=STOP_TIMEOUT,
        )


@contextmanager
def running_cluster(
    root: Path, ids: list[str], *, engine: str = "lmdb", extra: list[str] | None = None
) -> Iterator[Cluster]:
    """A started cluster that is stopped however the block ends (start failures included)."""
    cluster = Cluster(root, ids, engine=engine, extra=extra)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def run_node_command(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``kv-node`` to completion (for configurations it must refuse)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kv_node", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def poll_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Wait for a condition another process makes true (a file, a state); fail after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(launcher.POLL_INTERVAL)
