"""The gRPC servicers: thin adapters between the wire and the node's parts.

Each operation goes where ``Router.route`` says: the local store (writes through the
group committer), the owner over the pooled peer channel (with the remaining deadline and
a hop marker), or back to the caller as a refusal. These classes only translate requests
into the router's inputs and its decisions into replies; ``kv_node.call_guard`` turns a
raised ``Refused`` into a status with its ErrorInfo and counts every call.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_common.wire import (
    HOP_METADATA,
    NEVER_RAN,
    Reason,
    connect_failed,
    decode_status_details,
)
from kv_node import __version__
from kv_node.committer import GroupCommitter
from kv_node.config import NodeConfig
from kv_node.metrics import NodeMetrics
from kv_node.peers import Peers
from kv_node.replication.overview import leader_ids, overview
from kv_node.replication.pending import EntryFailed, LeadershipLost, ProposalLost
from kv_node.replication.replica import Replication
from kv_node.routing import (
    LOCAL,
    Forward,
    Kind,
    Marks,
    Refusal,
    Refused,
    Router,
    forward_budget,
)
from kv_node.store import (
    DeleteOp,
    GetOp,
    Op,
    Outcome,
    PutOp,
    ReadResult,
    Store,
    WriteOp,
    WriteResult,
)

Context = grpc.aio.ServicerContext[Any, Any]
Response = TypeVar("Response", bound=Message)


class Node:
    """Everything the servicers share: configuration, data, peers, counters.

    The data is either a single-copy ``store`` (replication factor 1: the key's owner holds
    it, writes go through the group committer) or ``replication`` (every partition a Raft
    group: writes and reads go through the partition's leader).
    """

    def __init__(
        self, config: NodeConfig, store: Store | None, replication: Replication | None = None
    ) -> None:
        if (store is None) == (replication is None):
            raise ValueError("a node serves either a single-copy store or replication")
        self.config = config
        self.store = store
        self.replication = replication
        leader_of = replication.leader if replication is not None else None
        self.router = Router(config.node_id, config.cluster_map, leader_of=leader_of)
        self.committer = GroupCommitter(store) if store is not None else None
        self.peers = Peers(
            dict(config.cluster_map.addresses), max_message_bytes=config.max_message_bytes
        )
        self.metrics = NodeMetrics(self.keys_stored)
        self.started = time.monotonic()
        self.requests_served = 0
        self.requests_forwarded = 0
        self.draining = False
        self._map_replies: dict[tuple[int, bool], cluster_pb2.GetClusterMapResponse] = {}

    def keys_stored(self) -> float:
        if self.store is not None:
            return float(self.store.count())
        assert self.replication is not None
        return float(self.replication.store.count())

    @property
    def engine(self) -> str:
        return self.store.engine if self.store is not None else "lmdb-replicated"

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Write ops of keys this node serves (``Router.route`` said LOCAL), in order; a
        refusal of any of them is raised."""
        results = await self.apply(ops)
        for result in results:
            if isinstance(result, Refusal):
                raise Refused(result)
        return cast(list[WriteResult], results)

    async def apply(self, ops: Sequence[Op]) -> list[Outcome | Refusal]:
        """Apply ops of keys this node serves in order; reads among them see earlier writes.

        One copy: one group-committer call (a failure raises). Replicated: the ops of one
        partition are one Raft proposal, the partitions' proposals run concurrently (per-key
        order holds: a key has one partition), and a partition's refusal (``NOT_LEADER``, a
        failed entry) is the result of each of its ops, not of the others'."""
        if self.committer is not None:
            return list(await self.committer.apply(ops))
        replication = self.replication
        assert replication is not None
        partitions: dict[int, list[int]] = {}
        for index, op in enumerate(ops):
            partitions.setdefault(replication.group_of(op.key), []).append(index)
        results: list[Outcome | Refusal | None] = [None] * len(ops)

        async def propose(group: int, indexes: list[int]) -> None:
            try:
                outcomes: list[Outcome | Refusal] = list(
                    await self._propose(group, [ops[i] for i in indexes])
                )
            except Refused as refused:
                outcomes = [refused.refusal] * len(indexes)
            for index, outcome in zip(indexes, outcomes, strict=True):
                results[index] = outcome

        await asyncio.gather(*(propose(g, indexes) for g, indexes in partitions.items()))
        return [result for result in results if result is not None]  # every op has one

    async def _propose(self, group: int, ops: list[Op]) -> list[Outcome]:
        """One Raft proposal of ``ops`` (all of ``group``); refusals raise ``Refused``."""
        replication = self.replication
        assert replication is not None
        try:
            return await replication.write(group, ops)
        except (LeadershipLost, ProposalLost) as lost:
            raise Refused(self._not_leader(group, lost)) from None
        except EntryFailed as failed:
            raise Refused(Refusal(grpc.StatusCode.INTERNAL, str(failed), Reason.INTERNAL)) from None

    async def read(self, key: bytes) -> tuple[bytes, int] | None:
        """A read of a key this node serves: linearizable when replicated (ReadIndex)."""
        if self.store is not None:
            return self.store.get(key)
        replication = self.replication
        assert replication is not None
        group = replication.group_of(key)
        try:
            return await replication.read(group, key)
        except LeadershipLost as lost:
            raise Refused(self._not_leader(group, lost)) from None

    def _not_leader(self, group: int, lost: Exception) -> Refusal:
        """NOT_LEADER naming the leader the refusal knew of (during a leadership transfer,
        the replica taking over), else the one this node knows now."""
        replication = self.replication
        assert replication is not None
        named = replication.member_of(lost.leader) if isinstance(lost, LeadershipLost) else None
        if named is None or named == self.config.node_id:
            named = replication.leader(group)
        return self.router.not_leader(group, named, f"{lost}; the operation did not run")

    def cluster_map_reply(self, include_partitions: bool) -> cluster_pb2.GetClusterMapResponse:
        """The encoded map, built once per epoch: with partitions it is thousands of messages.

        Replicated, the partitions also name the leader this node knows now: a copy of the
        cached reply with one pass over the hosted groups (``overview.leader_ids``)."""
        cluster_map = self.config.cluster_map
        key = (cluster_map.epoch, include_partitions)
        reply = self._map_replies.get(key)
        if reply is None:
            encoded = cluster_map.to_proto(include_partitions=include_partitions)
            reply = self._map_replies[key] = cluster_pb2.GetClusterMapResponse(cluster_map=encoded)
        if include_partitions and self.replication is not None:
            replication = self.replication
            led = cluster_pb2.GetClusterMapResponse()
            led.CopyFrom(reply)
            leaders = leader_ids(replication.driver, replication.members, cluster_map.partitions)
            for replica_set, leader in zip(led.cluster_map.partitions, leaders, strict=True):
                if leader:
                    replica_set.leader_id = leader
            return led
        return reply

    def status_reply(self) -> cluster_pb2.GetNodeStatusResponse:
        config = self.config
        reply = cluster_pb2.GetNodeStatusResponse(
            node_id=config.node_id,
            address=config.advertise or "",
            uptime_seconds=time.monotonic() - self.started,
            keys_stored=int(self.keys_stored()),
            engine=self.engine,
            version=__version__,
            requests_served=self.requests_served,
            requests_forwarded=self.requests_forwarded,
            epoch=config.cluster_map.epoch,
            replication_factor=config.cluster_map.replication_factor,
        )
        if self.replication is not None:
            view = overview(self.replication.driver)
            reply.partitions_hosted = view.hosted
            reply.partitions_led = view.led
            reply.partitions_without_leader = view.without_leader
            reply.replicas_behind = view.replicas_behind
        return reply

    def forward_timeout(self, context: Context) -> float:
        budget = forward_budget(context.time_remaining(), self.config.forward_timeout)
        if isinstance(budget, Refusal):
            raise Refused(budget)
        return budget

    async def forward(
        self,
        method: str,
        owner: str,
        call: Callable[..., Awaitable[Response]],
        request: Message,
        timeout: float,
    ) -> Response:
        try:
            response = await call(
                request, timeout=timeout, metadata=((HOP_METADATA, self.config.node_id),)
            )
        except grpc.aio.AioRpcError as exc:
            raise Refused(self._owner_refusal(owner, exc, timeout)) from exc
        self.requests_forwarded += 1
        self.metrics.forwarded.labels(method).inc()
        return response

    def _owner_refusal(self, owner: str, exc: grpc.aio.AioRpcError, timeout: float) -> Refusal:
        """The owner's own refusal passes through; a failure to reach it names it."""
        code = exc.code()
        details = exc.details() or code.name
        address = self.peers.address(owner)
        info = decode_status_details(tuple(exc.trailing_metadata() or ()))
        if info is not None:
            return Refusal(code, details, info.reason, info.metadata)
        where = {"owner_id": owner, "owner_address": address}
        if code == grpc.StatusCode.UNAVAILABLE and connect_failed(details):
            # Nothing left this node: the caller may resend even an unconditional write.
            where[NEVER_RAN] = "true"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            what = "is unreachable" if code == grpc.StatusCode.UNAVAILABLE else "did not answer"
            return Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"owner {owner!r} at {address} {what} within {timeout:.3g}s: {details}",
                Reason.OWNER_UNAVAILABLE,
                where,
            )
        return Refusal(code, f"owner {owner!r} at {address}: {details}", Reason.INTERNAL, where)


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


