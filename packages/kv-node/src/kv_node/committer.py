"""Group commit: concurrent writes share one transaction and one fsync.

While one batch is being committed (in a worker thread, because fsync blocks),
new writes queue up; when it finishes, everything queued goes out as the next
batch. Under light load a write is committed at once; under heavy load the
batch grows by itself. A caller is answered only after its batch is durable.

What a caller can rely on:

- **Order.** A caller's ops are applied in the order given, contiguously, and
  callers in the order they called. A ``GetOp`` among them sees exactly the
  ops before it: everything earlier in its own call, and the earlier callers'
  ops in the same transaction (all already acknowledged or about to be, in
  that order). ``Store.get`` outside the committer sees committed state only.
- **Isolation.** One caller's failure never fails another's write. If a
  group's transaction raises, nothing of it was applied (``Store.apply`` is
  all-or-nothing), and each caller's ops are committed again on their own:
  the callers whose ops succeed alone are answered normally, and only a caller
  whose own ops fail gets the exception. That costs one transaction per
  caller, but only on the failure path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

from kv_node.store import Op, Outcome, Store, WriteOp, WriteResult

MAX_GROUP = 2048
"""Most writes in one transaction; bounds the latency a large backlog adds to its first write."""

_Member = tuple[Sequence[Op], "asyncio.Future[list[Outcome]]"]


class GroupCommitter:
    def __init__(self, store: Store, *, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max_group = max_group
        # One entry per caller (a single write, or a whole batch's ops): one future each.
        self._queue: list[_Member] = []
        self._runner: asyncio.Task[None] | None = None
        self.transactions = 0

    async def write(self, op: WriteOp) -> WriteResult:
        (result,) = await self.write_many((op,))
        return result

    async def write_many(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        return cast(list[WriteResult], await self.apply(ops))

    async def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` in order (reads see the writes before them); one outcome per op."""
        if not self._store.durable:
            # Nothing to wait for: apply inline, which keeps the memory engine cheap.
            self.transactions += 1
            return self._store.apply(ops)
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._queue.append((ops, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # shield: a cancelled caller must not cancel a write that may already be committed.
        return await asyncio.shield(future)

    def _next_group(self) -> list[_Member]:
        count = 0
        taken = 0
        for ops, _ in self._queue:
            if taken and count + len(ops) > self._max_group:
                break
            count += len(ops)
            taken += 1
        group = self._queue[:taken]
        del self._queue[:taken]
        return group

    async def _run(self) -> None:
        while self._queue:
            group = self._next_group()
            flat = [op for ops, _ in group for op in ops]
            try:
                results = await asyncio.to_thread(self._store.apply, flat)
            except Exception as exc:
                if len(group) == 1:
                    _settle(group[0][1], exc)
                else:
                    await self._commit_alone(group)
                continue
            self.transactions += 1
            start = 0
            for ops, future in group:
                _settle(future, results[start : start + len(ops)])
                start += len(ops)

    async def _commit_alone(self, group: list[_Member]) -> None:
        """After a failed group: each caller's ops in a transaction of their own, in order."""
        for ops, future in group:
            try:
                results = await asyncio.to_thread(self._store.apply, ops)
            except Exception as exc:
                _settle(future, exc)
                continue
            self.transactions += 1
            _settle(future, results)

    async def drain(self) -> None:
        """Wait until every queued write is committed."""
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)


def _settle(future: asyncio.Future[list[Outcome]], outcome: list[Outcome] | Exception) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
