"""Bytes per stored key, per engine.

A fresh single node is started, warmed up with a few thousand writes (so the gRPC server's
buffers and lazy imports are already in its RSS), measured, filled with N keys of 16 bytes
and values of 100 bytes in batches of 1000, and measured again. The cost per key is the
delta divided by N, next to the 116 bytes of raw key + value:

* memory engine: the node's RSS delta.
* lmdb engine: the data directory's allocated bytes delta, and the RSS delta (LMDB maps the
  file, so touched pages count in RSS too: they are page cache, not a second copy).

``measure_cluster`` does the same for a replicated cluster (3 nodes at RF=3, or the 3-member
etcd it is compared with): a fresh cluster, every member's RSS and data directory before and
after N keys written through the suite's own client path, the deltas summed over the members
(every copy is counted) and divided by N.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc

from kv_tools.bench.drivers import Driver, DriverError, StubDriver
from kv_tools.bench.keys import KEY_BYTES
from kv_tools.bench.loadgen import preload
from kv_tools.bench.servers import Process, Servers, Unavailable, disk_bytes, rss_bytes
from kv_tools.bench.workload import GET, PUT, Op, preload_batches

FILL_BATCH = 1000
WARMUP_KEYS = 5000
FILL_TIMEOUT = 60.0


async def measure_engine(
    servers: Servers, engine: str, keys: int, value_size: int = 100
) -> dict[str, Any]:
    (node,) = servers.start_kv(1, engine)
    data = node.data_dir / "data"
    driver = StubDriver(node.address, timeout=60.0)
    await driver.setup()
    try:
        # Warm up on keys outside the measured range, then let the allocator settle.
        warm = [Op(PUT, b"w%015d" % i, b"x" * value_size) for i in range(WARMUP_KEYS)]
        for start in range(0, WARMUP_KEYS, FILL_BATCH):
            await driver.run(warm[start : start + FILL_BATCH])
        await asyncio.sleep(0.5)
        rss_before = rss_bytes(node.pid)
        disk_before = disk_bytes(data) if data.exists() else (0, 0)
        began = time.monotonic()
        failed = await preload(driver, keys, value_size, batch=FILL_BATCH, concurrency=2)
        fill_seconds = time.monotonic() - began
        # A read of the last key proves the fill is visible before measuring.
        if await driver.run([Op(GET, b"k%015d" % (keys - 1))]) or failed:
            raise RuntimeError(f"{failed} puts failed while filling the {engine} node")
        await asyncio.sleep(0.5)
        rss_after = rss_bytes(node.pid)
        disk_after = disk_bytes(data) if data.exists() else (0, 0)
    finally:
        await driver.close()
        servers.stop(node)
    raw = KEY_BYTES + value_size
    rss_per_key = (rss_after - rss_before) / keys
    disk_per_key = (disk_after[1] - disk_before[1]) / keys
    result: dict[str, Any] = {
        "engine": engine,
        "keys": keys,
        "raw_bytes_per_key": raw,
        "fill_seconds": round(fill_seconds, 2),
        "fill_keys_per_sec": round(keys / fill_seconds, 0) if fill_seconds else 0,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_bytes_per_key": round(rss_per_key, 1),
        "disk_allocated_before": disk_before[1],
        "disk_allocated_after": disk_after[1],
        "disk_apparent_after": disk_after[0],
        "disk_bytes_per_key": round(disk_per_key, 1),
    }
    stored = rss_per_key if engine == "memory" else disk_per_key
    result["bytes_per_key"] = round(stored, 1)
    result["overhead_x"] = round(stored / raw, 2)
    return result


# --- a replicated cluster: every copy counted ----------------------------------------------

CLUSTER_FILL_BATCH = 100
"""Keys per fill request: etcd takes at most 128 operations in a Txn by default."""
CLUSTER_FILL_CONCURRENCY = 4
CLUSTER_FILL_ATTEMPTS = 5
"""A batch refused during a leader change is sent again (puts of the same value are
idempotent for the figure); one still refused after this many tries is counted as lost."""
CLUSTER_WARMUP_KEYS = 2000
CLUSTER_SETTLE_SECONDS = 2.0
"""After the fill: groups go quiet and the last commits reach the followers' disks."""


