"""The SDK against real in-process nodes: routing straight to owners, and the batch API.

The README's promises (retries, deadlines, errors, coalescing), run through both
clients, are in test_sdk_promises.py.
"""

from __future__ import annotations

import asyncio

import pytest

from kv_client import (
    AsyncClient,
    Client,
    ClusterMap,
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
        store = cluster.servers[cluster.owner(key)].node.store
        assert store is not None and store.get(key) is not None


def test_bootstrap_skips_dead_seeds(cluster: InProcessCluster) -> None:
    with Client(["127.0.0.1:1", cluster.addresses["c"]]) as kv:
        kv.put("k", "v")
    with (
        Client("127.0.0.1:1", timeout=1.0) as kv,
        pytest.raises(UnavailableError, match="no node answered"),
    ):
        kv.get("k")


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
