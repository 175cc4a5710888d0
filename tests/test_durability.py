"""Acknowledged writes survive kill -9 and SIGTERM."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from harness import Cluster
from kv_client import AsyncClient, Client, KvError

WRITERS = 16
LOAD_SECONDS = 1.5
MAX_WRITES = 20_000


def _load_until_stopped(address: str, stop: threading.Event) -> dict[str, bytes]:
    """Write unique values from concurrent writers; return what was acknowledged."""
    acknowledged: dict[str, bytes] = {}

    async def writer(worker: int, kv: AsyncClient) -> None:
        for i in range(MAX_WRITES // WRITERS):
            if stop.is_set():
                return
            key, value = f"w{worker}-{i}", f"value-{worker}-{i}".encode()
            try:
                await kv.put(key, value, timeout=2.0)
            except KvError:
                return  # the node died: this write's outcome is unknown, so not counted
            acknowledged[key] = value

    async def main() -> None:
        async with AsyncClient(address) as kv:
            await asyncio.gather(*(writer(w, kv) for w in range(WRITERS)))

    asyncio.run(main())
    return acknowledged


def _run_load_and(cluster: Cluster, action: str) -> dict[str, bytes]:
    node = cluster.nodes["n1"]
    stop = threading.Event()
    result: dict[str, dict[str, bytes]] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("acked", _load_until_stopped(node.address, stop))
    )
    thread.start()
    time.sleep(LOAD_SECONDS)
    if action == "kill":
        node.kill()
    else:
        assert node.terminate() == 0, node.output()
    time.sleep(0.5)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return result["acked"]


def _check_all_present(cluster: Cluster, acknowledged: dict[str, bytes]) -> None:
    node = cluster.nodes["n1"]
    node.start()
    node.wait_ready()
    with Client(node.address) as kv:
        missing = [key for key, value in acknowledged.items() if kv.get(key) != value]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["n1"])
    try:
        cluster.start()
        acknowledged = _run_load_and(cluster, "kill")
        assert len(acknowledged) > 100, "the load must have been running when the node died"
        _check_all_present(cluster, acknowledged)
    finally:
        cluster.stop()


def test_sigterm_drains_and_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, ["n1"])
    try:
        cluster.start()
        acknowledged = _run_load_and(cluster, "term")
        assert len(acknowledged) > 100
        assert "stopped" in cluster.nodes["n1"].output()
        _check_all_present(cluster, acknowledged)
    finally:
        cluster.stop()
