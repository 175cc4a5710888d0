"""Request coalescing, performed: the async and the threaded lane over one ``LaneState``.

The rules (who goes alone, who waits, which calls share a Batch) are pure and
live in ``kv_client.lane_state``. This module only waits: the async lane on the
event loop, the sync lane with threads. In the sync lane a thread that finds the
lane full parks; when a call finishes, the first parked thread of the next group
is woken to send the whole group and hand out the results.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from kv.v1 import kv_pb2
from kv_client._calls import Call
from kv_client.batch import result_error
from kv_client.errors import DeadlineExceededError, KvError, UnavailableError, error_from_rpc
from kv_client.errors import never_sent as _never_sent
from kv_client.lane_state import (
    DEFAULT_COALESCE,
    CoalesceConfig,
    LaneState,
    batch_of,
    take_group,
    within,
)

__all__ = [
    "DEFAULT_COALESCE",
    "AsyncLane",
    "AttemptFailed",
    "CoalesceConfig",
    "SyncLane",
    "failed",
    "take_group",
    "within",
]


class AttemptFailed(Exception):
    """One attempt of a call failed; the call's run decides what happens next."""

    def __init__(self, error: KvError, *, never_sent: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.never_sent = never_sent


def failed(exc: grpc.RpcError) -> AttemptFailed:
    return AttemptFailed(error_from_rpc(exc), never_sent=_never_sent(exc))


def unpack(result: kv_pb2.OperationResult) -> Any:
    """The unary response inside a batch result, or AttemptFailed for an error result."""
    error = result_error(result)
    if error is not None:
        raise AttemptFailed(error, never_sent=False)
    return getattr(result, str(result.WhichOneof("result")))


def _expired(never_sent: bool) -> AttemptFailed:
    if never_sent:  # it was still waiting: safe for the caller to retry or give up
        return AttemptFailed(
            DeadlineExceededError("deadline passed while waiting to be batched"), never_sent=True
        )
    return AttemptFailed(
        DeadlineExceededError("deadline passed during a coalesced batch"), never_sent=False
    )


def _stuck() -> AttemptFailed:
    return AttemptFailed(
        UnavailableError("not sent: the lane to this node is behind a call it has not answered"),
        never_sent=True,
    )


BatchSender = Callable[[kv_pb2.BatchRequest, float], Awaitable[kv_pb2.BatchResponse]]
UnarySender = Callable[[], Awaitable[Any]]


@dataclass(eq=False)
class _Waiter:
    operation: kv_pb2.Operation
    deadline: float
    future: asyncio.Future[kv_pb2.OperationResult]


class AsyncLane:
    def __init__(self, config: CoalesceConfig, send_batch: BatchSender) -> None:
        self._state: LaneState[_Waiter] = LaneState(config)
        self._send_batch = send_batch
        self._tasks: set[asyncio.Future[None]] = set()
        self.batches_sent = 0

    async def submit(
        self,
        call: Call[Any],
        deadline: float,
        send_unary: UnarySender,
        *,
        patience: float | None = None,
    ) -> Any:
        """``patience``: a call still queued then (the lane is stuck behind an unanswered
        call to this node) leaves the lane unsent, to be sent elsewhere (``_stuck``)."""
        waiter = _Waiter(call.operation(), deadline, asyncio.get_running_loop().create_future())
        if self._state.arrive(waiter):
            try:
                return await send_unary()
            except grpc.RpcError as exc:
                raise failed(exc) from None
            finally:
                self._dispatch(self._state.finished())
        try:
            if patience is not None and patience < deadline:
                try:
                    result = await asyncio.wait_for(
                        asyncio.shield(waiter.future), max(0.0, patience - time.monotonic())
                    )
                    return unpack(result)
                except TimeoutError:
                    if self._state.give_up(waiter):
                        raise _stuck() from None
            result = await asyncio.wait_for(
                asyncio.shield(waiter.future), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise _expired(self._state.give_up(waiter)) from None
        except asyncio.CancelledError:
            self._state.give_up(waiter)  # abandoned by its run: never send it
            raise
        return unpack(result)

    def _dispatch(self, group: list[_Waiter]) -> None:
        if group:
            task = asyncio.ensure_future(self._send(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[_Waiter]) -> None:
        try:
            request, timeout = batch_of(group, time.monotonic())
            try:
                response = await self._send_batch(request, timeout)
            except grpc.RpcError as exc:
                for waiter in group:
                    if not waiter.future.done():
                        waiter.future.set_exception(failed(exc))
                return
            self.batches_sent += 1
            for waiter, result in zip(group, response.results, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(result)
        finally:
            self._dispatch(self._state.finished())


@dataclass(eq=False)
class _Parked:
    operation: kv_pb2.Operation
    deadline: float
    event: threading.Event = field(default_factory=threading.Event)
    result: kv_pb2.OperationResult | None = None
    error: AttemptFailed | None = None
    group: list[_Parked] | None = None
    """Set when this thread is chosen to send the group it heads."""


SyncBatchSender = Callable[[kv_pb2.BatchRequest, float], kv_pb2.BatchResponse]


class SyncLane:
    def __init__(self, config: CoalesceConfig, send_batch: SyncBatchSender) -> None:
        self._state: LaneState[_Parked] = LaneState(config)
        self._send_batch = send_batch
        self._lock = threading.Lock()
        self.batches_sent = 0

    def submit(self, call: Call[Any], deadline: float, send_unary: Callable[[], Any]) -> Any:
        parked = _Parked(call.operation(), deadline)
        with self._lock:
            direct = self._state.arrive(parked)
        if direct:
            try:
                return send_unary()
            except grpc.RpcError as exc:
                raise failed(exc) from None
            finally:
                self._release()
        if not parked.event.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                if self._state.give_up(parked):
                    raise _expired(never_sent=True)
            parked.event.wait()  # taken: the sender always answers within its own timeout
        if parked.group is not None:
            self._lead(parked.group)
        if parked.error is not None:
            raise parked.error
        assert parked.result is not None
        return unpack(parked.result)

    def _release(self) -> None:
        """A call finished: hand the lane's slot to the next waiting group, if any."""
        with self._lock:
            group = self._state.finished()
        if group:
            group[0].group = group
            group[0].event.set()

    def _lead(self, group: list[_Parked]) -> None:
        try:
            request, timeout = batch_of(group, time.monotonic())
            try:
                response = self._send_batch(request, timeout)
                self.batches_sent += 1
                for parked, result in zip(group, response.results, strict=True):
                    parked.result = result
            except grpc.RpcError as exc:
                for parked in group:
                    parked.error = failed(exc)
            for parked in group[1:]:
                parked.event.set()
        finally:
            group[0].group = None
            self._release()
