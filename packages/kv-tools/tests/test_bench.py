"""Tests for kv_tools.bench: the parts whose numbers the benchmark report rests on."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
from collections import Counter

import pytest

from kv_tools.bench.cli import add_arguments, run_from_args
from kv_tools.bench.drivers import SdkDriver, StubDriver
from kv_tools.bench.echo_server import start_echo
from kv_tools.bench.histogram import Histogram
from kv_tools.bench.keys import ScrambledZipfian, Uniform, Zipfian, key_bytes, zeta
from kv_tools.bench.loadgen import LoadSpec, run_load
from kv_tools.bench.suite import Aggregate, Config, compute_ratios, configs, ratios
from kv_tools.bench.workload import GET, PUT, OpStream, WorkloadSpec, preload_batches

# --- zipfian ----------------------------------------------------------------------------


def test_zeta_tail_approximation_matches_the_exact_sum() -> None:
    n = 200_000
    exact = sum(i**-0.99 for i in range(1, n + 1))
    assert zeta(n, 0.99) == pytest.approx(exact, rel=1e-9)


def test_zipfian_is_seeded_and_in_range() -> None:
    a = Zipfian(1000, random.Random(7))
    b = Zipfian(1000, random.Random(7))
    draws = [a.next() for _ in range(5000)]
    assert draws == [b.next() for _ in range(5000)]
    assert min(draws) >= 0
    assert max(draws) < 1000


def test_zipfian_frequencies_follow_the_zipf_law() -> None:
    n, draws = 10_000, 200_000
    zipf = Zipfian(n, random.Random(42))
    counts = Counter(zipf.next() for _ in range(draws))
    # Ranks 0 and 1 are exact in Gray's method; compare with a 5-sigma binomial margin.
    for rank in (0, 1):
        p = zipf.probability(rank)
        sigma = (draws * p * (1 - p)) ** 0.5
        assert abs(counts[rank] - draws * p) < 5 * sigma
    # The head as a whole: the top 1% of ranks carry about half of the draws at theta 0.99.
    top = sum(counts[r] for r in range(n // 100)) / draws
    expected = sum(zipf.probability(r) for r in range(n // 100))
    assert top == pytest.approx(expected, abs=0.03)
    assert 0.45 < top < 0.6
    # Popularity falls with rank.
    assert counts[0] > counts[1] > counts[10] > counts[1000]


def test_scrambled_zipfian_keeps_the_skew_but_scatters_the_hot_keys() -> None:
    n, draws = 10_000, 100_000
    scrambled = ScrambledZipfian(n, random.Random(3))
    counts = Counter(scrambled.next() for _ in range(draws))
    assert all(0 <= k < n for k in counts)
    hottest = [k for k, _ in counts.most_common(5)]
    assert counts.most_common(1)[0][1] / draws > 0.08  # rank 0 is ~9.8% of draws
    assert hottest != [0, 1, 2, 3, 4]


def test_uniform_covers_the_keyspace_evenly() -> None:
    uniform = Uniform(10, random.Random(5))
    counts = Counter(uniform.next() for _ in range(50_000))
    assert set(counts) == set(range(10))
    assert max(counts.values()) / min(counts.values()) < 1.1


def test_keys_are_16_bytes() -> None:
    assert key_bytes(0) == b"k000000000000000"
    assert len(key_bytes(999_999_999)) == 16


# --- histogram --------------------------------------------------------------------------


def test_histogram_small_values_are_exact() -> None:
    h = Histogram()
    for v in range(1, 101):
        h.record(v)
    assert h.count == 100
    assert h.percentile(50) == 50
    assert h.percentile(99) == 99
    assert h.percentile(100) == 100
    assert h.percentile(0) == 1
    assert h.mean == pytest.approx(50.5)


def test_histogram_percentiles_within_bucket_precision() -> None:
    rng = random.Random(11)
    values = [int(rng.lognormvariate(13, 1.2)) for _ in range(20_000)]  # ~0.4 ms median in ns
    h = Histogram()
    for v in values:
        h.record(v)
    ordered = sorted(values)
    for p in (50, 95, 99, 99.9):
        exact = ordered[math.ceil(round(len(ordered) * p / 100, 6)) - 1]
        assert h.percentile(p) == pytest.approx(exact, rel=0.01), p
    assert h.min == ordered[0]
    assert h.max == ordered[-1]
    assert h.percentile(100) == ordered[-1]


def test_histogram_known_set_and_nearest_rank() -> None:
    h = Histogram()
    for v in [10_000] * 990 + [1_000_000] * 9 + [50_000_000]:
        h.record(v)
    assert h.percentile(50) == pytest.approx(10_000, rel=0.01)
    assert h.percentile(99) == pytest.approx(10_000, rel=0.01)  # rank 990 is still 10 us
    assert h.percentile(99.9) == pytest.approx(1_000_000, rel=0.01)  # rank 999
    assert h.percentile(100) == 50_000_000


def test_histogram_merge_and_roundtrip() -> None:
    a, b = Histogram(), Histogram()
    for v in range(0, 5000, 7):
        a.record(v)
    for v in range(100_000, 200_000, 13):
        b.record(v)
    merged = Histogram.from_dict(a.to_dict())
    merged.merge(b)
    assert merged.count == a.count + b.count
    assert merged.min == 0
    assert merged.max == b.max
    assert merged.percentile(5) < 5000 < merged.percentile(10)  # a holds 715 of 8408 values
    assert Histogram.from_dict(merged.to_dict()).percentile(75) == merged.percentile(75)


def test_histogram_memory_is_bounded() -> None:
    h = Histogram()
    for shift in range(40):
        h.record(1 << shift)
        h.record((1 << shift) + 12345)
    assert len(h.to_dict()["buckets"]) <= 80
    assert len(h._counts) < 6000


# --- workloads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workload", "reads"), [("write", 0.0), ("A", 0.5), ("B", 0.95), ("C", 1.0)]
)
def test_workload_mix_proportions(workload: str, reads: float) -> None:
    stream = OpStream(WorkloadSpec(workload, keyspace=1000, value_size=100), worker=3)
    ops = [stream.next_op() for _ in range(20_000)]
    read_share = sum(op.kind == GET for op in ops) / len(ops)
    assert read_share == pytest.approx(reads, abs=0.015)
    puts = [op for op in ops if op.kind == PUT]
    assert all(len(op.value) == 100 for op in puts)
    assert all(len(op.key) == 16 for op in ops)


def test_workload_batches_and_seeding() -> None:
    spec = WorkloadSpec("A", keyspace=100, distribution="zipfian", batch=10, seed=9)
    first = OpStream(spec, 0).next_batch()
    assert len(first) == 10
    assert first == OpStream(spec, 0).next_batch()
    assert first != OpStream(spec, 1).next_batch()


def test_preload_covers_the_keyspace_once() -> None:
    batches = list(preload_batches(1234, 100, batch=500))
    assert [len(b) for b in batches] == [500, 500, 234]
    keys = [op.key for b in batches for op in b]
    assert len(set(keys)) == 1234
    assert keys[0] == key_bytes(0)
    assert keys[-1] == key_bytes(1233)


def test_workload_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        WorkloadSpec("Z")


# --- ratios -----------------------------------------------------------------------------


def test_ratio_definitions_name_configurations_of_the_suites() -> None:
    for suite in ("smoke", "full", "replication"):
        labels = {c.label for c in configs(suite, [1, 16, 64])}
        for ratio in ratios([1, 16, 64], suite):
            assert ratio.numerator in labels
            assert ratio.denominator in labels


def test_ratios_are_taken_round_by_round() -> None:
    from kv_tools.bench.loadgen import LoadResult

    def result(ops: int) -> LoadResult:
        return LoadResult(ops=ops, requests=ops, errors=0, elapsed=1.0, histogram=Histogram())

    kv, echo = Config("kv1-lmdb", "sdk"), Config("echo", "stub")
    aggregates = {
        kv.label: Aggregate(kv, [result(400), result(900), result(500)]),
        echo.label: Aggregate(echo, [result(1000), result(1000), result(1000)]),
    }
    (r,) = compute_ratios(aggregates, [ratios([64])[0]], {})
    assert r.values == [0.4, 0.9, 0.5]
    assert r.summary() == {"median": 0.5, "min": 0.4, "max": 0.9}
    assert r.verdict().startswith("MISSED by 38%")
    etcd_ratio = next(r for r in ratios([64]) if "etcd" in r.name)
    (absent,) = compute_ratios({}, [etcd_ratio], {"etcd": "etcd not found"})
    assert absent.summary() is None
    assert "etcd not found" in absent.verdict()


# --- end to end against the in-process echo server --------------------------------------


async def _echo_run(spec: LoadSpec, via: str) -> tuple[int, int, float]:
    server, address = await start_echo("127.0.0.1:0")
    try:
        driver = (
            StubDriver(address)
            if via == "stub"
            else SdkDriver(address, coalesce=via != "sdk-nocoalesce")
        )
        await driver.setup()
        try:
            result = await run_load(driver, spec)
        finally:
            await driver.close()
    finally:
        await server.stop(None)
    # Requests that started in the window but ended after it have a latency, not throughput.
    assert result.requests <= result.histogram.count <= result.requests + spec.concurrency
    return result.ops, result.errors, result.histogram.percentile(50)


@pytest.mark.parametrize(
    ("via", "workload", "batch"),
    [
        ("stub", "A", 1),
        ("stub", "write", 20),
        ("sdk", "B", 1),
        ("sdk", "A", 10),
        ("sdk-nocoalesce", "write", 1),
    ],
)
def test_load_generator_against_echo(via: str, workload: str, batch: int) -> None:
    spec = LoadSpec(
        WorkloadSpec(workload, keyspace=1000, distribution="zipfian", batch=batch),
        concurrency=8,
        duration=0.8,
        warmup=0.2,
    )
    ops, errors, p50 = asyncio.run(_echo_run(spec, via))
    assert ops > 0
    assert ops % batch == 0
    assert errors == 0
    assert 0 < p50 < 1e9  # nanoseconds: a loopback echo answers within a second


def test_load_generator_stops_at_max_ops() -> None:
    spec = LoadSpec(WorkloadSpec(keyspace=100), concurrency=4, duration=30, warmup=0, max_ops=200)
    ops, errors, _ = asyncio.run(_echo_run(spec, "stub"))
    assert errors == 0
    assert 200 <= ops < 200 + 4  # each worker may have one request in flight at the bound


def test_load_generator_counts_errors_of_a_dead_target() -> None:
    async def run() -> tuple[int, int]:
        server, address = await start_echo("127.0.0.1:0")
        driver = StubDriver(address, timeout=0.2)
        await driver.setup()
        await server.stop(None)
        try:
            result = await run_load(driver, LoadSpec(concurrency=2, duration=0.5, warmup=0))
        finally:
            await driver.close()
        return result.ops, result.errors

    ops, errors = asyncio.run(run())
    assert ops == 0
    assert errors > 0


def test_kv_bench_command_against_echo(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    async def serve_and_run() -> int:
        server, address = await start_echo("127.0.0.1:0")
        args = parser.parse_args(
            [
                *("--addr", address, "--workload", "C", "--concurrency", "2,4"),
                *("--duration", "0.4", "--warmup", "0.1", "--keyspace", "50", "--via", "node"),
            ]
        )
        try:
            return await asyncio.to_thread(run_from_args, args)
        finally:
            await server.stop(None)

    assert asyncio.run(serve_and_run()) == 0
    out = capsys.readouterr().out
    assert "cluster node ycsb-C unary c2" in out
    assert "cluster node ycsb-C unary c4" in out


def test_missing_redis_is_reported_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from kv_tools.bench import servers

    assert servers.find_binary("kv-bench-no-such-binary") is None
    monkeypatch.setattr(servers, "find_binary", lambda name: None)
    with servers.Servers() as running:
        redis = running.start_redis(durable=True)
        assert running.processes == []
    assert isinstance(redis, servers.Unavailable)
    assert "redis-server" in redis.reason


# --- replication: the RF=3 scenario -------------------------------------------------------


def test_one_key_lands_in_every_partition() -> None:
    from kv_common.placement import partition_of
    from kv_tools.bench.servers import key_per_partition

    for partitions in (16, 4096):
        keys = key_per_partition(partitions)
        assert sorted(keys) == list(range(partitions))
        assert all(partition_of(key, partitions) == p for p, key in keys.items())


def test_replication_suite_compares_rf3_with_rf1_and_etcd() -> None:
    labels = [c.label for c in configs("replication", [64])]
    for target in ("kv1-lmdb", "kv3-lmdb", "kv3-rf3"):
        assert f"{target} sdk put unary c64" in labels
        assert f"{target} sdk put batch100 c16" in labels
        assert f"{target} sdk ycsb-C unary c64" in labels  # linearizable gets
    assert "etcd3 etcd put unary c64" in labels
    assert "etcd3 etcd put batch100 c16" in labels
    assert "etcd3 etcd ycsb-C unary c64" in labels
    full = {c.label for c in configs("full", [1, 16, 64])}
    assert set(labels) <= full
    # The smoke suite stays short: an RF=3 cluster takes seconds to elect its leaders.
    assert not any(c.target == "kv3-rf3" for c in configs("smoke", [64]))


def test_idle_report_shows_both_start_times_and_every_node() -> None:
    from kv_tools.bench.idle import verdicts
    from kv_tools.bench.report import idle_table

    measured = {
        "nodes": 3,
        "replication_factor": 3,
        "partitions": "default",
        "start_to_serving_s": 5.95,
        "start_to_writable_s": 41.9,
        "writable_attempts": 30,
        "writes_refused": 900,
        "loadavg_at_start": 8.8,
        "idle_seconds": 30.0,
        "idle_cpu_percent": {"kv-lmdb-rf3-n1": 1.2, "kv-lmdb-rf3-n2": 6.5},
        "idle_cpu_percent_per_node_by_slice": [1.3, 1.0],
        "loadavg_idle_before": 9.5,
        "loadavg_idle_after": 8.0,
    }
    table = idle_table([measured, {"partitions": 256, "error": "3 partitions refuse"}])
    row = table.splitlines()[2]
    assert "| 5.95 | 41.9 | 8.8 |" in row
    assert "n1 1.2, n2 6.5" in row and "1.3, 1.0" in row and "9.5 / 8.0" in row
    assert "error: 3 partitions refuse" in table.splitlines()[3]
    lines = verdicts(measured)
    assert any("writable 41.9 s" in line and "MISSED" in line for line in lines)
    assert any("n1 idle 1.2%" in line and "met" in line for line in lines)
    assert any("n2 idle 6.5%" in line and "MISSED" in line for line in lines)


REPLICATED_TEST_PARTITIONS = 16


def test_replicated_cluster_starts_serves_every_partition_and_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real node processes: the RF=3 flags reach the nodes, every partition takes a write
    before the measurement, and every process is stopped afterwards."""
    from kv_tools.bench import idle, servers

    monkeypatch.setattr(idle, "SETTLE_SECONDS", 0.1)
    with servers.Servers() as running:
        measured = asyncio.run(idle.measure_idle(running, REPLICATED_TEST_PARTITIONS, 0.5))
        assert running.processes == []
        assert running.root is not None
        logs = [log.read_text() for log in running.root.rglob("server.log")]
    assert len(logs) == 3
    for text in logs:
        assert f"{REPLICATED_TEST_PARTITIONS} partitions, replication factor 3" in text
    assert 0 < measured["start_to_serving_s"] <= measured["start_to_writable_s"]
    assert measured["writable_attempts"] >= 1
    assert len(measured["idle_cpu_percent"]) == 3
    assert all(v >= 0 for v in measured["idle_cpu_percent"].values())