def _error_result(refusal: Refusal) -> kv_pb2.OperationResult:
    return kv_pb2.OperationResult(
        error=kv_pb2.OperationError(
            code=refusal.code.value[0],
            message=refusal.message,
            reason=refusal.reason,
            metadata=refusal.metadata,
        )
    )


def _local_result(op: Op, outcome: Outcome) -> kv_pb2.OperationResult:
    if isinstance(outcome, ReadResult):
        found = None if outcome.value is None else (outcome.value, outcome.version)
        return kv_pb2.OperationResult(get=_get_response(found))
    if isinstance(op, PutOp):
        return kv_pb2.OperationResult(put=_put_response(outcome))
    return kv_pb2.OperationResult(delete=_delete_response(outcome))


@dataclass
class BatchPlan:
    """Where each operation of one Batch goes, keeping per-key order.

    A Get is answered at planning time unless an earlier operation of the batch wrote its
    key; then it becomes a ``GetOp`` in the local op list, which the committer applies in
    order in one transaction, so it sees exactly the writes before it. Operations on keys
    owned elsewhere go to their owner as one Batch each, which applies the same rule.
    """

    results: list[kv_pb2.OperationResult | None]
    local: list[tuple[int, Op]] = field(default_factory=list)
    remote: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


def plan_batch(
    router: Router,
    operations: Sequence[kv_pb2.Operation],
    marks: Marks,
    read: Callable[[bytes], tuple[bytes, int] | None] | None,
) -> BatchPlan:
    """``read`` answers a get at planning time; None sends every get with the writes."""
    plan = BatchPlan(results=[None] * len(operations))
    results, local, remote = plan.results, plan.local, plan.remote
    written: set[bytes] = set()
    route = router.route
    # The hot loop of the node: keep per-operation work to plain attribute access.
    for index, operation in enumerate(operations):
        kind: Kind | None = operation.WhichOneof("op")
        single = getattr(operation, kind) if kind is not None else None
        key = single.key if single is not None else b""
        size = len(single.value) if kind == "put" else 0  # type: ignore[union-attr]
        decision = route(kind, key, size, marks)
        if decision is LOCAL:
            if kind == "get":
                if key in written or read is None:
                    local.append((index, GetOp(key)))
                else:
                    results[index] = kv_pb2.OperationResult(get=_get_response(read(key)))
            else:
                local.append((index, _write_op(single)))  # type: ignore[arg-type]
                written.add(key)
        elif isinstance(decision, Forward):
            remote[decision.owner].append(index)
        elif isinstance(decision, Refusal):
            results[index] = _error_result(decision)
    return plan