async def _fill(driver: Driver, keys: int, value_size: int) -> tuple[int, int]:
    """Write keys 0..keys-1, resending refused batches; returns (batches resent, keys lost)."""
    batches = preload_batches(keys, value_size, CLUSTER_FILL_BATCH)
    resent = lost = 0

    async def worker() -> None:
        nonlocal resent, lost
        for ops in batches:  # shared generator: each batch goes to one worker
            for attempt in range(CLUSTER_FILL_ATTEMPTS):
                try:
                    failed = await driver.run(ops)
                except (grpc.RpcError, DriverError):
                    failed = len(ops)
                if not failed:
                    break
                if attempt + 1 == CLUSTER_FILL_ATTEMPTS:
                    lost += failed
                else:
                    resent += 1

    await asyncio.gather(*(worker() for _ in range(CLUSTER_FILL_CONCURRENCY)))
    return resent, lost


def _footprint(processes: Sequence[Process]) -> dict[str, dict[str, int]]:
    measured = {}
    for process in processes:
        data = process.data_dir / "data"
        apparent, allocated = disk_bytes(data) if data.exists() else (0, 0)
        measured[process.name] = {
            "rss": rss_bytes(process.pid),
            "disk_allocated": allocated,
            "disk_apparent": apparent,
        }
    return measured


async def measure_cluster(
    servers: Servers, target: str, keys: int, value_size: int = 100
) -> dict[str, Any]:
    """Bytes per key of a replicated cluster (``kv3-rf3`` or ``etcd3`` of the suite): RSS
    and data directory of every member before and after writing ``keys`` keys, through the
    same client path as the throughput rows; the cluster is stopped before returning."""
    from kv_tools.bench.suite import TARGETS, Config, make_driver

    started = TARGETS[target].start(servers)
    if isinstance(started, Unavailable):
        return {"target": target, "error": started.reason}
    via = "etcd" if target.startswith("etcd") else "sdk"
    driver = make_driver(Config(target, via), started, FILL_TIMEOUT)
    try:
        await driver.setup()
        warm = [Op(PUT, b"w%015d" % i, b"x" * value_size) for i in range(CLUSTER_WARMUP_KEYS)]
        for start in range(0, CLUSTER_WARMUP_KEYS, CLUSTER_FILL_BATCH):
            await driver.run(warm[start : start + CLUSTER_FILL_BATCH])
        await asyncio.sleep(CLUSTER_SETTLE_SECONDS)
        before = _footprint(started)
        began = time.monotonic()
        resent, lost = await _fill(driver, keys, value_size)
        fill_seconds = time.monotonic() - began
        if await driver.get(b"k%015d" % (keys - 1)) is None:
            raise RuntimeError(f"the last key written to {target} is not readable")
        await asyncio.sleep(CLUSTER_SETTLE_SECONDS)
        after = _footprint(started)
    finally:
        await driver.close()
        for process in started:
            servers.stop(process)
    stored = keys - lost
    per_key = {
        item: sum(after[n][item] - before[n][item] for n in after) / stored
        for item in ("rss", "disk_allocated", "disk_apparent")
    }
    return {
        "target": target,
        "members": len(started),
        "keys": keys,
        "keys_lost": lost,
        "batches_resent": resent,
        "raw_bytes_per_key": KEY_BYTES + value_size,
        "fill_seconds": round(fill_seconds, 2),
        "fill_keys_per_sec": round(keys / fill_seconds, 0) if fill_seconds else 0,
        "before": before,
        "after": after,
        "rss_bytes_per_key": round(per_key["rss"], 1),
        "rss_bytes_per_key_per_member": round(per_key["rss"] / len(started), 1),
        "disk_bytes_per_key": round(per_key["disk_allocated"], 1),
        "disk_apparent_bytes_per_key": round(per_key["disk_apparent"], 1),
        "disk_bytes_per_key_per_member": round(per_key["disk_allocated"] / len(started), 1),
    }
