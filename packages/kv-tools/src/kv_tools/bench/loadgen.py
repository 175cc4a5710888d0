"""The closed-loop load generator.

``concurrency`` workers each send one request, wait for its answer, and send the next, until
the duration passes or ``max_ops`` operations have been issued. A request carries ``batch``
operations (1 = a unary call). Requests that start during the warm-up are not measured.
Latency is per request (every operation of a batch shares its request's latency), kept in
a log-linear histogram, for every request started in the measured window; throughput counts
the operations completed inside the window.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kv_tools.bench.drivers import Driver
from kv_tools.bench.histogram import Histogram
from kv_tools.bench.workload import OpStream, WorkloadSpec, preload_batches

PERCENTILES = (50.0, 95.0, 99.0, 99.9)


@dataclass(frozen=True)
class LoadSpec:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    concurrency: int = 16
    duration: float = 5.0
    warmup: float = 0.5
    max_ops: int = 50_000_000

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration <= 0 or self.warmup < 0 or self.max_ops < 1:
            raise ValueError("concurrency, duration and max_ops must be positive")


@dataclass
class LoadResult:
    ops: int
    requests: int
    errors: int
    elapsed: float
    histogram: Histogram
    error_kinds: dict[str, int] = field(default_factory=dict)
    client_cpu: float = 0.0
    """CPU the load generator's process used, in cores (1.0 = one core busy), warm-up included.
    Near 1.0 means the numbers measure the client, not the target."""
    server_cpu: float = 0.0
    """CPU the target's processes used, in cores (summed over processes; set by the suite)."""

    @property
    def ops_per_sec(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        """Request latency percentiles in milliseconds."""
        return {f"p{p:g}": self.histogram.percentile(p) / 1e6 for p in PERCENTILES} | {
            "mean": self.histogram.mean / 1e6,
            "max": self.histogram.max / 1e6,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "requests": self.requests,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "elapsed_s": round(self.elapsed, 4),
            "client_cpu": round(self.client_cpu, 3),
            "server_cpu": round(self.server_cpu, 3),
            "ops_per_sec": round(self.ops_per_sec, 1),
            "latency_ms": {k: round(v, 4) for k, v in self.latency_ms().items()},
            "histogram_ns": self.histogram.to_dict(),
        }


async def run_load(driver: Driver, spec: LoadSpec) -> LoadResult:
    """Drive ``driver`` closed-loop as ``spec`` says; the driver must be set up."""
    histogram = Histogram()
    kinds: Counter[str] = Counter()
    state = {"issued": 0, "ops": 0, "requests": 0, "errors": 0, "last_ns": 0}
    start = time.perf_counter_ns()
    cpu_start = time.process_time()
    measure_from = start + int(spec.warmup * 1e9)
    deadline = measure_from + int(spec.duration * 1e9)
    max_ops = spec.max_ops

    async def worker(index: int) -> None:
        stream = OpStream(spec.workload, index)
        clock = time.perf_counter_ns
        while state["issued"] < max_ops:
            began = clock()
            if began >= deadline:
                return
            ops = stream.next_batch()
            state["issued"] += len(ops)
            try:
                failed = await driver.run(ops)
            except Exception as exc:  # any failure is counted, the loop goes on
                kinds[type(exc).__name__] += 1
                failed = len(ops)
                error = True
            else:
                error = False
            done = clock()
            if error:
                await asyncio.sleep(0.001)  # a dead target must not turn into a busy loop
            if began < measure_from:
                continue
            # Latency and errors count for every request started in the window (a slow one
            # that ends after the deadline is still a data point); throughput counts only
            # operations completed inside it.
            state["errors"] += failed
            if not error:
                histogram.record(done - began)
            if done <= deadline:
                state["requests"] += 1
                state["ops"] += len(ops) - failed
                state["last_ns"] = max(state["last_ns"], done)

    await asyncio.gather(*(worker(i) for i in range(spec.concurrency)))
    end = time.perf_counter_ns()
    client_cpu = (time.process_time() - cpu_start) / max(1e-9, (end - start) / 1e9)
    # Stopped by max_ops: the window ends at the last completion, else at the deadline.
    window_end = deadline if end >= deadline else max(state["last_ns"], measure_from)
    elapsed = max(0.0, (window_end - measure_from) / 1e9)
    return LoadResult(
        ops=state["ops"],
        requests=state["requests"],
        errors=state["errors"],
        elapsed=elapsed,
        histogram=histogram,
        error_kinds=dict(kinds),
        client_cpu=client_cpu,
    )


async def preload(
    driver: Driver, keyspace: int, value_size: int, *, batch: int = 500, concurrency: int = 4
) -> int:
    """Create keys 0..keyspace-1 with batched puts (``batch`` 1 means unary puts).

    Returns how many puts failed.
    """
    batches = preload_batches(keyspace, value_size, batch)
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for ops in batches:  # the generator is shared: each batch goes to one worker
            failed += await driver.run(ops)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed
