"""Request coalescing: concurrent single-key calls to one node share a Batch call.

A lane per node lets ``max_in_flight`` calls go out at once, each as its own
unary RPC, so a lightly loaded client adds no latency. Calls that arrive while
the lane is full wait; whenever a call in flight finishes, everything waiting
(up to ``max_ops``) goes out as one ``Batch`` RPC, and each caller gets its own
result or error. Under load the node then pays gRPC's per-call cost once per
batch instead of once per key (TiKV's client batches commands the same way).

The async lane runs on the event loop; the sync lane serves threads: a thread
that finds the lane full parks, and when a call finishes, the first parked
thread is woken to send the whole waiting group and hand out the results.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from kv.v1 import kv_pb2
from kv_client._calls import Call
from kv_client.batch import DEFAULT_MAX_OPS, result_error
from kv_client.errors import DeadlineExceededError, KvError, error_from_rpc
from kv_client.errors import never_sent as _never_sent
from kv_common.cluster_map import Limits
from kv_common.limits import DEFAULT_MAX_BATCH_BYTES


@dataclass(frozen=True)
class CoalesceConfig:
    """How single-key calls are gathered into batches (``None`` turns coalescing off)."""

    max_in_flight: int = 2
    """Calls per node sent at once before later ones wait to be batched."""
    max_ops: int = DEFAULT_MAX_OPS
    """Most calls in one coalesced Batch; keep at or under the node's --max-batch-ops."""
    max_bytes: int = DEFAULT_MAX_BATCH_BYTES // 2
    """Most key+value bytes in one coalesced Batch; under the node's --max-batch-bytes."""


DEFAULT_COALESCE = CoalesceConfig()


def within(config: CoalesceConfig, limits: Limits) -> CoalesceConfig:
    """The config, capped so a coalesced batch never exceeds the node's published limits."""
    return replace(
        config,
        max_ops=min(config.max_ops, limits.max_batch_ops),
        max_bytes=min(config.max_bytes, limits.max_batch_bytes // 2),
    )


class AttemptFailed(Exception):
    """One attempt of a call failed; the retry loop decides what happens next."""

    def __init__(self, error: KvError, *, never_sent: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.never_sent = never_sent

    def located(self, call: Call[Any], node_id: str, address: str) -> KvError:
        """The error, its message prefixed with where the call went."""
        error = self.error
        error.message = f"{call.method} via node {node_id!r} at {address}: {error.message}"
        error.args = (error.message,)
        return error


def failed(exc: grpc.RpcError) -> AttemptFailed:
    return AttemptFailed(error_from_rpc(exc), never_sent=_never_sent(exc))


def operation_of(call: Call[Any]) -> kv_pb2.Operation:
    request = call.request
    if isinstance(request, kv_pb2.PutRequest):
        return kv_pb2.Operation(put=request)
    if isinstance(request, kv_pb2.GetRequest):
        return kv_pb2.Operation(get=request)
    return kv_pb2.Operation(delete=request)


def unpack(result: kv_pb2.OperationResult) -> Any:
    """The unary response inside a batch result, or AttemptFailed for an error result."""
    error = result_error(result)
    if error is not None:
        raise AttemptFailed(error, never_sent=False)
    return getattr(result, str(result.WhichOneof("result")))


def _size(operation: kv_pb2.Operation) -> int:
    return len(operation.put.key) + len(operation.put.value) if operation.HasField("put") else 64


def take_group(waiting: list[Any], config: CoalesceConfig) -> list[Any]:
    """Remove and return the next group: at most max_ops calls and max_bytes (at least one)."""
    total = 0
    count = 0
    for item in waiting[: config.max_ops]:
        total += _size(item.operation)
        if count and total > config.max_bytes:
            break
        count += 1
    group = waiting[:count]
    del waiting[:count]
    return group


BatchSender = Callable[[kv_pb2.BatchRequest, float], Awaitable[kv_pb2.BatchResponse]]
UnarySender = Callable[[], Awaitable[Any]]


@dataclass
class _Waiter:
    operation: kv_pb2.Operation
    deadline: float
    future: asyncio.Future[Any]


class AsyncLane:
    def __init__(self, config: CoalesceConfig, send_batch: BatchSender) -> None:
        self._config = config
        self._send_batch = send_batch
        self._in_flight = 0
        self._waiting: list[_Waiter] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self.batches_sent = 0

    async def submit(self, call: Call[Any], deadline: float, send_unary: UnarySender) -> Any:
        if self._in_flight < self._config.max_in_flight and not self._waiting:
            self._in_flight += 1
            try:
                return await send_unary()
            except grpc.RpcError as exc:
                raise failed(exc) from None
            finally:
                self._in_flight -= 1
                self._flush()
        waiter = _Waiter(operation_of(call), deadline, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            return unpack(
                await asyncio.wait_for(
                    asyncio.shield(waiter.future), max(0.0, deadline - time.monotonic())
                )
            )
        except TimeoutError:
            if waiter in self._waiting:  # never sent: safe for the caller to retry or give up
                self._waiting.remove(waiter)
                raise AttemptFailed(
                    DeadlineExceededError("deadline passed while waiting to be batched"),
                    never_sent=True,
                ) from None
            raise AttemptFailed(
                DeadlineExceededError("deadline passed during a coalesced batch"),
                never_sent=False,
            ) from None

    def _flush(self) -> None:
        while self._waiting and self._in_flight < self._config.max_in_flight:
            group = take_group(self._waiting, self._config)
            self._in_flight += 1
            task = asyncio.ensure_future(self._send(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[_Waiter]) -> None:
        try:
            timeout = max(0.001, max(w.deadline for w in group) - time.monotonic())
            request = kv_pb2.BatchRequest(operations=[w.operation for w in group])
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
            self._in_flight -= 1
            self._flush()


@dataclass
class _Parked:
    operation: kv_pb2.Operation
    deadline: float
    event: threading.Event = field(default_factory=threading.Event)
    result: kv_pb2.OperationResult | None = None
    error: AttemptFailed | None = None
    group: list[_Parked] | None = None
    """Set when this thread is chosen to send the group it heads."""
    taken: bool = False


SyncBatchSender = Callable[[kv_pb2.BatchRequest, float], kv_pb2.BatchResponse]


class SyncLane:
    def __init__(self, config: CoalesceConfig, send_batch: SyncBatchSender) -> None:
        self._config = config
        self._send_batch = send_batch
        self._lock = threading.Lock()
        self._in_flight = 0
        self._waiting: list[_Parked] = []
        self.batches_sent = 0

    def submit(self, call: Call[Any], deadline: float, send_unary: Callable[[], Any]) -> Any:
        with self._lock:
            direct = self._in_flight < self._config.max_in_flight and not self._waiting
            if direct:
                self._in_flight += 1
            else:
                parked = _Parked(operation_of(call), deadline)
                self._waiting.append(parked)
        if direct:
            try:
                return send_unary()
            except grpc.RpcError as exc:
                raise failed(exc) from None
            finally:
                self._release()
        if not parked.event.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                if not parked.taken:
                    self._waiting.remove(parked)
                    raise AttemptFailed(
                        DeadlineExceededError("deadline passed while waiting to be batched"),
                        never_sent=True,
                    )
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
            if not self._waiting:
                self._in_flight -= 1
                return
            group = take_group(self._waiting, self._config)
            for parked in group:
                parked.taken = True
        group[0].group = group
        group[0].event.set()

    def _lead(self, group: list[_Parked]) -> None:
        try:
            timeout = max(0.001, max(p.deadline for p in group) - time.monotonic())
            request = kv_pb2.BatchRequest(operations=[p.operation for p in group])
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
