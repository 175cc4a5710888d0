"""The group committer, on a real LMDB store whose commits the test holds open.

Synchronisation is by events: the test waits until a commit has started and
releases it when it has queued what it wants; no test sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import pytest

from kv_node.committer import GroupCommitter
from kv_node.store import GetOp, Op, Outcome, PutOp, ReadResult, WriteOp, WriteResult
from kv_node.store.lmdb_store import LmdbStore

EVENT_TIMEOUT = 10.0
"""Only a hung test waits this long; a passing one never does."""
SMALL_MAP = 1 << 20
"""A map so small that a 2 MiB value fails its transaction with MDB_MAP_FULL."""
TOO_BIG = b"x" * (2 << 20)

T = TypeVar("T")


class GatedStore(LmdbStore):
    """An LMDB store whose commits wait at a gate the test opens."""

    def __init__(self, path: Path, *, map_size: int = SMALL_MAP) -> None:
        super().__init__(path, map_size=map_size)
        self.batches: list[list[bytes]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        self.batches.append([op.key for op in ops])
        self.entered.set()
        if not self.gate.wait(EVENT_TIMEOUT):
            raise AssertionError("the test never opened the gate")
        return super().apply(ops)

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        raise AssertionError("the committer commits through apply")


@pytest.fixture
def store(tmp_path: Path) -> GatedStore:
    return GatedStore(tmp_path / "db")


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, EVENT_TIMEOUT))


async def commit_in_progress(committer: GroupCommitter, store: GatedStore) -> asyncio.Task[Any]:
    """Start one write and return once its commit is held at the gate."""
    first = asyncio.ensure_future(committer.write(PutOp(b"first", b"x")))
    await asyncio.to_thread(store.entered.wait, EVENT_TIMEOUT)
    assert store.entered.is_set()
    return first


async def enqueued(*calls: Coroutine[Any, Any, T]) -> list[asyncio.Task[T]]:
    """Start ``calls`` and let each run up to its wait for a commit."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)  # one loop turn: every task has queued its ops (no time passes)
    return tasks


def test_concurrent_writes_share_transactions(store: GatedStore) -> None:
    async def scenario() -> list[WriteResult]:
        committer = GroupCommitter(store)
        first = await commit_in_progress(committer, store)
        rest = await enqueued(*(committer.write(PutOp(f"k{i}".encode(), b"v")) for i in range(50)))
        store.gate.set()
        return [await first, *await asyncio.gather(*rest)]

    results = run(scenario())
    assert [len(b) for b in store.batches] == [1, 50], "writes queued during a commit share one"
    assert sorted(r.version for r in results) == list(range(1, 52))
    assert store.count() == 51
    store.close()


def test_group_size_is_bounded(store: GatedStore) -> None:
    store.gate.set()

    async def scenario() -> None:
        committer = GroupCommitter(store, max_group=10)
        await asyncio.gather(*(committer.write(PutOp(f"k{i}".encode(), b"v")) for i in range(35)))

    run(scenario())
    assert max(len(b) for b in store.batches) <= 10
    assert sum(len(b) for b in store.batches) == 35
    store.close()


def test_a_cancelled_caller_does_not_cancel_its_write(store: GatedStore) -> None:
    async def scenario() -> None:
        committer = GroupCommitter(store)
        first = await commit_in_progress(committer, store)
        first.cancel()
        store.gate.set()
        await committer.drain()
        assert first.cancelled()

    run(scenario())
    assert store.get(b"first") == (b"x", 1)
    store.close()


def test_a_failing_caller_does_not_fail_the_others_in_its_group(store: GatedStore) -> None:
    """The engine rejects one caller's op (MDB_MAP_FULL); every other caller still commits."""

    async def scenario() -> list[WriteResult | BaseException]:
        committer = GroupCommitter(store)
        first = await commit_in_progress(committer, store)
        group = await enqueued(
            committer.write(PutOp(b"before", b"1")),
            committer.write_many([PutOp(b"same-call", b"2"), PutOp(b"huge", TOO_BIG)]),
            committer.write(PutOp(b"after", b"3")),
        )
        store.gate.set()
        outcomes: list[Any] = await asyncio.gather(first, *group, return_exceptions=True)
        return outcomes

    first, before, poisoned, after = run(scenario())
    assert isinstance(poisoned, lmdb.MapFullError)
    assert isinstance(before, WriteResult) and before.succeeded
    assert isinstance(after, WriteResult) and after.succeeded
    assert isinstance(first, WriteResult) and first.version == 1
    assert store.get(b"before") == (b"1", before.version)
    assert store.get(b"after") == (b"3", after.version)
    assert store.get(b"same-call") is None, "a failing caller's ops are all-or-nothing"
    assert store.get(b"huge") is None
    assert (before.version, after.version) == (2, 3), "callers keep their order on the retry"
    store.close()


def test_a_commit_that_fails_alone_fails_only_its_caller(store: GatedStore) -> None:
    store.gate.set()

    async def scenario() -> tuple[BaseException | WriteResult, WriteResult]:
        committer = GroupCommitter(store)
        (failed,) = await asyncio.gather(
            committer.write(PutOp(b"huge", TOO_BIG)), return_exceptions=True
        )
        return failed, await committer.write(PutOp(b"next", b"v"))

    failed, following = run(scenario())
    assert isinstance(failed, lmdb.MapFullError)
    assert following == WriteResult(succeeded=True, found=False, version=1)
    assert store.revision == 1 and store.count() == 1
    store.close()


def test_ops_on_one_key_apply_in_order_and_reads_see_the_writes_before_them(
    store: GatedStore,
) -> None:
    async def scenario() -> tuple[list[Outcome], list[Outcome]]:
        committer = GroupCommitter(store)
        first = await commit_in_progress(committer, store)
        one_call, next_call = await enqueued(
            committer.apply(
                [GetOp(b"k"), PutOp(b"k", b"1"), GetOp(b"k"), PutOp(b"k", b"2"), GetOp(b"k")]
            ),
            committer.apply([GetOp(b"k"), PutOp(b"k", b"3", if_version=3), GetOp(b"k")]),
        )
        store.gate.set()
        await first
        return await one_call, await next_call

    mine, theirs = run(scenario())
    assert store.batches[1] == [b"k"] * 8, "both calls went out as one transaction"
    assert mine == [
        ReadResult(None, 0),
        WriteResult(succeeded=True, found=False, version=2),
        ReadResult(b"1", 2),
        WriteResult(succeeded=True, found=True, version=3),
        ReadResult(b"2", 3),
    ]
    assert theirs == [
        ReadResult(b"2", 3),
        WriteResult(succeeded=True, found=True, version=4),
        ReadResult(b"3", 4),
    ]
    store.close()


def test_a_caller_is_answered_only_after_its_commit_returns(store: GatedStore) -> None:
    """With the engine's synced commits (test_store), this is what makes an ack mean on disk."""

    async def scenario() -> tuple[bool, WriteResult]:
        committer = GroupCommitter(store)
        first = await commit_in_progress(committer, store)
        await asyncio.sleep(0)
        answered_before_commit = first.done()
        store.gate.set()
        return answered_before_commit, await first

    answered_before_commit, result = run(scenario())
    assert not answered_before_commit
    assert result == WriteResult(succeeded=True, found=False, version=1)
    store.close()
