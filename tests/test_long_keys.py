"""Keys up to the API's limit on a real LMDB node, mixed with honest writers (issue 8, defect 1).

Before long keys were mapped, every key over LMDB's 511 bytes failed with
UNKNOWN, and the failure aborted the whole group commit, so a third to a half
of the honest writers sharing the group failed too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Cluster
from kv_client import AsyncClient, Client
from kv_common.limits import MAX_KEY_BYTES

WRITERS = 8
WRITES_PER_WRITER = 40
CALL_TIMEOUT = 10.0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, ["n1"])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def long_key(writer: int, i: int) -> str:
    # Same 495-byte prefix for all: the keys differ only in the digested part.
    return "L" * 600 + f"-{writer}-{i}-".ljust(MAX_KEY_BYTES - 600, "x")


def test_long_and_short_keys_share_group_commits_and_survive_restart(node: Cluster) -> None:
    address = node.nodes["n1"].address

    async def writer(kv: AsyncClient, number: int) -> None:
        for i in range(WRITES_PER_WRITER):
            key = long_key(number, i) if number % 2 else f"short-{number}-{i}"
            await kv.put(key, f"{number}/{i}", timeout=CALL_TIMEOUT)

    async def load() -> None:
        async with AsyncClient(address) as kv:
            await asyncio.gather(*(writer(kv, n) for n in range(WRITERS)))

    asyncio.run(load())  # any failed write raises here
    n1 = node.nodes["n1"]
    assert n1.terminate() == 0, n1.output()
    n1.start()
    n1.wait_ready()
    with Client(address, timeout=CALL_TIMEOUT) as kv:
        for number in range(WRITERS):
            for i in (0, WRITES_PER_WRITER - 1):
                key = long_key(number, i) if number % 2 else f"short-{number}-{i}"
                assert kv.get(key) == f"{number}/{i}".encode()
        assert kv.node_status(address).keys_stored == WRITERS * WRITES_PER_WRITER
