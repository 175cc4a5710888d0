"""The benchmark suites: which configurations run, in which order, and which ratios matter.

Every configuration runs once per round, rounds are interleaved (round 1 of everything, then
round 2, ...) so slow drift of the machine hits all configurations alike, and each figure is
the median over rounds with the min-max spread. A ratio is computed inside each round (both
sides measured minutes apart at most, on the same servers) and then summarized the same way.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kv_tools.bench.drivers import (
    DEFAULT_TIMEOUT,
    Driver,
    DriverError,
    EtcdDriver,
    RedisDriver,
    SdkDriver,
    StubDriver,
)
from kv_tools.bench.histogram import Histogram
from kv_tools.bench.loadgen import PERCENTILES, LoadResult, LoadSpec, preload, run_load
from kv_tools.bench.servers import Process, ServerError, Servers, Unavailable, cpu_seconds
from kv_tools.bench.workload import WorkloadSpec

BATCH_CONCURRENCY = 16
"""Workers for batch configurations: 16 x 100 operations keeps a server busy without a queue
so deep that latency says nothing."""

HEADLINE_CONCURRENCY = 64
ETCD_MEMBERS = 3
"""The etcd that replicated kv is measured against: as many members as kv has nodes."""
PRELOAD_TIMEOUT = 60.0
"""Deadline of each preload request: the preload is not measured, and a 500-key batch
through a replicated cluster took longer than the drivers' 10 s."""


@dataclass(frozen=True)
class Config:
    target: str  # a key of TARGETS
    via: str  # sdk | sdk-nocoalesce | stub (one node) | etcd | etcd-leader | redis
    workload: str = "write"
    batch: int = 1
    concurrency: int = HEADLINE_CONCURRENCY
    distribution: str = "uniform"

    @property
    def label(self) -> str:
        mix = "put" if self.workload == "write" else f"ycsb-{self.workload}"
        dist = "" if self.distribution == "uniform" else f" {self.distribution}"
        size = "unary" if self.batch == 1 else f"batch{self.batch}"
        return f"{self.target} {self.via} {mix}{dist} {size} c{self.concurrency}"


@dataclass(frozen=True)
class Ratio:
    name: str
    numerator: str  # a Config label
    denominator: str
    target: float


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    start: Callable[[Servers], list[Process] | Unavailable]


def _one(process: Process | Unavailable) -> list[Process] | Unavailable:
    return process if isinstance(process, Unavailable) else [process]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "echo", "grpc.aio echo of kv.v1 (no store), own process", lambda s: [s.start_echo()]
        ),
        Target("kv1-memory", "kv, 1 node, memory engine", lambda s: s.start_kv(1, "memory")),
        Target("kv1-lmdb", "kv, 1 node, durable LMDB engine", lambda s: s.start_kv(1, "lmdb")),
        Target("kv3-lmdb", "kv, 3 nodes, LMDB, RF=1", lambda s: s.start_kv(3, "lmdb")),
        Target(
            "kv3-rf3",
            "kv, 3 nodes, LMDB, RF=3 (every partition a Raft group), default partitions",
            lambda s: s.start_kv(3, "lmdb", replication_factor=3),
        ),
        Target("etcd", "etcd, 1 member, default fsync", lambda s: s.start_etcd(1)),
        Target(
            "etcd3",
            f"etcd, {ETCD_MEMBERS} members, default fsync, calls round-robin over the members",
            lambda s: s.start_etcd(ETCD_MEMBERS),
        ),
        Target(
            "redis", "redis-server, no persistence", lambda s: _one(s.start_redis(durable=False))
        ),
        Target(
            "redis-aof",
            "redis-server, appendonly yes + appendfsync always",
            lambda s: _one(s.start_redis(durable=True)),
        ),
    )
}


