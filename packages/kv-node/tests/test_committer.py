from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

from kv_node.committer import GroupCommitter
from kv_node.store import PutOp, WriteOp, WriteResult
from kv_node.store.lmdb_store import LmdbStore


class SlowStore(LmdbStore):
    """An LMDB store whose commits take long enough for writes to pile up."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []
        self.release = threading.Event()

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        self.batches.append(len(ops))
        self.release.wait(timeout=5)
        return super().write(ops)


def test_concurrent_writes_share_transactions(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "db")

    async def scenario() -> list[WriteResult]:
        committer = GroupCommitter(store)
        first = asyncio.ensure_future(committer.write(PutOp(b"first", b"x")))
        await asyncio.sleep(0.05)  # the first commit is now in progress
        rest = [
            asyncio.ensure_future(committer.write(PutOp(f"k{i}".encode(), b"v"))) for i in range(50)
        ]
        await asyncio.sleep(0.05)
        store.release.set()
        return [await first, *await asyncio.gather(*rest)]

    results = asyncio.run(scenario())
    assert store.batches == [1, 50], "writes queued during a commit go out as one transaction"
    assert sorted(r.version for r in results) == list(range(1, 52))
    assert store.count() == 51
    store.close()


def test_group_size_is_bounded(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "db")
    store.release.set()

    async def scenario() -> None:
        committer = GroupCommitter(store, max_group=10)
        await asyncio.gather(*(committer.write(PutOp(f"k{i}".encode(), b"v")) for i in range(35)))

    asyncio.run(scenario())
    assert max(store.batches) <= 10 and sum(store.batches) == 35
    store.close()


def test_a_cancelled_caller_does_not_cancel_its_write(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "db")

    async def scenario() -> None:
        committer = GroupCommitter(store)
        task = asyncio.ensure_future(committer.write(PutOp(b"k", b"v")))
        await asyncio.sleep(0.05)
        task.cancel()
        store.release.set()
        await committer.drain()

    asyncio.run(scenario())
    assert store.get(b"k") == (b"v", 1)
    store.close()


def test_a_failed_commit_fails_every_write_in_it(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "db")
    store.release.set()
    store.close()  # every write now raises

    async def scenario() -> list[BaseException | WriteResult]:
        committer = GroupCommitter(store)
        return await asyncio.gather(
            *(committer.write(PutOp(f"k{i}".encode(), b"v")) for i in range(3)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, Exception) for o in outcomes)