class KVServicer(kv_pb2_grpc.KVServiceServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def _single(
        self,
        method: str,
        kind: Kind,
        request: kv_pb2.PutRequest | kv_pb2.GetRequest | kv_pb2.DeleteRequest,
        context: Context,
        local: Callable[[], Awaitable[Response]],
        remote: Callable[[kv_pb2_grpc.KVServiceAsyncStub], Callable[..., Awaitable[Response]]],
    ) -> Response:
        node = self._node
        size = len(request.value) if isinstance(request, kv_pb2.PutRequest) else 0
        marks = Marks.from_metadata(context.invocation_metadata())
        decision = node.router.route(kind, request.key, size, marks)
        if decision is LOCAL:
            try:
                return await local()
            except Refused as refused:
                # Replicated: the leadership moved while the operation waited, and it did
                # not run; a request that has not hopped yet follows it to the new leader.
                leader = refused.refusal.metadata.get("leader_id")
                if refused.refusal.reason != Reason.NOT_LEADER or not leader:
                    raise
                if marks.forwarded or marks.routed:
                    raise  # the SDK goes to the leader named in the refusal itself
                decision = Forward(leader)
        if isinstance(decision, Forward):
            call = remote(node.peers.kv(decision.owner))
            timeout = node.forward_timeout(context)
            return await node.forward(method, decision.owner, call, request, timeout)
        assert isinstance(decision, Refusal)
        raise Refused(decision)

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        async def local() -> kv_pb2.PutResponse:
            (result,) = await self._node.write((_write_op(request),))
            return _put_response(result)

        return await self._single("Put", "put", request, context, local, lambda s: s.Put)

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        async def local() -> kv_pb2.GetResponse:
            return _get_response(await self._node.read(request.key))

        return await self._single("Get", "get", request, context, local, lambda s: s.Get)

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: Context
    ) -> kv_pb2.DeleteResponse:
        async def local() -> kv_pb2.DeleteResponse:
            (result,) = await self._node.write((_write_op(request),))
            return _delete_response(result)

        return await self._single("Delete", "delete", request, context, local, lambda s: s.Delete)

    async def Batch(self, request: kv_pb2.BatchRequest, context: Context) -> kv_pb2.BatchResponse:
        node = self._node
        operations = request.operations
        too_large = node.router.check_batch(len(operations), request.ByteSize())
        if too_large is not None:
            raise Refused(too_large)
        node.metrics.batch_operations.inc(len(operations))
        marks = Marks.from_metadata(context.invocation_metadata())
        # Replicated, every get goes through its partition's log with the batch's writes,
        # which makes it linearizable; a single copy may answer gets while planning.
        read = node.store.get if node.store is not None else None
        if node.replication is not None:
            # A batch spans partitions whose leaders differ: its operations are forwarded
            # to them here rather than refused one by one to an SDK that sent them together.
            marks = Marks(routed=False, forwarded=marks.forwarded)
        plan = plan_batch(node.router, operations, marks, read)
        results = plan.results

        async def commit_local() -> None:
            if not plan.local:
                return
            outcomes = await node.apply([op for _, op in plan.local])
            for (index, op), outcome in zip(plan.local, outcomes, strict=True):
                if isinstance(outcome, Refusal):
                    results[index] = _error_result(outcome)
                else:
                    results[index] = _local_result(op, outcome)

        async def forward_group(owner: str, indexes: list[int]) -> None:
            group = kv_pb2.BatchRequest(operations=[operations[i] for i in indexes])
            try:
                response = await node.forward(
                    "Batch", owner, node.peers.kv(owner).Batch, group, node.forward_timeout(context)
                )
            except Refused as refused:
                for index in indexes:
                    results[index] = _error_result(refused.refusal)
                return
            for index, result in zip(indexes, response.results, strict=True):
                results[index] = result

        await asyncio.gather(
            commit_local(), *(forward_group(owner, idx) for owner, idx in plan.remote.items())
        )
        return kv_pb2.BatchResponse(results=[r for r in results if r is not None])


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def GetClusterMap(
        self, request: cluster_pb2.GetClusterMapRequest, context: Context
    ) -> cluster_pb2.GetClusterMapResponse:
        return self._node.cluster_map_reply(request.include_partitions)

    async def GetNodeStatus(
        self, request: cluster_pb2.GetNodeStatusRequest, context: Context
    ) -> cluster_pb2.GetNodeStatusResponse:
        return self._node.status_reply()
