"""The synchronous client. Thread-safe: share one per process.

A thin driver: the decisions (routing, retries, map refresh, coalescing) are
made by the pure core (``call_run``, ``map_cache``, ``lane_state``, ``batch``);
this module performs them with blocking gRPC calls, threads and ``time.sleep``.
"""

from __future__ import annotations

import threading
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
    AttemptFailed,
    CoalesceConfig,
    SyncLane,
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
from kv_client.map_cache import Join, MapCache, MapFetch, Use
from kv_client.retry import RetryPolicy
from kv_client.types import Location, NodeStatus, Versioned, WriteResult
from kv_common.cluster_map import ClusterMap, ClusterMapError

Out = TypeVar("Out")


class Client:
    """A routing client: sends each request straight to the node that owns the key.

    ``addresses`` are one or more nodes to bootstrap from (``"host:port"``, a
    comma-separated string, or a list). The cluster map is fetched on first use
    and refreshed when a node says it is stale.
    """

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
        self._lanes: dict[tuple[str, int], SyncLane] = {}
        self._seeds = seed_list(addresses)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._leaders = Leaders()
        self._lock = threading.Lock()
        self._fetched = threading.Condition(self._lock)
        self._maps = MapCache(self._seeds)
        self._channels: dict[str, grpc.Channel] = {}
        self._kv: dict[str, kv_pb2_grpc.KVServiceStub] = {}
        self._closed = False

    # -- lifecycle

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._kv.clear()

    # -- public operations

    def get(
        self, key: Key, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> bytes | None:
        """The value of ``key``, or None when it does not exist."""
        return self._run(_calls.get(key), timeout, metadata)

    def get_versioned(
        self, key: Key, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Versioned | None:
        """The value of ``key`` with its version, or None when it does not exist."""
        return self._run(_calls.get_versioned(key), timeout, metadata)

    def put(
        self,
        key: Key,
        value: Value,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> int:
        """Write ``value``; returns the key's new version."""
        return self._run(_calls.put(key, value), timeout, metadata)

    def put_if_version(
        self,
        key: Key,
        value: Value,
        version: int,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> WriteResult:
        """Write only if the key's current version is ``version`` (compare-and-swap)."""
        return self._run(_calls.put_if_version(key, value, version), timeout, metadata)

    def put_if_absent(
        self,
        key: Key,
        value: Value,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> WriteResult:
        """Write only if the key does not exist."""
        return self._run(_calls.put_if_version(key, value, 0), timeout, metadata)

    def delete(
        self, key: Key, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> bool:
        """Delete ``key``; returns whether it existed."""
        return self._run(_calls.delete(key), timeout, metadata)

    def delete_if_version(
        self,
        key: Key,
        version: int,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> WriteResult:
        """Delete only if the key's current version is ``version``."""
        return self._run(_calls.delete_if_version(key, version), timeout, metadata)

    def cluster_map(self, *, refresh: bool = False, timeout: float | None = None) -> ClusterMap:
        """The cluster map this client routes by (fetched now if ``refresh``)."""
        deadline = time.monotonic() + (timeout or self._timeout)
        return self._cluster_map(refresh=refresh, deadline=deadline)

    def locate(self, key: Key, *, timeout: float | None = None) -> Location:
        """Which partition and node own ``key``, by the current map."""
        raw = _calls.encode_key(key)
        return (self.cluster_map(timeout=timeout)).locate(raw)

    def node_status(self, address: str, *, timeout: float | None = None) -> NodeStatus:
        """Status of the node at ``address`` (no routing)."""
        stub = cluster_pb2_grpc.ClusterServiceStub(self._channel(address))
        try:
            response = stub.GetNodeStatus(
                cluster_pb2.GetNodeStatusRequest(), timeout=timeout or self._timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return node_status(response)

    # -- many operations per call

    def batch(
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
            cluster_map = self._cluster_map(
                refresh=cluster_map is not None,
                deadline=run.deadline,
                stale_epoch=cluster_map.epoch if cluster_map is not None else None,
            )
            md = routed_metadata(cluster_map, metadata)
            calls = [
                (
                    chunk,
                    self._stub(chunk.address).Batch.future(
                        chunk.request, timeout=run.remaining(time.monotonic()), metadata=md
                    ),
                )
                for chunk in run.chunks(cluster_map, time.monotonic())
            ]
            for chunk, future in calls:
                try:
                    run.record(chunk, future.result())
                except grpc.RpcError as exc:
                    run.record(
                        chunk,
                        error_from_rpc(exc),
                        never_sent=never_sent(exc),
                        now=time.monotonic(),
                    )
            if not run.another_round(time.monotonic()):
                return run.results
            time.sleep(run.pause)

    def get_many(
        self,
        keys: Sequence[Key],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[bytes | None]:
        """Values of ``keys`` in order (None where missing); raises the first error."""
        results = self.batch([batch.Get(k) for k in keys], timeout=timeout, metadata=metadata)
        return batch.values(results)

    def put_many(
        self,
        items: Mapping[Key, Value] | Sequence[tuple[Key, Value]],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[int]:
        """Write many keys; returns their new versions in order; raises the first error."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        results = self.batch(
            [batch.Put(k, v) for k, v in pairs], timeout=timeout, metadata=metadata
        )
        return batch.versions(results)

    # -- machinery: perform what the pure core decides

    def _open_channel(self, address: str) -> grpc.Channel:
        """The one place a channel is made (a test double may wrap it)."""
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise KvError("the client is closed")
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._open_channel(address)
            return channel

    def _stub(self, address: str) -> kv_pb2_grpc.KVServiceStub:
        stub = self._kv.get(address)
        if stub is None:
            stub = self._kv[address] = kv_pb2_grpc.KVServiceStub(self._channel(address))
        return stub

    def _cluster_map(
        self, *, refresh: bool, deadline: float, stale_epoch: int | None = None
    ) -> ClusterMap:
        with self._lock:
            step = self._maps.want(refresh=refresh, deadline=deadline, stale_epoch=stale_epoch)
            if isinstance(step, Use):
                return step.cluster_map
            if isinstance(step, Join):
                joined = self._fetched.wait_for(
                    lambda: self._maps.outcome_after(step.round) is not None,
                    timeout=max(0.0, deadline - time.monotonic()),
                )
                outcome = self._maps.outcome_after(step.round)
                if not joined or outcome is None:
                    raise DeadlineExceededError("deadline passed while the cluster map was fetched")
                return _unwrap(outcome)
        outcome = UnavailableError("the cluster map fetch was interrupted")
        try:
            outcome = self._fetch(step.fetch)
        finally:
            with self._lock:
                outcome = self._maps.finish(outcome)
                self._fetched.notify_all()
        return _unwrap(outcome)

    def _fetch(self, fetch: MapFetch) -> ClusterMap | KvError:
        while (step := fetch.next(time.monotonic())) is not None:
            stub = cluster_pb2_grpc.ClusterServiceStub(self._channel(step.address))
            try:
                response = stub.GetClusterMap(
                    cluster_pb2.GetClusterMapRequest(include_partitions=True), timeout=step.timeout
                )
                return ClusterMap.from_proto(response.cluster_map)
            except grpc.RpcError as exc:
                fetch.failed(step.address, error_from_rpc(exc).message)
            except ClusterMapError as exc:
                fetch.failed(step.address, str(exc))
        return fetch.error()

    def _attempt(self, call: Call[Any], send: Send) -> Any:
        method: Any = getattr(self._stub(send.address), call.method)

        def unary() -> Any:
            timeout = max(0.0, send.deadline - time.monotonic())
            return method(call.request, timeout=timeout, metadata=send.metadata)

        if send.lane is None:
            try:
                return unary()
            except grpc.RpcError as exc:
                raise failed(exc) from None
        return self._lane(send).submit(call, send.deadline, unary)

    def _lane(self, send: Send) -> SyncLane:
        assert send.lane is not None and self._coalesce is not None
        with self._lock:
            lane = self._lanes.get(send.lane)
            if lane is not None:
                return lane
        stub = self._stub(send.address)

        def send_batch(request: kv_pb2.BatchRequest, timeout: float) -> kv_pb2.BatchResponse:
            return stub.Batch(request, timeout=timeout, metadata=send.metadata)

        config = within(self._coalesce, send.limits)
        with self._lock:
            return self._lanes.setdefault(send.lane, SyncLane(config, send_batch))

    def _run(self, call: Call[Out], timeout: float | None, metadata: Metadata | None) -> Out:
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
                try:
                    action = run.replied(self._attempt(call, action))
                except AttemptFailed as failure:
                    action = run.failed(
                        failure.error, never_sent=failure.never_sent, now=time.monotonic()
                    )
            elif isinstance(action, NeedMap):
                try:
                    cluster_map = self._cluster_map(
                        refresh=action.refresh,
                        deadline=action.deadline,
                        stale_epoch=action.stale_epoch,
                    )
                except KvError as error:
                    action = run.map_failed(error)
                else:
                    action = run.routed(cluster_map, time.monotonic())
            elif isinstance(action, Wait):
                time.sleep(action.seconds)
                action = run.resume(time.monotonic())
            elif isinstance(action, Done):
                return cast(Out, action.value)
            else:
                raise action.error from None


def _unwrap(outcome: ClusterMap | KvError) -> ClusterMap:
    if isinstance(outcome, KvError):
        raise outcome
    return outcome