def make_driver(
    config: Config, processes: Sequence[Process], timeout: float = DEFAULT_TIMEOUT
) -> Driver:
    first = processes[0].address
    if config.via in ("sdk", "sdk-nocoalesce"):
        addresses = ",".join(p.address for p in processes)
        return SdkDriver(addresses, timeout=timeout, coalesce=config.via == "sdk")
    if config.via == "stub":
        return StubDriver(first, timeout=timeout)
    if config.via in ("etcd", "etcd-leader"):
        members = [p.address for p in processes]
        return EtcdDriver(members, timeout=timeout, leader_only=config.via == "etcd-leader")
    if config.via == "redis":
        host, port = first.rsplit(":", 1)
        return RedisDriver(host, int(port))
    raise ValueError(f"unknown driver {config.via!r}")


def _headline(levels: Sequence[int]) -> int:
    return HEADLINE_CONCURRENCY if HEADLINE_CONCURRENCY in levels else max(levels)


def ratios(levels: Sequence[int], suite: str = "smoke") -> list[Ratio]:
    """The issues' targets of a suite, as ratios of two configurations' ops/s."""
    if suite == "replication":
        return replication_ratios(levels)
    if suite == "full":
        return single_node_ratios(levels) + replication_ratios(levels)
    return single_node_ratios(levels)


def replication_ratios(levels: Sequence[int]) -> list[Ratio]:
    """Issue 10: 3 nodes at RF=3 through the SDK against a 3-member etcd, same run, >= 1x."""
    c = _headline(levels)
    b = BATCH_CONCURRENCY
    rows = [
        (
            "unary puts",
            Config("kv3-rf3", "sdk", concurrency=c),
            Config("etcd3", "etcd", concurrency=c),
        ),
        (
            "batch-100 puts vs Txn of 100 puts",
            Config("kv3-rf3", "sdk", batch=100, concurrency=b),
            Config("etcd3", "etcd", batch=100, concurrency=b),
        ),
        (
            "linearizable gets vs linearizable Range",
            Config("kv3-rf3", "sdk", "C", concurrency=c),
            Config("etcd3", "etcd", "C", concurrency=c),
        ),
    ]
    return [
        Ratio(f"kv 3 nodes RF=3 / etcd {ETCD_MEMBERS} members: {what}", kv.label, etcd.label, 1.0)
        for what, kv, etcd in rows
    ]


def single_node_ratios(levels: Sequence[int]) -> list[Ratio]:
    """Issues 4-7: one durable node (and 3 nodes at RF=1) against the floor and the anchors."""
    c = _headline(levels)
    b = BATCH_CONCURRENCY
    kv_unary = Config("kv1-lmdb", "sdk", concurrency=c).label
    kv_batch = Config("kv1-lmdb", "sdk", batch=100, concurrency=b).label
    return [
        Ratio(
            "kv 1-node durable unary (SDK) / echo unary",
            kv_unary,
            Config("echo", "stub", concurrency=c).label,
            0.8,
        ),
        Ratio(
            "kv 1-node durable unary (SDK) / echo (SDK): same client path",
            kv_unary,
            Config("echo", "sdk", concurrency=c).label,
            0.8,
        ),
        Ratio(
            "kv 1-node durable batch-100 / echo batch-100",
            kv_batch,
            Config("echo", "stub", batch=100, concurrency=b).label,
            0.5,
        ),
        Ratio(
            "kv 1-node durable batch-100 / redis pipelined SET x100 (no persistence)",
            kv_batch,
            Config("redis", "redis", batch=100, concurrency=b).label,
            2.0,
        ),
        Ratio(
            "kv 1-node durable batch-100 / redis pipelined SET x100 (AOF fsync always)",
            kv_batch,
            Config("redis-aof", "redis", batch=100, concurrency=b).label,
            2.0,
        ),
        Ratio(
            "kv 1-node durable unary puts / etcd puts",
            kv_unary,
            Config("etcd", "etcd", concurrency=c).label,
            2.0,
        ),
        Ratio(
            "kv 3 nodes SDK direct / via one forwarding node",
            Config("kv3-lmdb", "sdk", concurrency=c).label,
            Config("kv3-lmdb", "stub", concurrency=c).label,
            1.5,
        ),
    ]


