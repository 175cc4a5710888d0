"""What a replicated cluster costs before any request: time to serve, and idle CPU per node.

Issue 10's targets for 3 nodes at RF 3 and the default partition count: every node reports
SERVING within 10 s of start, and an idle node uses under 5% of one core. Measured here on
real node processes, started as the suite starts them (``Servers.start_kv``):

* **start to SERVING**: from just before the first node is spawned until every node's gRPC
  health says SERVING (polled every 50 ms). A replicated node reports SERVING once every
  partition it hosts has known a leader, or after its own bound (10 s) if some have none.
* **start to every partition writable**: from the same moment until one put to a key of
  every partition has succeeded, through the SDK (``servers.wait_writable``). SERVING is the
  node's word; this is the client's.
* **idle CPU**: user + system time of each node process (``/proc/PID/stat``) over a window
  that begins a settle interval after every partition was written (the groups' quiet ticks),
  with no client connected; as % of one core, also in slices to show whether it settles.

The machine's 1-minute load average is recorded with each figure: other work shares the
CPUs, and an idle figure of a few per cent is only as good as the scheduler's fairness.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from kv_common.placement import DEFAULT_PARTITIONS
from kv_tools.bench.servers import Process, Servers, Unavailable, cpu_seconds, wait_writable

NODES = 3
REPLICATION_FACTOR = 3
SETTLE_SECONDS = 3.0
"""After serving: leaders heartbeat a few ticks before they sleep, followers about a second."""
SAMPLE_SECONDS = 5.0
"""The idle window is also reported in slices of this length, to show whether it settles."""
START_TARGET_SECONDS = 10.0
IDLE_TARGET_PERCENT = 5.0


async def measure_idle(
    servers: Servers, partitions: int | None, idle_seconds: float
) -> dict[str, Any]:
    """Start a 3-node RF=3 cluster, time it to SERVING, then watch it idle for
    ``idle_seconds`` (0 skips the idle window); the cluster is stopped before returning."""
    load_start = os.getloadavg()[0]
    began = time.monotonic()
    # start_kv blocks (it polls the processes); the event loop has nothing else to do.
    nodes = servers.start_kv(
        NODES, "lmdb", replication_factor=REPLICATION_FACTOR, partitions=partitions, writable=False
    )
    start_seconds = time.monotonic() - began
    result: dict[str, Any] = {
        "nodes": NODES,
        "replication_factor": REPLICATION_FACTOR,
        "partitions": partitions if partitions is not None else "default",
        "start_to_serving_s": round(start_seconds, 2),
        "loadavg_at_start": load_start,
    }
    try:
        count = partitions if partitions is not None else DEFAULT_PARTITIONS
        attempts, refusals = wait_writable([n.address for n in nodes], count)
        result["start_to_writable_s"] = round(time.monotonic() - began, 2)
        result["writable_attempts"] = attempts
        result["writes_refused"] = refusals
        if idle_seconds > 0:
            await asyncio.sleep(SETTLE_SECONDS)
            result.update(await watch_idle(nodes, idle_seconds))
    finally:
        for node in nodes:
            servers.stop(node)
    return result


async def watch_idle(processes: Sequence[Process], idle_seconds: float) -> dict[str, Any]:
    """CPU of each process over ``idle_seconds`` with no client, as % of one core, and the
    mean of the processes per slice; raises if one of them exits meanwhile."""
    load_idle = os.getloadavg()[0]
    before = {p.name: cpu_seconds(p.pid) for p in processes}
    window_start = time.monotonic()
    slices: list[float] = []  # the cluster's mean % of one core per process, per slice
    last, last_at = sum(before.values()), window_start
    while (left := window_start + idle_seconds - time.monotonic()) > 0:
        await asyncio.sleep(min(SAMPLE_SECONDS, left))
        now, now_at = sum(cpu_seconds(p.pid) for p in processes), time.monotonic()
        slices.append(round(100 * (now - last) / (now_at - last_at) / len(processes), 2))
        last, last_at = now, now_at
    window = time.monotonic() - window_start
    after = {p.name: cpu_seconds(p.pid) for p in processes}
    for process in processes:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited while idle: {process.log_tail()}")
    return {
        "idle_seconds": round(window, 1),
        "idle_cpu_percent": {
            name: round(100 * (after[name] - before[name]) / window, 2) for name in before
        },
        "idle_cpu_percent_per_node_by_slice": slices,
        "loadavg_idle_before": load_idle,
        "loadavg_idle_after": os.getloadavg()[0],
    }


async def measure_etcd_idle(servers: Servers, idle_seconds: float) -> dict[str, Any]:
    """The same window on the 3-member etcd that replicated kv is compared with."""
    load_start = os.getloadavg()[0]
    began = time.monotonic()
    members = servers.start_etcd(NODES)
    if isinstance(members, Unavailable):
        return {"cluster": f"etcd {NODES} members", "partitions": "-", "error": members.reason}
    healthy = round(time.monotonic() - began, 2)
    result: dict[str, Any] = {
        "cluster": f"etcd {NODES} members",
        "nodes": NODES,
        "replication_factor": NODES,
        "partitions": "-",
        "start_to_serving_s": healthy,
        "start_to_writable_s": healthy,
        "loadavg_at_start": load_start,
    }
    try:
        if idle_seconds > 0:
            await asyncio.sleep(SETTLE_SECONDS)
            result.update(await watch_idle(members, idle_seconds))
    finally:
        for member in members:
            servers.stop(member)
    return result


def verdicts(measured: dict[str, Any]) -> list[str]:
    """The issue's two targets against one measurement, as short lines."""
    lines = [f"start to SERVING {measured['start_to_serving_s']:.1f} s"]
    if "start_to_writable_s" in measured:
        start = measured["start_to_writable_s"]
        met = "met" if start < START_TARGET_SECONDS else "MISSED"
        lines.append(
            f"start to every partition writable {start:.1f} s "
            f"(target < {START_TARGET_SECONDS:g} s): {met}; "
            f"{measured['writes_refused']} refusals over {measured['writable_attempts']} tries"
        )
    for name, percent in measured.get("idle_cpu_percent", {}).items():
        met = "met" if percent < IDLE_TARGET_PERCENT else "MISSED"
        lines.append(
            f"{name} idle {percent:.1f}% of a core (target < {IDLE_TARGET_PERCENT:g}%): {met}"
        )
    return lines
