"""The asyncio client: the same surface as ``Client``, awaitable.

Create and use it inside one running event loop (gRPC's aio channels belong
to the loop that made them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_client import _calls, batch
from kv_client._calls import Call, Key, Value
from kv_client._transport import (
    CHANNEL_OPTIONS,
    DEFAULT_TIMEOUT,
    MAP_FETCH_TIMEOUT,
    Metadata,
    bootstrap_order,
    no_map_error,
    node_status,
    routed_metadata,
    seed_list,
)
from kv_client.batch import Operation, Result
from kv_client.coalesce import (
    DEFAULT_COALESCE,
    AsyncLane,
    AttemptFailed,
    CoalesceConfig,
    failed,
    within,
)
from kv_client.errors import DeadlineExceededError, KvError, error_from_rpc
from kv_client.retry import RetryPolicy, next_pause
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
        self._map: ClusterMap | None = None
        self._refreshing: asyncio.Task[ClusterMap] | None = None
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
        if self._map is None or refresh:
            return await self._refresh(time.monotonic() + (timeout or self._timeout))
        return self._map

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
        run = batch.BatchRun(operations, max_ops=self._max_batch_ops, budget=budget)
        while True:
            cluster_map = await self.cluster_map(refresh=run.round > 0, timeout=run.remaining())
            chunks = run.chunks(cluster_map)
            md = routed_metadata(cluster_map, metadata)
            responses = await asyncio.gather(
                *(
                    self._stub(c.address).Batch(c.request, timeout=run.remaining(), metadata=md)
                    for c in chunks
                ),
                return_exceptions=True,
            )
            for chunk, response in zip(chunks, responses, strict=True):
                if isinstance(response, grpc.RpcError):
                    run.record(chunk, error_from_rpc(response))
                elif isinstance(response, BaseException):
                    raise response
                else:
                    run.record(chunk, response)
            if not run.another_round():
                return run.results

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

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._closed:
            raise KvError("the client is closed")
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def _stub(self, address: str) -> kv_pb2_grpc.KVServiceAsyncStub:
        stub = self._kv.get(address)
        if stub is None:
            stub = self._kv[address] = kv_pb2_grpc.KVServiceStub(self._channel(address))
        return stub

    async def _refresh(self, deadline: float) -> ClusterMap:
        # One fetch at a time: many callers that hit a stale map share it.
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._fetch(deadline))
        return await asyncio.shield(self._refreshing)

    async def _fetch(self, deadline: float) -> ClusterMap:
        tried: list[str] = []
        errors: list[str] = []
        for address in bootstrap_order(self._seeds, self._map):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            tried.append(address)
            stub = cluster_pb2_grpc.ClusterServiceStub(self._channel(address))
            try:
                response = await stub.GetClusterMap(
                    cluster_pb2.GetClusterMapRequest(),
                    timeout=min(remaining, MAP_FETCH_TIMEOUT),
                )
                fresh = ClusterMap.from_proto(response.cluster_map)
            except grpc.RpcError as exc:
                errors.append(f"{address}: {error_from_rpc(exc).message}")
                continue
            except ClusterMapError as exc:
                errors.append(f"{address}: {exc}")
                continue
            if self._map is None or fresh.epoch >= self._map.epoch:
                self._map = fresh
            return self._map
        raise no_map_error(tried, errors)

    async def _attempt(
        self,
        call: Call[Any],
        address: str,
        deadline: float,
        cluster_map: ClusterMap,
        metadata: Metadata | None,
    ) -> Any:
        md = routed_metadata(cluster_map, metadata)
        method: Any = getattr(self._stub(address), call.method)

        async def unary() -> Any:
            timeout = max(0.0, deadline - time.monotonic())
            return await method(call.request, timeout=timeout, metadata=md)

        if self._coalesce is None or metadata:
            try:
                return await unary()
            except grpc.RpcError as exc:
                raise failed(exc) from None
        lane = self._lanes.get((address, cluster_map.epoch))
        if lane is None:
            stub = self._stub(address)

            async def send_batch(
                request: kv_pb2.BatchRequest, timeout: float
            ) -> kv_pb2.BatchResponse:
                return await stub.Batch(request, timeout=timeout, metadata=md)

            lane = self._lanes[(address, cluster_map.epoch)] = AsyncLane(
                within(self._coalesce, cluster_map.limits), send_batch
            )
        return await lane.submit(call, deadline, unary)

    async def _run(self, call: Call[Out], timeout: float | None, metadata: Metadata | None) -> Out:
        budget = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        cluster_map = await self.cluster_map(timeout=budget)
        attempt = 0
        while True:
            node_id, address = cluster_map.owner_of(call.key)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"deadline of {budget}s passed before {call.method}")
            try:
                response = await self._attempt(call, address, deadline, cluster_map, metadata)
                return call.decode(response)
            except AttemptFailed as failure:
                error = failure.located(call, node_id, address)
                pause = next_pause(
                    self._retry,
                    error,
                    attempt=attempt,
                    safety=call.safety,
                    never_sent=failure.never_sent,
                    time_left=deadline - time.monotonic(),
                )
                if pause is None:
                    raise error from None
            if error.invalid_metadata:
                cluster_map = await self._refresh(deadline)
            await asyncio.sleep(pause)
            attempt += 1