def replication_configs(c: int = HEADLINE_CONCURRENCY) -> list[Config]:
    """Issue 10's speed rows: 3 nodes at RF=3 through the SDK (single-key puts, batch-100
    puts, linearizable gets), beside RF=1 on 1 and 3 nodes and a 3-member etcd, all in the
    same run, at the same concurrency, keys and value sizes."""
    b = BATCH_CONCURRENCY
    plan: list[Config] = []
    for target in ("kv1-lmdb", "kv3-lmdb", "kv3-rf3"):
        plan += [
            Config(target, "sdk", concurrency=c),
            Config(target, "sdk", batch=100, concurrency=b),
            Config(target, "sdk", "C", concurrency=c),
        ]
    for via in ("etcd", "etcd-leader"):  # the second: etcd's best case, not in the ratios
        plan += [
            Config("etcd3", via, concurrency=c),
            Config("etcd3", via, batch=100, concurrency=b),
            Config("etcd3", via, "C", concurrency=c),
        ]
    return plan


def configs(suite: str, levels: Sequence[int]) -> list[Config]:
    """The configurations of a suite (``levels``: the concurrency sweep of the full suite)."""
    c = _headline(levels)
    b = BATCH_CONCURRENCY
    if suite == "replication":
        return replication_configs(c)
    core = [
        Config("echo", "stub", concurrency=c),
        Config("echo", "sdk", concurrency=c),
        Config("echo", "stub", batch=100, concurrency=b),
        Config("kv1-memory", "sdk", concurrency=c),
        Config("kv1-lmdb", "sdk", concurrency=c),
        Config("kv1-lmdb", "sdk-nocoalesce", concurrency=c),
        Config("kv1-lmdb", "sdk", batch=100, concurrency=b),
        Config("kv3-lmdb", "sdk", concurrency=c),
        Config("kv3-lmdb", "stub", concurrency=c),
        Config("etcd", "etcd", concurrency=c),
        Config("redis", "redis", batch=100, concurrency=b),
        Config("redis-aof", "redis", batch=100, concurrency=b),
    ]
    if suite == "smoke":
        return core
    if suite != "full":
        raise ValueError(f"unknown suite {suite!r}; choose smoke, full or replication")
    extra: list[Config] = []
    for level in sorted(set(levels)):
        extra += [
            Config("echo", "stub", concurrency=level),
            Config("kv1-lmdb", "sdk", concurrency=level),
            Config("etcd", "etcd", concurrency=level),
        ]
    extra += [
        # Where the unary time goes: the SDK (with and without request coalescing) against
        # the echo floor, and the node without the SDK.
        Config("echo", "sdk-nocoalesce", concurrency=c),
        Config("kv1-memory", "sdk-nocoalesce", concurrency=c),
        Config("kv3-lmdb", "sdk-nocoalesce", concurrency=c),
        Config("kv1-lmdb", "stub", concurrency=c),
        Config("kv1-memory", "sdk", batch=100, concurrency=b),
        Config("kv1-lmdb", "sdk", batch=10, concurrency=b),
        Config("kv3-lmdb", "sdk", batch=100, concurrency=b),
        Config("kv3-lmdb", "stub", batch=100, concurrency=b),
        Config("etcd", "etcd", batch=100, concurrency=b),
        Config("redis", "redis", concurrency=c),
        Config("redis-aof", "redis", concurrency=c),
    ]
    for workload in ("A", "B", "C"):
        extra += [
            Config("kv1-lmdb", "sdk", workload, concurrency=c, distribution="zipfian"),
            Config("kv3-lmdb", "sdk", workload, concurrency=c, distribution="zipfian"),
            Config("etcd", "etcd", workload, concurrency=c, distribution="zipfian"),
            Config("redis", "redis", workload, concurrency=c, distribution="zipfian"),
        ]
    extra += replication_configs(c)
    return list(dict.fromkeys(core + extra))  # unique, first occurrence order


