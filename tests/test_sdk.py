"""The SDK against real in-process nodes: routing, errors, retries."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from kv_client import (
    AsyncClient,
    Client,
    ClusterMap,
    InvalidArgumentError,
    TooLargeError,
    UnavailableError,
    Versioned,
    WriteResult,
)
from kv_node.testing import InProcessCluster


def test_requests_go_straight_to_the_owner(cluster: InProcessCluster) -> None:
    with Client(cluster.addresses["a"]) as kv:
        for i in range(150):
            kv.put(f"key-{i}", f"value-{i}")
        for i in range(150):
            assert kv.get(f"key-{i}") == f"value-{i}".encode()
    for server in cluster.servers.values():
        assert server.node.requests_forwarded == 0
    for i in range(150):
        key = f"key-{i}".encode()
        assert cluster.servers[cluster.owner(key)].node.store.get(key) is not None


def test_surface(cluster: InProcessCluster) -> None:
    with Client([cluster.addresses["b"]]) as kv:
        assert kv.get("missing") is None and kv.get_versioned("missing") is None
        version = kv.put(b"bin\x00key", b"\x00\xff")
        assert kv.get_versioned(b"bin\x00key") == Versioned(b"\x00\xff", version)
        assert kv.put_if_absent("x", "1") == WriteResult(True, kv.get_versioned("x").version)  # type: ignore[union-attr]
        current = kv.get_versioned("x")
        assert current is not None
        assert kv.put_if_absent("x", "2") == WriteResult(False, current.version)
        swapped = kv.put_if_version("x", "3", current.version)
        assert swapped.succeeded and kv.get("x") == b"3"
        assert not kv.delete_if_version("x", current.version).succeeded
        assert kv.delete_if_version("x", swapped.version).succeeded
        assert kv.delete("x") is False
        kv.put("y", "1", timeout=2.0, metadata=[("x-request-id", "abc")])
        assert kv.delete("y") is True
        location = kv.locate("y")
        assert location.node_id == cluster.owner(b"y")
        assert location.address == cluster.addresses[location.node_id]
        assert [m.node_id for m in kv.cluster_map().members] == ["a", "b", "c"]
        assert kv.node_status(cluster.addresses["c"]).node_id == "c"


def test_bad_input_is_refused_before_the_network(cluster: InProcessCluster) -> None:
    with Client(cluster.addresses["a"]) as kv:
        with pytest.raises(InvalidArgumentError, match="empty"):
            kv.put("", "v")
        with pytest.raises(InvalidArgumentError, match="4096"):
            kv.get("k" * 4097)
        with pytest.raises(InvalidArgumentError, match="str or bytes"):
            kv.put(3, "v")  # type: ignore[arg-type]
        with pytest.raises(TooLargeError, match="the limit is 1024 bytes") as info:
            kv.put("k", "v" * 2000)
        assert not info.value.retriable


def test_a_stale_map_is_refreshed_transparently(cluster: InProcessCluster) -> None:
    with Client(cluster.addresses["a"]) as kv:
        real = kv.cluster_map()
        # Pretend the client knew an older placement: most keys now route wrongly.
        kv._maps.current = ClusterMap.build(
            epoch=0,
            members=real.members,
            partitions=real.partitions,
            replication_factor=1,
            vnodes=real.vnodes + 1,
        )
        for i in range(50):
            kv.put(f"moved-{i}", "v")
        assert kv.cluster_map().epoch == real.epoch
        for i in range(50):
            assert kv.get(f"moved-{i}") == b"v"
    refused = sum(
        s.node.metrics.registry.get_sample_value(
            "kv_requests_total", {"method": "Put", "outcome": "FAILED_PRECONDITION"}
        )
        or 0
        for s in cluster.servers.values()
    )
    assert refused >= 1, "some puts must have reached a wrong node and been refused"
    assert all(s.node.requests_forwarded == 0 for s in cluster.servers.values())


def test_down_owner_gives_unavailable_and_others_keep_working(
    cluster_with_c_down: InProcessCluster,
) -> None:
    cluster = cluster_with_c_down
    on_c, on_b = cluster.key_owned_by("c"), cluster.key_owned_by("b")
    with Client(cluster.addresses["a"], timeout=3.0) as kv:
        with pytest.raises(UnavailableError, match="node 'c'") as info:
            kv.get(on_c)
        assert info.value.retriable
        with pytest.raises(UnavailableError):
            kv.put(on_c, "v")
        kv.put(on_b, "v")
        assert kv.get(on_b) == b"v"


def test_bootstrap_skips_dead_seeds(cluster: InProcessCluster) -> None:
    with Client(["127.0.0.1:1", cluster.addresses["c"]]) as kv:
        kv.put("k", "v")
    with (
        Client("127.0.0.1:1", timeout=1.0) as kv,
        pytest.raises(UnavailableError, match="no node answered"),
    ):
        kv.get("k")


def test_async_client(cluster: InProcessCluster) -> None:
    async def scenario() -> None:
        async with AsyncClient(cluster.addresses["b"]) as kv:
            versions = await asyncio.gather(*(kv.put(f"a-{i}", str(i)) for i in range(100)))
            assert all(v > 0 for v in versions)
            values = await asyncio.gather(*(kv.get(f"a-{i}") for i in range(100)))
            assert values == [str(i).encode() for i in range(100)]
            created = await kv.put_if_absent("cas", "1")
            assert created.succeeded
            assert not (await kv.put_if_absent("cas", "2")).succeeded
            assert (await kv.put_if_version("cas", "3", created.version)).succeeded
            assert await kv.delete("cas") is True
            assert (await kv.get_versioned("cas")) is None
            assert (await kv.locate("cas")).node_id == cluster.owner(b"cas")

    asyncio.run(scenario())
    assert all(s.node.requests_forwarded == 0 for s in cluster.servers.values())


def test_results_are_plain_dataclasses() -> None:
    assert dataclasses.is_dataclass(WriteResult) and dataclasses.is_dataclass(Versioned)


def test_batch_api_groups_by_owner(cluster: InProcessCluster) -> None:
    from kv_client import batch

    with Client(cluster.addresses["a"], max_batch_ops=7) as kv:
        versions = kv.put_many({f"many-{i}": f"v{i}" for i in range(40)})
        assert len(versions) == 40
        assert all(v > 0 for v in versions)
        values = kv.get_many([f"many-{i}" for i in range(40)] + ["absent"])
        assert values == [f"v{i}".encode() for i in range(40)] + [None]
        current = kv.get_versioned("many-0")
        assert current is not None
        results = kv.batch(
            [
                batch.Put("many-0", "new", if_version=current.version),
                batch.Put("many-1", "x", if_version=0),
                batch.Delete("many-2"),
                batch.Get("many-2"),
                batch.Get("many-0"),
            ]
        )
        assert isinstance(results[0], WriteResult)
        assert results[0].succeeded
        assert isinstance(results[1], WriteResult)
        assert not results[1].succeeded
        assert isinstance(results[2], WriteResult)
        assert results[2].succeeded
        assert results[3] is None
        assert isinstance(results[4], Versioned)
        assert results[4].value == b"new"
    assert all(s.node.requests_forwarded == 0 for s in cluster.servers.values())


def test_batch_reports_per_operation_errors(cluster_with_c_down: InProcessCluster) -> None:
    from kv_client import batch

    cluster = cluster_with_c_down
    on_b, on_c = cluster.key_owned_by("b"), cluster.key_owned_by("c")
    with Client(cluster.addresses["a"], timeout=3.0) as kv:
        results = kv.batch([batch.Put(on_b, "1"), batch.Put(on_c, "2")])
        assert isinstance(results[0], WriteResult)
        assert isinstance(results[1], UnavailableError)
        with pytest.raises(UnavailableError):
            kv.get_many([on_b, on_c])


def test_async_batch_api(cluster: InProcessCluster) -> None:
    async def scenario() -> None:
        async with AsyncClient(cluster.addresses["c"], max_batch_ops=5) as kv:
            await kv.put_many([(f"am-{i}", str(i)) for i in range(23)])
            values = await kv.get_many([f"am-{i}" for i in range(23)])
            assert values == [str(i).encode() for i in range(23)]

    asyncio.run(scenario())


def test_batch_resends_what_a_stale_map_sent_to_the_wrong_node(cluster: InProcessCluster) -> None:
    with Client(cluster.addresses["a"]) as kv:
        real = kv.cluster_map()
        kv._maps.current = ClusterMap.build(
            epoch=0,
            members=real.members,
            partitions=real.partitions,
            replication_factor=1,
            vnodes=1,  # a very different ring: most keys route to the wrong node
        )
        versions = kv.put_many({f"stale-batch-{i}": "v" for i in range(60)})
        assert all(v > 0 for v in versions)
        assert kv.cluster_map().epoch == real.epoch
        assert kv.get_many([f"stale-batch-{i}" for i in range(60)]) == [b"v"] * 60
    assert all(s.node.requests_forwarded == 0 for s in cluster.servers.values())
