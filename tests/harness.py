"""Real kv-node processes on 127.0.0.1 for end-to-end tests.

Every process a test starts is registered with a ``Processes`` owner that the
fixture stops (SIGTERM, then SIGKILL) however the test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kv_client import Client
from kv_tools.local_cluster import LocalClusterError, free_port, wait_serving
from kv_tools.local_cluster import stop as stop_processes

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass
class NodeProcess:
    node_id: str
    address: str
    data_dir: Path
    cluster: str
    engine: str = "lmdb"
    metrics: str | None = None
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    log: Path | None = None

    def command(self) -> list[str]:
        command = [
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
            *self.extra,
        ]
        if self.metrics:
            command += ["--metrics-listen", self.metrics]
        return command

    def start(self) -> None:
        self.log = self.data_dir.parent / f"{self.node_id}.log"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        with Client(self.address, timeout=1.0) as client:
            try:
                wait_serving(client, self.node_id, self.address, self.process, deadline)
            except LocalClusterError as exc:
                raise AssertionError(f"{exc}: {self.output()}") from None

    def output(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""

    def kill(self) -> None:
        """kill -9: no chance to flush or close anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)

    def terminate(self) -> int:
        assert self.process is not None
        stop_processes([self.process], timeout=STOP_TIMEOUT)
        return self.process.returncode


class Cluster:
    def __init__(self, root: Path, ids: list[str], *, engine: str = "lmdb") -> None:
        addresses = {node_id: f"127.0.0.1:{free_port()}" for node_id in ids}
        spec = ",".join(f"{i}={a}" for i, a in addresses.items())
        self.nodes = {
            node_id: NodeProcess(
                node_id,
                address,
                root / node_id,
                spec,
                engine=engine,
                metrics=f"127.0.0.1:{free_port()}",
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
        for node in self.nodes.values():
            if node.process is not None:
                node.terminate()


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