@dataclass
class Aggregate:
    config: Config
    rounds: list[LoadResult] = field(default_factory=list)

    def _median(self, values: Sequence[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    def ops_per_sec(self) -> dict[str, float]:
        return self._median([r.ops_per_sec for r in self.rounds])

    def latency_ms(self) -> dict[str, float]:
        keys = [f"p{p:g}" for p in PERCENTILES]
        return {k: statistics.median([r.latency_ms()[k] for r in self.rounds]) for k in keys}

    def cpu(self) -> dict[str, float]:
        """Median CPU use in cores: the load generator's and the target's."""
        return {
            "client": statistics.median(r.client_cpu for r in self.rounds),
            "server": statistics.median(r.server_cpu for r in self.rounds),
        }

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.config.label,
            "target": self.config.target,
            "via": self.config.via,
            "workload": self.config.workload,
            "distribution": self.config.distribution,
            "batch": self.config.batch,
            "concurrency": self.config.concurrency,
            "ops_per_sec": {k: round(v, 1) for k, v in self.ops_per_sec().items()},
            "latency_ms_median": {k: round(v, 4) for k, v in self.latency_ms().items()},
            "cpu_cores_median": {k: round(v, 3) for k, v in self.cpu().items()},
            "errors": self.errors,
            "rounds": [r.to_dict() for r in self.rounds],
        }


@dataclass
class RatioResult:
    ratio: Ratio
    values: list[float]
    missing: str = ""

    def summary(self) -> dict[str, float] | None:
        if not self.values:
            return None
        return {
            "median": statistics.median(self.values),
            "min": min(self.values),
            "max": max(self.values),
        }

    def verdict(self) -> str:
        summary = self.summary()
        if summary is None:
            return f"not measured ({self.missing})"
        median = summary["median"]
        if median >= self.ratio.target:
            return f"met ({median:.2f}x >= {self.ratio.target:g}x)"
        short = (1 - median / self.ratio.target) * 100
        return f"MISSED by {short:.0f}% ({median:.2f}x < {self.ratio.target:g}x)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.ratio.name,
            "numerator": self.ratio.numerator,
            "denominator": self.ratio.denominator,
            "target": self.ratio.target,
            "per_round": [round(v, 4) for v in self.values],
            "summary": self.summary(),
            "verdict": self.verdict(),
        }


@dataclass
class SuiteResult:
    aggregates: dict[str, Aggregate]
    ratios: list[RatioResult]
    unavailable: dict[str, str]
    settings: dict[str, Any]
    memory: list[dict[str, Any]] = field(default_factory=list)
    cluster_memory: list[dict[str, Any]] = field(default_factory=list)
    idle: list[dict[str, Any]] = field(default_factory=list)


def compute_ratios(
    aggregates: dict[str, Aggregate], defs: Sequence[Ratio], unavailable: dict[str, str]
) -> list[RatioResult]:
    results = []
    for ratio in defs:
        top, bottom = aggregates.get(ratio.numerator), aggregates.get(ratio.denominator)
        if top is None or bottom is None:
            missing = [
                label
                for label, agg in ((ratio.numerator, top), (ratio.denominator, bottom))
                if agg is None
            ]
            why = "; ".join(
                f"{label}: {unavailable.get(label.split()[0], 'not in this suite')}"
                for label in missing
            )
            results.append(RatioResult(ratio, [], why))
            continue
        values = [
            a.ops_per_sec / b.ops_per_sec
            for a, b in zip(top.rounds, bottom.rounds, strict=False)
            if b.ops_per_sec > 0
        ]
        results.append(RatioResult(ratio, values, "" if values else "zero throughput"))
    return results


Log = Callable[[str], None]


async def _preload(driver: Driver, keyspace: int, value_size: int, log: Log, name: str) -> int:
    """Write the keyspace; returns how many puts failed (logged, not raised: the reads then
    run on the keys that exist, and the report says how many are missing)."""
    started = time.monotonic()
    failed = await preload(driver, keyspace, value_size, batch=100 if "etcd" in name else 500)
    log(f"  preloaded {keyspace} keys into {name} in {time.monotonic() - started:.1f}s")
    if failed:
        log(f"  {failed} of {keyspace} preload puts into {name} FAILED")
    return failed


