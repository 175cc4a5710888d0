"""``kv cluster up``: a local cluster of real kv-node processes for trying things out.

The layout of the data directory is ``cluster.json`` (node ids and ports,
written on first start so a later start brings back the same nodes) and one
subdirectory plus log file per node.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kv_client.client import Client
from kv_client.errors import KvError

LAYOUT_FILE = "cluster.json"
DEFAULT_NODES = 3
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class LocalClusterError(Exception):
    pass


@dataclass(frozen=True)
class LocalNode:
    node_id: str
    address: str
    metrics: str


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the node's own bind is the real check)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def plan(data: Path, nodes: int, engine: str) -> tuple[list[LocalNode], str]:
    """Nodes to run: the ones recorded in ``data`` or a fresh set on free ports."""
    layout = data / LAYOUT_FILE
    if layout.exists():
        recorded = json.loads(layout.read_text())
        members = [LocalNode(**n) for n in recorded["nodes"]]
        if nodes and nodes != len(members):
            raise LocalClusterError(
                f"{data} holds a {len(members)}-node cluster; run with --nodes {len(members)} "
                "or use another --data directory"
            )
        return members, str(recorded["engine"])
    nodes = nodes or DEFAULT_NODES
    if nodes < 1:
        raise LocalClusterError("--nodes must be at least 1")
    members = [
        LocalNode(f"n{i}", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
        for i in range(1, nodes + 1)
    ]
    data.mkdir(parents=True, exist_ok=True)
    record = {"engine": engine, "nodes": [m.__dict__ for m in members]}
    layout.write_text(json.dumps(record, indent=2) + "\n")
    return members, engine


def node_command(node: LocalNode, members: list[LocalNode], data: Path, engine: str) -> list[str]:
    cluster = ",".join(f"{m.node_id}={m.address}" for m in members)
    return [
        sys.executable,
        "-m",
        "kv_node",
        "--id",
        node.node_id,
        "--cluster",
        cluster,
        "--data-dir",
        str(data / node.node_id),
        "--engine",
        engine,
        "--metrics-listen",
        node.metrics,
    ]


def wait_serving(
    client: Client, node_id: str, address: str, process: subprocess.Popen[Any], deadline: float
) -> None:
    """Poll the node's status until it answers; fail if its process exits or time runs out."""
    while True:
        if process.poll() is not None:
            raise LocalClusterError(
                f"node {node_id} exited with code {process.returncode}; see its log file"
            )
        try:
            client.node_status(address, timeout=0.5)
            return
        except KvError:
            if time.monotonic() > deadline:
                raise LocalClusterError(f"node {node_id} did not start answering in time") from None
            time.sleep(0.05)


def wait_ready(nodes: list[LocalNode], processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with Client([n.address for n in nodes], timeout=1.0) as client:
        for node, process in zip(nodes, processes, strict=True):
            wait_serving(client, node.node_id, node.address, process, deadline)


def stop(processes: Sequence[subprocess.Popen[Any]], *, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every process, give them ``timeout`` seconds together, then SIGKILL the rest."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(data: Path, nodes: int, engine: str) -> int:
    if importlib.util.find_spec("kv_node") is None:
        raise LocalClusterError(
            "kv cluster up needs the kv-node package installed beside kv-client"
        )
    members, engine = plan(data, nodes, engine)
    processes: list[subprocess.Popen[bytes]] = []
    stopping = False
    exit_code = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        for member in members:
            log = (data / f"{member.node_id}.log").open("ab")
            processes.append(
                subprocess.Popen(
                    node_command(member, members, data, engine),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    # Own process group: Ctrl-C reaches only us, and we stop the nodes.
                    start_new_session=True,
                )
            )
            log.close()
        wait_ready(members, processes)
        print(f"kv cluster of {len(members)} nodes ({engine} engine) in {data}:")
        for member in members:
            print(f"  {member.node_id}  {member.address}  metrics http://{member.metrics}/metrics")
        addresses = ",".join(m.address for m in members)
        print(f"try:  kv --addr {addresses} put hello world")
        print("Ctrl-C stops every node; run the same command again to bring them back.", flush=True)
        while not stopping:
            for member, process in zip(members, processes, strict=True):
                if process.poll() is not None:
                    print(
                        f"node {member.node_id} exited with code {process.returncode}; "
                        f"see {data / (member.node_id + '.log')}",
                        file=sys.stderr,
                    )
                    stopping = True
                    exit_code = 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(KeyboardInterrupt):
            stop(processes)
        if processes:
            print(f"stopped {len(processes)} nodes", flush=True)
    return exit_code


__all__ = ["LocalClusterError", "run"]
