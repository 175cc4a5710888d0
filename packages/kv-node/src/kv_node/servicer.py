"""The gRPC servicers: thin adapters between the wire and the node's parts.

A request is validated, routed by the cluster map, and then either answered
from the local store (writes through the group committer) or forwarded to the
owner over the pooled peer channel with the remaining deadline and a hop
marker. Every failure becomes a gRPC status with a precise message.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_common.wire import EPOCH_METADATA, HOP_METADATA, STALE_MAP_PREFIX
from kv_node import __version__
from kv_node.committer import GroupCommitter
from kv_node.config import NodeConfig
from kv_node.metrics import NodeMetrics
from kv_node.peers import Peers
from kv_node.store import DeleteOp, PutOp, Store, WriteOp, WriteResult

Context = grpc.aio.ServicerContext[Any, Any]
Response = TypeVar("Response", bound=Message)

FORWARD_MARGIN_SECONDS = 0.05
"""Deadline kept back when forwarding, so an unreachable owner is reported as
UNAVAILABLE before the caller's own deadline passes."""


class RequestError(Exception):
    """A request that gets a gRPC error status instead of a response."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Node:
    """Everything the servicers share: configuration, store, peers, counters."""

    def __init__(self, config: NodeConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.committer = GroupCommitter(store)
        self.peers = Peers(
            dict(config.cluster.addresses), max_message_bytes=config.max_message_bytes
        )
        self.metrics = NodeMetrics(lambda: float(store.count()))
        self.started = time.monotonic()
        self.requests_served = 0
        self.requests_forwarded = 0

    def check_key(self, key: bytes) -> None:
        if not key:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "key must not be empty")
        if len(key) > self.config.max_key_bytes:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"key is {len(key)} bytes; the limit is {self.config.max_key_bytes} bytes",
            )

    def check_value(self, value: bytes) -> None:
        if len(value) > self.config.max_value_bytes:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"value is {len(value)} bytes; the limit is {self.config.max_value_bytes} bytes "
                "(--max-value-bytes)",
            )

    def owner_of(self, key: bytes) -> str:
        return self.config.cluster.placement.owner_of_key(key)

    def misrouted(self, key: bytes, owner: str, metadata: dict[str, str]) -> RequestError | None:
        """The error for a request that must not be forwarded, if it is one."""
        cluster = self.config.cluster
        if HOP_METADATA in metadata:
            return RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request forwarded by {metadata[HOP_METADATA]!r} reached {self.config.node_id!r}, "
                f"which does not own the key (owner {owner!r}): the nodes' cluster lists differ",
            )
        if EPOCH_METADATA in metadata:
            partition = cluster.placement.partition_of(key)
            return RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{STALE_MAP_PREFIX}: node {self.config.node_id!r} does not own partition "
                f"{partition}; its owner is {owner!r} at {cluster.address_of(owner)} "
                f"(epoch {cluster.epoch})",
            )
        return None

    def forward_timeout(self, context: Context) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.config.forward_timeout
        timeout = min(self.config.forward_timeout, remaining - FORWARD_MARGIN_SECONDS)
        if timeout <= 0:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "deadline passed before the request was forwarded",
            )
        return timeout

    async def forward(
        self,
        method: str,
        owner: str,
        call: Callable[..., Awaitable[Response]],
        request: Message,
        timeout: float,
    ) -> Response:
        address = self.peers.address(owner)
        try:
            response = await call(
                request, timeout=timeout, metadata=((HOP_METADATA, self.config.node_id),)
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                what = "is unreachable" if code == grpc.StatusCode.UNAVAILABLE else "did not answer"
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"owner {owner!r} at {address} {what} within {timeout:.3g}s: {exc.details()}",
                ) from exc
            raise RequestError(code, exc.details() or code.name) from exc
        self.requests_forwarded += 1
        self.metrics.forwarded.labels(method).inc()
        return response


def _metadata(context: Context) -> dict[str, str]:
    return {
        key: value if isinstance(value, str) else value.decode()
        for key, value in context.invocation_metadata() or ()
    }


async def _answer(
    node: Node, method: str, context: Context, handler: Callable[[], Awaitable[Response]]
) -> Response:
    """Run a handler, turning RequestError into a gRPC status and recording metrics."""
    start = time.perf_counter()
    outcome = "OK"
    try:
        return await handler()
    except RequestError as exc:
        outcome = exc.code.name
        await context.abort(exc.code, exc.message)
        raise  # unreachable: abort raises
    except asyncio.CancelledError:
        outcome = "CANCELLED"
        raise
    finally:
        node.requests_served += 1
        node.metrics.requests.labels(method, outcome).inc()
        node.metrics.latency.labels(method).observe(time.perf_counter() - start)


def _put_response(result: WriteResult) -> kv_pb2.PutResponse:
    return kv_pb2.PutResponse(succeeded=result.succeeded, version=result.version)


def _delete_response(result: WriteResult) -> kv_pb2.DeleteResponse:
    found = result.found and result.succeeded
    return kv_pb2.DeleteResponse(succeeded=result.succeeded, found=found, version=result.version)


def _get_response(found: tuple[bytes, int] | None) -> kv_pb2.GetResponse:
    if found is None:
        return kv_pb2.GetResponse(found=False)
    return kv_pb2.GetResponse(found=True, value=found[0], version=found[1])


def _if_version(request: kv_pb2.PutRequest | kv_pb2.DeleteRequest) -> int | None:
    return request.if_version if request.HasField("if_version") else None


def _write_op(request: kv_pb2.PutRequest | kv_pb2.DeleteRequest) -> WriteOp:
    if isinstance(request, kv_pb2.PutRequest):
        return PutOp(request.key, request.value, _if_version(request))
    return DeleteOp(request.key, _if_version(request))


def _error_result(error: RequestError) -> kv_pb2.OperationResult:
    return kv_pb2.OperationResult(
        error=kv_pb2.OperationError(code=error.code.value[0], message=error.message)
    )


class KVServicer(kv_pb2_grpc.KVServiceServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def _single(
        self,
        method: str,
        request: kv_pb2.PutRequest | kv_pb2.GetRequest | kv_pb2.DeleteRequest,
        context: Context,
        local: Callable[[], Awaitable[Response]],
        remote: Callable[[kv_pb2_grpc.KVServiceAsyncStub], Callable[..., Awaitable[Response]]],
    ) -> Response:
        node = self._node

        async def handle() -> Response:
            node.check_key(request.key)
            if isinstance(request, kv_pb2.PutRequest):
                node.check_value(request.value)
            owner = node.owner_of(request.key)
            if owner == node.config.node_id:
                return await local()
            error = node.misrouted(request.key, owner, _metadata(context))
            if error is not None:
                raise error
            call = remote(node.peers.kv(owner))
            return await node.forward(method, owner, call, request, node.forward_timeout(context))

        return await _answer(node, method, context, handle)

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        async def local() -> kv_pb2.PutResponse:
            return _put_response(await self._node.committer.write(_write_op(request)))

        return await self._single("Put", request, context, local, lambda stub: stub.Put)

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        async def local() -> kv_pb2.GetResponse:
            return _get_response(self._node.store.get(request.key))

        return await self._single("Get", request, context, local, lambda stub: stub.Get)

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: Context
    ) -> kv_pb2.DeleteResponse:
        async def local() -> kv_pb2.DeleteResponse:
            return _delete_response(await self._node.committer.write(_write_op(request)))

        return await self._single("Delete", request, context, local, lambda stub: stub.Delete)

    async def Batch(self, request: kv_pb2.BatchRequest, context: Context) -> kv_pb2.BatchResponse:
        return await _answer(self._node, "Batch", context, lambda: self._batch(request, context))

    async def _batch(self, request: kv_pb2.BatchRequest, context: Context) -> kv_pb2.BatchResponse:
        node = self._node
        config = node.config
        operations = request.operations
        if len(operations) > config.max_batch_ops:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch has {len(operations)} operations; the limit is {config.max_batch_ops} "
                "(--max-batch-ops)",
            )
        size = request.ByteSize()
        if size > config.max_batch_bytes:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch is {size} bytes encoded; the limit is {config.max_batch_bytes} "
                "(--max-batch-bytes)",
            )
        node.metrics.batch_operations.inc(len(operations))
        results: list[kv_pb2.OperationResult | None] = [None] * len(operations)
        writes: list[tuple[int, WriteOp]] = []
        written: set[bytes] = set()
        deferred_reads: list[int] = []
        remote: defaultdict[str, list[int]] = defaultdict(list)
        metadata = _metadata(context)
        # The hot loop of the node: keep per-operation work to plain attribute access.
        me = config.node_id
        owner_of = config.cluster.placement.owner_of_key
        max_key, max_value = config.max_key_bytes, config.max_value_bytes
        store_get = node.store.get
        for index, operation in enumerate(operations):
            kind = operation.WhichOneof("op")
            if kind is None:
                error = RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"operation {index} sets no put, get or delete",
                )
                results[index] = _error_result(error)
                continue
            single = getattr(operation, kind)
            key = single.key
            try:
                if not key or len(key) > max_key:
                    node.check_key(key)
                if kind == "put" and len(single.value) > max_value:
                    node.check_value(single.value)
                owner = owner_of(key)
                if owner != me:
                    misrouted = node.misrouted(key, owner, metadata)
                    if misrouted is not None:
                        raise misrouted
                    remote[owner].append(index)
                elif kind == "get":
                    if key in written:
                        deferred_reads.append(index)  # read after this batch's own write
                    else:
                        results[index] = kv_pb2.OperationResult(get=_get_response(store_get(key)))
                else:
                    writes.append((index, _write_op(single)))
                    written.add(key)
            except RequestError as error:
                results[index] = _error_result(error)

        async def commit_local() -> None:
            if not writes:
                return
            outcomes = await node.committer.write_many([op for _, op in writes])
            for (index, op), outcome in zip(writes, outcomes, strict=True):
                results[index] = (
                    kv_pb2.OperationResult(put=_put_response(outcome))
                    if isinstance(op, PutOp)
                    else kv_pb2.OperationResult(delete=_delete_response(outcome))
                )
            for index in deferred_reads:
                key = operations[index].get.key
                results[index] = kv_pb2.OperationResult(get=_get_response(node.store.get(key)))

        async def forward_group(owner: str, indexes: list[int]) -> None:
            group = kv_pb2.BatchRequest(operations=[operations[i] for i in indexes])
            try:
                response = await node.forward(
                    "Batch", owner, node.peers.kv(owner).Batch, group, node.forward_timeout(context)
                )
            except RequestError as error:
                for index in indexes:
                    results[index] = _error_result(error)
                return
            for index, result in zip(indexes, response.results, strict=True):
                results[index] = result

        await asyncio.gather(
            commit_local(), *(forward_group(owner, idx) for owner, idx in remote.items())
        )
        return kv_pb2.BatchResponse(results=[r for r in results if r is not None])


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def GetClusterMap(
        self, request: cluster_pb2.GetClusterMapRequest, context: Context
    ) -> cluster_pb2.GetClusterMapResponse:
        async def handle() -> cluster_pb2.GetClusterMapResponse:
            cluster_map = self._node.config.cluster.to_proto(
                include_partitions=request.include_partitions
            )
            return cluster_pb2.GetClusterMapResponse(cluster_map=cluster_map)

        return await _answer(self._node, "GetClusterMap", context, handle)

    async def GetNodeStatus(
        self, request: cluster_pb2.GetNodeStatusRequest, context: Context
    ) -> cluster_pb2.GetNodeStatusResponse:
        node = self._node

        async def handle() -> cluster_pb2.GetNodeStatusResponse:
            return cluster_pb2.GetNodeStatusResponse(
                node_id=node.config.node_id,
                address=node.config.advertise,
                uptime_seconds=time.monotonic() - node.started,
                keys_stored=node.store.count(),
                engine=node.store.engine,
                version=__version__,
                requests_served=node.requests_served,
                requests_forwarded=node.requests_forwarded,
                epoch=node.config.cluster.epoch,
            )

        return await _answer(node, "GetNodeStatus", context, handle)