async def run_suite(
    servers: Servers,
    plan: Sequence[Config],
    ratio_defs: Sequence[Ratio],
    *,
    rounds: int,
    duration: float,
    warmup: float,
    keyspace: int,
    value_size: int = 100,
    seed: int = 1,
    log: Log = print,
) -> SuiteResult:
    unavailable: dict[str, str] = {}
    started: dict[str, list[Process]] = {}
    for name in dict.fromkeys(c.target for c in plan):
        target = TARGETS[name]
        try:
            outcome = target.start(servers)
        except ServerError as exc:
            outcome = Unavailable(f"failed to start: {exc}")
        if isinstance(outcome, Unavailable):
            unavailable[name] = outcome.reason
            log(f"- {name}: UNAVAILABLE - {outcome.reason}")
        else:
            started[name] = outcome
            log(f"- {name}: {target.description} at {', '.join(p.address for p in outcome)}")
    runnable = [c for c in plan if c.target in started]

    # Keys must exist before read workloads run (the echo finds every key anyway). Puts that
    # failed are reported with the results; a target that cannot be loaded at all is skipped.
    preloaded: set[str] = set()
    preload_failed: dict[str, int] = {}
    for config in runnable:
        if config.workload != "write" and config.target != "echo":
            if config.target in preloaded:
                continue
            driver = make_driver(config, started[config.target], PRELOAD_TIMEOUT)
            try:
                await driver.setup()
                failed = await _preload(driver, keyspace, value_size, log, config.target)
            except DriverError as exc:
                unavailable[config.target] = f"preload failed: {exc}"
                log(f"- {config.target}: UNAVAILABLE - preload failed: {exc}")
            else:
                if failed:
                    preload_failed[config.target] = failed
            finally:
                await driver.close()
            preloaded.add(config.target)
    runnable = [c for c in runnable if c.target not in unavailable]

    aggregates = {c.label: Aggregate(c) for c in runnable}
    for round_number in range(1, rounds + 1):
        log(f"round {round_number}/{rounds}")
        for config in runnable:
            spec = LoadSpec(
                workload=WorkloadSpec(
                    config.workload,
                    keyspace=keyspace,
                    distribution=config.distribution,
                    value_size=value_size,
                    batch=config.batch,
                    seed=seed + round_number,
                ),
                concurrency=config.concurrency,
                duration=duration,
                warmup=warmup,
            )
            driver = make_driver(config, started[config.target])
            pids = [p.pid for p in started[config.target]]
            cpu_before, wall_before = sum(map(cpu_seconds, pids)), time.monotonic()
            try:
                await driver.setup()
                result = await run_load(driver, spec)
            except DriverError as exc:
                # The target stopped answering: a round of zero, counted as a failure.
                result = LoadResult(
                    ops=0,
                    requests=0,
                    errors=1,
                    elapsed=duration,
                    histogram=Histogram(),
                    error_kinds={f"DriverError: {exc}"[:300]: 1},
                )
            finally:
                await driver.close()
            wall = time.monotonic() - wall_before
            result.server_cpu = (sum(map(cpu_seconds, pids)) - cpu_before) / max(wall, 1e-9)
            aggregates[config.label].rounds.append(result)
            lat = result.latency_ms()
            errors = f" ERRORS {result.errors} {result.error_kinds}" if result.errors else ""
            log(
                f"  {config.label:<44} {result.ops_per_sec:>10,.0f} ops/s  "
                f"p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} ms  "
                f"cpu client {result.client_cpu:.2f} server {result.server_cpu:.2f}{errors}"
            )
            await asyncio.sleep(0.2)  # let the last round's stragglers settle
    return SuiteResult(
        aggregates=aggregates,
        ratios=compute_ratios(aggregates, ratio_defs, unavailable),
        unavailable=unavailable,
        settings={
            "rounds": rounds,
            "duration_s": duration,
            "warmup_s": warmup,
            "keyspace": keyspace,
            "value_size": value_size,
            "seed": seed,
            "preload_failed": preload_failed,
        },
    )
