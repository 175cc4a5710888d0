"""Bytes per stored key, per engine.

A fresh single node is started, warmed up with a few thousand writes (so the gRPC server's
buffers and lazy imports are already in its RSS), measured, filled with N keys of 16 bytes
and values of 100 bytes in batches of 1000, and measured again. The cost per key is the
delta divided by N, next to the 116 bytes of raw key + value:

* memory engine: the node's RSS delta.
* lmdb engine: the data directory's allocated bytes delta, and the RSS delta (LMDB maps the
  file, so touched pages count in RSS too: they are page cache, not a second copy).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kv_tools.bench.drivers import StubDriver
from kv_tools.bench.keys import KEY_BYTES
from kv_tools.bench.loadgen import preload
from kv_tools.bench.servers import Servers, disk_bytes, rss_bytes
from kv_tools.bench.workload import GET, PUT, Op

FILL_BATCH = 1000
WARMUP_KEYS = 5000


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
