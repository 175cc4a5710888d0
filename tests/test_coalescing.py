"""Concurrent single-key calls from one client share Batch calls, transparently."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from kv_client import AsyncClient, Client, CoalesceConfig, UnavailableError
from kv_node.testing import InProcessCluster


def batched_operations(cluster: InProcessCluster) -> float:
    return sum(
        s.node.metrics.registry.get_sample_value("kv_batch_operations_total") or 0.0
        for s in cluster.servers.values()
    )


def test_async_calls_under_load_are_coalesced(cluster: InProcessCluster) -> None:
    async def scenario() -> None:
        async with AsyncClient(cluster.addresses["a"], coalesce=CoalesceConfig(max_ops=50)) as kv:
            versions = await asyncio.gather(*(kv.put(f"c-{i}", f"v{i}") for i in range(300)))
            assert all(v > 0 for v in versions)
            values = await asyncio.gather(*(kv.get(f"c-{i}") for i in range(300)))
            assert values == [f"v{i}".encode() for i in range(300)]
            conditional = await asyncio.gather(
                *(kv.put_if_absent(f"c-{i}", "x") for i in range(50))
            )
            assert not any(r.succeeded for r in conditional)
            assert sum(lane.batches_sent for lane in kv._lanes.values()) > 0

    asyncio.run(scenario())
    assert batched_operations(cluster) > 0
    assert all(s.node.requests_forwarded == 0 for s in cluster.servers.values())


def test_light_load_is_sent_at_once_without_batching(cluster: InProcessCluster) -> None:
    async def scenario() -> None:
        async with AsyncClient(cluster.addresses["a"]) as kv:
            for i in range(20):
                await kv.put(f"s-{i}", "v")
                assert await kv.get(f"s-{i}") == b"v"
            assert sum(lane.batches_sent for lane in kv._lanes.values()) == 0

    asyncio.run(scenario())
    assert batched_operations(cluster) == 0


def test_coalescing_can_be_turned_off(cluster: InProcessCluster) -> None:
    async def scenario() -> None:
        async with AsyncClient(cluster.addresses["a"], coalesce=None) as kv:
            await asyncio.gather(*(kv.put(f"o-{i}", "v") for i in range(100)))

    asyncio.run(scenario())
    assert batched_operations(cluster) == 0


def test_each_coalesced_caller_gets_its_own_error(cluster_with_c_down: InProcessCluster) -> None:
    cluster = cluster_with_c_down
    on_b = [cluster.key_owned_by("b", prefix=f"ok{i}") for i in range(20)]
    on_c = [cluster.key_owned_by("c", prefix=f"down{i}") for i in range(20)]

    async def scenario() -> list[object]:
        async with AsyncClient(
            cluster.addresses["a"], timeout=3.0, coalesce=CoalesceConfig(max_ops=50)
        ) as kv:
            return await asyncio.gather(
                *(kv.put(k, "v") for k in on_b + on_c), return_exceptions=True
            )

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, int) for o in outcomes[:20])
    assert all(isinstance(o, UnavailableError) for o in outcomes[20:])


def test_threads_of_one_sync_client_are_coalesced(cluster: InProcessCluster) -> None:
    with Client(cluster.addresses["b"], coalesce=CoalesceConfig(max_in_flight=1, max_ops=50)) as kv:

        def work(worker: int) -> list[bytes | None]:
            for i in range(40):
                kv.put(f"t{worker}-{i}", f"{worker}:{i}")
            return [kv.get(f"t{worker}-{i}") for i in range(40)]

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(work, range(16)))
        for worker, values in enumerate(results):
            assert values == [f"{worker}:{i}".encode() for i in range(40)]
        assert sum(lane.batches_sent for lane in kv._lanes.values()) > 0
    assert batched_operations(cluster) > 0


@pytest.mark.parametrize("in_flight", [1, 3])
def test_sync_coalescing_under_errors(
    cluster_with_c_down: InProcessCluster, in_flight: int
) -> None:
    cluster = cluster_with_c_down
    keys = [cluster.key_owned_by("c", prefix=f"x{i}") for i in range(12)]
    with Client(
        cluster.addresses["a"],
        timeout=2.0,
        coalesce=CoalesceConfig(max_in_flight=in_flight, max_ops=50),
    ) as kv:

        def attempt(key: bytes) -> str:
            try:
                kv.get(key)
            except UnavailableError:
                return "unavailable"
            return "ok"

        with ThreadPoolExecutor(max_workers=12) as pool:
            assert set(pool.map(attempt, keys)) == {"unavailable"}


def test_clients_size_batches_by_the_limits_nodes_publish(cluster: InProcessCluster) -> None:
    """The in-process nodes allow 50 operations and 16 KiB per batch; defaults allow more."""

    async def scenario() -> None:
        async with AsyncClient(cluster.addresses["a"]) as kv:
            limits = (await kv.cluster_map()).limits
            assert (limits.max_batch_ops, limits.max_batch_bytes) == (50, 16 * 1024)
            assert limits.max_value_bytes == 1024
            versions = await asyncio.gather(*(kv.put(f"lim-{i}", "v" * 900) for i in range(400)))
            assert all(v > 0 for v in versions)

    asyncio.run(scenario())
    assert batched_operations(cluster) > 0, "the load was coalesced"
    with Client(cluster.addresses["b"]) as kv:
        kv.put_many({f"many-{i}": "v" * 900 for i in range(120)})
        assert kv.get_many([f"many-{i}" for i in range(120)]) == [b"v" * 900] * 120
