"""The asyncio client: the same surface as ``Client``, awaitable.

Create and use it inside one running event loop (gRPC's aio channels belong
to the loop that made them). A thin driver over the same pure core as ``Client``;
only the waiting differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_client import _calls, batch
from kv_client._calls import Call, Key, Value
from kv_client._transport import (
    CHANNEL_OPTIONS,
    DEFAULT_TIMEOUT,
    Metadata,
    node_status,
    routed_metadata,
    seed_list,
)
from kv_client.batch import Operation, Result
from kv_client.call_run import Action, CallRun, Done, NeedMap, Send, Wait
from kv_client.coalesce import (
    DEFAULT_COALESCE,
    AsyncLane,
    AttemptFailed,
    CoalesceConfig,
    failed,
    within,
)
from kv_client.errors import (
    DeadlineExceededError,
    KvError,
    UnavailableError,
    error_from_rpc,
    never_sent,
)
from kv_client.leaders import Leaders
from kv_client.map_cache import Fetch, MapCache, MapFetch, Use
from kv_client.retry import RetryPolicy
from kv_client.types import Location, NodeStatus, Versioned, WriteResult
from kv_common.cluster_map import ClusterMap, ClusterMapError

Out = TypeVar("Out")


class AsyncClient:
    """A routing asyncio client; see ``kv_client.Client`` for the semantics."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_batch_ops: int = batch.DEFAULT_MAX_OPS,
        coalesce: CoalesceConfig | None = DEFAULT_COALESCE,
    ) -> None:
        self._max_batch_ops = max_batch_ops
        self._coalesce = coalesce
        self._lanes: dict[tuple[str, int], AsyncLane] = {}
        self._seeds = seed_list(addresses)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._leaders = Leaders()
        self._maps = MapCache(self._seeds)
        self._fetching: asyncio.Future[ClusterMap | KvError] | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._kv: dict[str, kv_pb2_grpc.KVServiceAsyncStub] = {}
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        channels = list(self._channels.values())
        self._channels.clear()
        self._kv.clear()
        for channel in channels:
            await channel.close()

    async def get(
        self, key: Key, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> bytes | None:
        """The value of ``key``, or None when it does not exist."""
        return await self._run(_calls.get(key), timeout, metadata)

    async def get_versioned(
        self, key: Key, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Versioned | None:
        """The value of ``key`` with its version, or None when it does not exist."""
        return await self._run(_calls.get_versioned(key), timeout, metadata)

    async def put(
        self,
        key: Key,
        value: Value,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> int:
        """Write ``value``; returns the key's new version."""
        return await self._run(_calls.put(key, value), timeout, metadata)

    async def put_if_version(
        self,
        key: Key,
        value: Value,
        version: int,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> WriteResult:
        """Write only if the key's current version is ``version`` (compare-and-swap)."""
        return await self._run(_calls.put_if_version(key, value, version), timeout, metadata)

    async def put_if_absent(
        self,
        key: Key,
        value: Value,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> WriteResult:
        """Write only if the key does not exist."""
        return await self._run(_calls.put_if_version(key, value, 0), timeout, metadata)

    async def delete(
        self, key: Key, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> bool:
        """Delete ``key``; returns whether it existed."""
        return await self._run(_calls.delete(key), timeout, metadata)

    async def delete_if_version(
        self,
        key: Key,
        version: int,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> WriteResult:
        """Delete only if the key's current version is ``version``."""
        return await self._run(_calls.delete_if_version(key, version), timeout, metadata)

    async def cluster_map(
        self, *, refresh: bool = False, timeout: float | None = None
    ) -> ClusterMap:
        """The cluster map this client routes by (fetched now if ``refresh``)."""
        deadline = time.monotonic() + (timeout or self._timeout)
        return await self._cluster_map(refresh=refresh, deadline=deadline)

    async def locate(self, key: Key, *, timeout: float | None = None) -> Location:
        """Which partition and node own ``key``, by the current map."""
        raw = _calls.encode_key(key)
        return (await self.cluster_map(timeout=timeout)).locate(raw)

    async def node_status(self, address: str, *, timeout: float | None = None) -> NodeStatus:
        """Status of the node at ``address`` (no routing)."""
        stub = cluster_pb2_grpc.ClusterServiceStub(self._channel(address))
        try:
            response = await stub.GetNodeStatus(
                cluster_pb2.GetNodeStatusRequest(), timeout=timeout or self._timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return node_status(response)

    async def batch(
        self,
        operations: Sequence[Operation],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[Result]:
        """Run many operations, grouped per owner into parallel Batch calls.

        Returns one result per operation, in order: ``Versioned | None`` for a
        ``Get``, ``WriteResult`` for a ``Put``/``Delete``, or the ``KvError`` it
        failed with. Not atomic as a whole; operations on one key apply in order.
        """
        budget = self._timeout if timeout is None else timeout
        run = batch.BatchRun(
            operations,
            max_ops=self._max_batch_ops,
            budget=budget,
            now=time.monotonic(),
            leaders=self._leaders,
        )
        cluster_map: ClusterMap | None = None
        while True:
            cluster_map = await self._cluster_map(
                refresh=cluster_map is not None,
                deadline=run.deadline,
                stale_epoch=cluster_map.epoch if cluster_map is not None else None,
            )
            chunks = run.chunks(cluster_map, time.monotonic())
            md = routed_metadata(cluster_map, metadata)
            timeout = run.remaining(time.monotonic())
            responses = await asyncio.gather(
                *(
                    self._stub(c.address).Batch(c.request, timeout=timeout, metadata=md)
                    for c in chunks
                ),
                return_exceptions=True,
            )
            for chunk, response in zip(chunks, responses, strict=True):
                if isinstance(response, grpc.RpcError):
                    run.record(
                        chunk,
                        error_from_rpc(response),
                        never_sent=never_sent(response),
                        now=time.monotonic(),
                    )
                elif isinstance(response, BaseException):
                    raise response
                else:
                    run.record(chunk, response)
            if not run.another_round(time.monotonic()):
                return run.results
            await asyncio.sleep(run.pause)

    async def get_many(
        self,
        keys: Sequence[Key],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[bytes | None]:
        """Values of ``keys`` in order (None where missing); raises the first error."""
        results = await self.batch([batch.Get(k) for k in keys], timeout=timeout, metadata=metadata)
        return batch.values(results)

    async def put_many(
        self,
        items: Mapping[Key, Value] | Sequence[tuple[Key, Value]],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[int]:
        """Write many keys; returns their new versions in order; raises the first error."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        results = await self.batch(
            [batch.Put(k, v) for k, v in pairs], timeout=timeout, metadata=metadata
        )
        return batch.versions(results)

    # -- machinery: perform what the pure core decides

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        """The one place a channel is made (a test double may wrap it)."""
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._closed:
            raise KvError("the client is closed")
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._open_channel(address)
        return channel

    def _stub(self, address: str) -> kv_pb2_grpc.KVServiceAsyncStub:
        stub = self._kv.get(address)
        if stub is None:
            stub = self._kv[address] = kv_pb2_grpc.KVServiceStub(self._channel(address))
        return stub

    async def _cluster_map(
        self, *, refresh: bool, deadline: float, stale_epoch: int | None = None
    ) -> ClusterMap:
        step = self._maps.want(refresh=refresh, deadline=deadline, stale_epoch=stale_epoch)
        if isinstance(step, Use):
            return step.cluster_map
        if isinstance(step, Fetch):
            # A task, so that a caller cancelled mid-fetch does not cancel it for the others.
            self._fetching = asyncio.ensure_future(self._fetch(step.fetch))
        fetching = self._fetching
        assert fetching is not None, "a fetch is in flight whenever the cache says Join"
        try:
            outcome = await asyncio.wait_for(
                asyncio.shield(fetching), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise DeadlineExceededError(
                "deadline passed while the cluster map was fetched"
            ) from None
        if isinstance(outcome, KvError):
            raise outcome
        return outcome

    async def _fetch(self, fetch: MapFetch) -> ClusterMap | KvError:
        outcome: ClusterMap | KvError = UnavailableError("the cluster map fetch was interrupted")
        try:
            outcome = await self._fetch_from_nodes(fetch)
        finally:
            outcome = self._maps.finish(outcome)
        return outcome

    async def _fetch_from_nodes(self, fetch: MapFetch) -> ClusterMap | KvError:
        while (step := fetch.next(time.monotonic())) is not None:
            stub = cluster_pb2_grpc.ClusterServiceStub(self._channel(step.address))
            try:
                response = await stub.GetClusterMap(
                    cluster_pb2.GetClusterMapRequest(include_partitions=True), timeout=step.timeout
                )
                return ClusterMap.from_proto(response.cluster_map)
            except grpc.RpcError as exc:
                fetch.failed(step.address, error_from_rpc(exc).message)
            except ClusterMapError as exc:
                fetch.failed(step.address, str(exc))
        return fetch.error()

    async def _attempt(self, call: Call[Any], send: Send) -> Any:
        method: Any = getattr(self._stub(send.address), call.method)

        async def unary() -> Any:
            timeout = max(0.0, send.deadline - time.monotonic())
            return await method(call.request, timeout=timeout, metadata=send.metadata)

        if send.lane is None:
            try:
                return await unary()
            except grpc.RpcError as exc:
                raise failed(exc) from None
        return await self._lane(send).submit(call, send.deadline, unary, patience=send.patience)

    def _lane(self, send: Send) -> AsyncLane:
        assert send.lane is not None and self._coalesce is not None
        lane = self._lanes.get(send.lane)
        if lane is None:
            stub = self._stub(send.address)

            async def send_batch(
                request: kv_pb2.BatchRequest, timeout: float
            ) -> kv_pb2.BatchResponse:
                return await stub.Batch(request, timeout=timeout, metadata=send.metadata)

            config = within(self._coalesce, send.limits)
            lane = self._lanes[send.lane] = AsyncLane(config, send_batch)
        return lane

    async def _perform(self, run: CallRun[Any], call: Call[Any], send: Send) -> Action:
        """One attempt; at its patience (replicated) the run hears that it is slow, and an
        attempt the run abandons is cancelled by the timeout here."""
        try:
            if send.patience is None:
                return run.replied(await self._attempt(call, send))
            loop = asyncio.get_running_loop()
            delay = send.patience - time.monotonic()
            if send.abandon:
                try:
                    async with asyncio.timeout(delay):
                        response = await self._attempt(call, send)
                except TimeoutError:
                    action = run.slow(time.monotonic())
                    assert action is not None, "an abandonable attempt is abandoned"
                    return action
                return run.replied(response)
            # Not abandoned (it may not be sent twice): only marks its node suspect, so that
            # other calls go elsewhere while this one waits for its answer.
            timer = loop.call_later(delay, lambda: run.slow(time.monotonic()))
            try:
                return run.replied(await self._attempt(call, send))
            finally:
                timer.cancel()
        except AttemptFailed as failure:
            return run.failed(failure.error, never_sent=failure.never_sent, now=time.monotonic())

    async def _run(self, call: Call[Out], timeout: float | None, metadata: Metadata | None) -> Out:
        run = CallRun(
            call,
            policy=self._retry,
            budget=self._timeout if timeout is None else timeout,
            now=time.monotonic(),
            metadata=metadata,
            coalesce=self._coalesce is not None,
            leaders=self._leaders,
        )
        action: Action = run.start()
        while True:
            if isinstance(action, Send):
                action = await self._perform(run, call, action)
            elif isinstance(action, NeedMap):
                try:
                    cluster_map = await self._cluster_map(
                        refresh=action.refresh,
                        deadline=action.deadline,
                        stale_epoch=action.stale_epoch,
                    )
                except KvError as error:
                    action = run.map_failed(error)
                else:
                    action = run.routed(cluster_map, time.monotonic())
            elif isinstance(action, Wait):
                await asyncio.sleep(action.seconds)
                action = run.resume(time.monotonic())
            elif isinstance(action, Done):
                return cast(Out, action.value)
            else:
                raise action.error from None
