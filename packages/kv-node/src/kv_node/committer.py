"""Group commit: concurrent writes share one transaction and one fsync.

While one batch is being committed (in a worker thread, because fsync blocks),
new writes queue up; when it finishes, everything queued goes out as the next
batch. Under light load a write is committed at once; under heavy load the
batch grows by itself. A caller is answered only after its batch is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kv_node.store import Store, WriteOp, WriteResult

MAX_GROUP = 2048
"""Most writes in one transaction; bounds the latency a large backlog adds to its first write."""


class GroupCommitter:
    def __init__(self, store: Store, *, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max_group = max_group
        # One entry per caller (a single write, or a whole batch's writes): one future each.
        self._queue: list[tuple[Sequence[WriteOp], asyncio.Future[list[WriteResult]]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.transactions = 0

    async def write(self, op: WriteOp) -> WriteResult:
        (result,) = await self.write_many((op,))
        return result

    async def write_many(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if not self._store.durable:
            # Nothing to wait for: apply inline, which keeps the memory engine cheap.
            self.transactions += 1
            return self._store.write(ops)
        future: asyncio.Future[list[WriteResult]] = asyncio.get_running_loop().create_future()
        self._queue.append((ops, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # shield: a cancelled caller must not cancel a write that may already be committed.
        return await asyncio.shield(future)

    def _next_group(self) -> list[tuple[Sequence[WriteOp], asyncio.Future[list[WriteResult]]]]:
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
                results = await asyncio.to_thread(self._store.write, flat)
            except Exception as exc:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.transactions += 1
            start = 0
            for ops, future in group:
                if not future.done():
                    future.set_result(results[start : start + len(ops)])
                start += len(ops)

    async def drain(self) -> None:
        """Wait until every queued write is committed."""
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)
