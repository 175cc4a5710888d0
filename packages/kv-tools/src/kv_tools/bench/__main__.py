"""``python -m kv_tools.bench``: run a benchmark suite against servers it starts itself."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kv_tools.bench.cli import parse_levels
from kv_tools.bench.idle import measure_etcd_idle, measure_idle, verdicts
from kv_tools.bench.memory import measure_cluster, measure_engine
from kv_tools.bench.report import machine, write_all
from kv_tools.bench.servers import Servers
from kv_tools.bench.suite import TARGETS, configs, ratios, run_suite

SUITES: dict[str, dict[str, Any]] = {
    # ~1-2 minutes on 2 cores: the headline configurations and every ratio, small memory fill.
    "smoke": {
        "duration": 1.5,
        "rounds": 3,
        "warmup": 0.3,
        "keyspace": 10_000,
        "memory": 50_000,
        "cluster_memory": 0,
        "idle": 0.0,
    },
    # The sweep, YCSB A/B/C, replication, the 1M-key memory figure and a replicated cluster's
    # start and idle cost.
    "full": {
        "duration": 5.0,
        "rounds": 3,
        "warmup": 1.0,
        "keyspace": 100_000,
        "memory": 1_000_000,
        "cluster_memory": 0,
        "idle": 30.0,
    },
    # ~8-12 minutes: issue 10's rows (RF=3 vs RF=1 vs a 3-member etcd), the start and idle
    # cost of both clusters, and their bytes per key with every copy counted.
    "replication": {
        "duration": 2.0,
        "rounds": 3,
        "warmup": 0.5,
        "keyspace": 10_000,
        "memory": 0,
        "cluster_memory": 20_000,
        "idle": 30.0,
    },
}
IDLE_PARTITIONS = (None, 256)
"""Partition counts of the start and idle measurement: the node's default (1,024), and fewer."""
CLUSTER_MEMORY_TARGETS = ("kv3-rf3", "etcd3")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kv_tools.bench",
        description="Benchmark kv against an echo floor, etcd and Redis (servers started here).",
    )
    p.add_argument("--suite", choices=tuple(SUITES), default="smoke")
    p.add_argument("--out", type=Path, required=True, help="directory for results.{json,md,png}")
    p.add_argument("--duration", type=float, help="measured seconds per configuration and round")
    p.add_argument("--rounds", type=int, help="rounds (each figure is a median over them)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each measurement")
    p.add_argument(
        "--concurrency",
        type=parse_levels,
        default=[1, 16, 64],
        help="concurrency levels of the full suite's sweep; 64 (or the largest) is the headline",
    )
    p.add_argument("--keyspace", type=int, help="keys the workloads choose from")
    p.add_argument(
        "--memory-keys", type=int, help="keys to fill for the bytes/key figure (0 skips it)"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only configurations whose label contains TEXT (repeatable)",
    )
    p.add_argument(
        "--cluster-memory-keys",
        type=int,
        help="keys to fill into 3 nodes RF=3 and a 3-member etcd for bytes/key (0 skips it)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        help="idle window of the 3-node RF=3 start and idle measurement (0 skips it)",
    )
    p.add_argument("--seed", type=int, default=1)
    return p


async def _idle(servers: Servers, seconds: float, etcd: bool) -> list[dict[str, Any]]:
    """Start a 3-node RF=3 cluster per partition count, time it to SERVING, watch it idle;
    then (``etcd``) the same window on a 3-member etcd."""
    measured = []
    for partitions in IDLE_PARTITIONS:
        shown = "default" if partitions is None else partitions
        print(f"idle: 3 nodes RF=3, {shown} partitions, {seconds:g} s idle")
        try:
            result = await measure_idle(servers, partitions, seconds)
        except Exception as exc:
            result = {"partitions": shown, "error": str(exc)}
        else:
            for line in verdicts(result):
                print(f"  {line}")
        measured.append(result)
    if etcd:
        print(f"idle: etcd 3 members, {seconds:g} s idle")
        try:
            result = await measure_etcd_idle(servers, seconds)
        except Exception as exc:
            result = {"cluster": "etcd 3 members", "partitions": "-", "error": str(exc)}
        print(f"  {result.get('idle_cpu_percent', result.get('error'))}")
        measured.append(result)
    return measured


async def _cluster_memory(servers: Servers, keys: int) -> list[dict[str, Any]]:
    measured = []
    for target in CLUSTER_MEMORY_TARGETS:
        print(f"memory: filling {target} with {keys:,} keys")
        try:
            result = await measure_cluster(servers, target, keys)
        except Exception as exc:
            result = {"target": target, "error": str(exc)}
        shown = {k: v for k, v in result.items() if k not in ("before", "after")}
        print(f"  {shown}")
        measured.append(result)
    return measured


async def _main(args: argparse.Namespace) -> int:
    preset = SUITES[args.suite]
    duration = args.duration or preset["duration"]
    rounds = args.rounds or preset["rounds"]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    keyspace = args.keyspace or preset["keyspace"]
    memory_keys = preset["memory"] if args.memory_keys is None else args.memory_keys
    idle_seconds = preset["idle"] if args.idle_seconds is None else args.idle_seconds
    cluster_keys = (
        preset["cluster_memory"] if args.cluster_memory_keys is None else args.cluster_memory_keys
    )
    plan = configs(args.suite, args.concurrency)
    if args.only:
        plan = [c for c in plan if any(text in c.label for text in args.only)]
    began = time.monotonic()
    loadavg_before = os.getloadavg()[0]
    info = machine()
    print(f"kv bench: suite {args.suite}, {len(plan)} configurations x {rounds} rounds")
    with Servers() as servers:
        # Before the load runs: nothing else of the bench is running while it idles.
        etcd_idle = args.suite == "replication"
        idle = await _idle(servers, idle_seconds, etcd_idle) if idle_seconds > 0 else []
        result = await run_suite(
            servers,
            plan,
            ratios(args.concurrency, args.suite),
            rounds=rounds,
            duration=duration,
            warmup=warmup,
            keyspace=keyspace,
            seed=args.seed,
        )
        # The measured targets are done: the memory figures start fresh clusters, alone.
        servers.stop_all()
        if cluster_keys > 0:
            result.cluster_memory = await _cluster_memory(servers, cluster_keys)
        if memory_keys > 0:
            for engine in ("memory", "lmdb"):
                print(f"memory: filling a {engine} node with {memory_keys:,} keys")
                try:
                    measured = await measure_engine(servers, engine, memory_keys)
                except Exception as exc:
                    measured = {"engine": engine, "error": str(exc)}
                print(f"  {measured}")
                result.memory.append(measured)
    result.idle = idle
    result.settings["loadavg_before"] = loadavg_before
    result.settings["loadavg_after"] = os.getloadavg()[0]
    result.settings["suite"] = args.suite
    result.settings["targets"] = {name: t.description for name, t in TARGETS.items()}
    result.settings["wall_seconds"] = round(time.monotonic() - began, 1)
    text, written = write_all(result, args.out, f"kv benchmark ({args.suite})", info)
    print()
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    errors = sum(a.errors for a in result.aggregates.values())
    if errors:
        print(f"kv bench: {errors} operations failed", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
