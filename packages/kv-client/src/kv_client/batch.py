"""Many operations in few calls: the SDK side of ``KVService/Batch``.

Operations are grouped by owning node with the client's map (with replicas,
by the leader of each operation's partition as far as the client knows), cut
into chunks of at most ``max_ops``, and each chunk goes to that node as one call;
the chunks run in parallel. Every operation gets its own result: a value,
a ``WriteResult``, or the ``KvError`` it failed with (never raised here).
Operations that provably did not run (refused for a stale map, a node that could
not be reached or was stopping, no leader yet) are sent again on a fresh map, a few
rounds at most and within the deadline; one that may have run is never sent twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kv.v1 import kv_pb2
from kv_client._calls import Key, Value, encode, encode_key
from kv_client.errors import (
    KvError,
    ShuttingDownError,
    error_from_status,
    status_from_number,
)
from kv_client.leaders import Leaders
from kv_client.types import Versioned, WriteResult
from kv_common.cluster_map import ClusterMap
from kv_common.wire import ErrorInfo

DEFAULT_MAX_OPS = 1000
"""Operations per Batch call; matches the node's default --max-batch-ops."""


@dataclass(frozen=True, slots=True)
class Get:
    key: Key


@dataclass(frozen=True, slots=True)
class Put:
    key: Key
    value: Value
    if_version: int | None = None
    """Write only at this version; 0 means only if absent."""


@dataclass(frozen=True, slots=True)
class Delete:
    key: Key
    if_version: int | None = None


Operation = Get | Put | Delete
Result = Versioned | None | WriteResult | KvError


def to_proto(op: Operation) -> tuple[bytes, kv_pb2.Operation]:
    key = encode_key(op.key)
    if isinstance(op, Get):
        return key, kv_pb2.Operation(get=kv_pb2.GetRequest(key=key))
    if isinstance(op, Put):
        put = kv_pb2.PutRequest(key=key, value=encode(op.value, "value"))
        if op.if_version is not None:
            put.if_version = op.if_version
        return key, kv_pb2.Operation(put=put)
    delete = kv_pb2.DeleteRequest(key=key)
    if op.if_version is not None:
        delete.if_version = op.if_version
    return key, kv_pb2.Operation(delete=delete)


def result_error(result: kv_pb2.OperationResult) -> KvError | None:
    """The error an operation's result carries (an empty result counts as one), or None."""
    kind = result.WhichOneof("result")
    if kind == "error":
        error = result.error
        info = ErrorInfo(error.reason, dict(error.metadata)) if error.reason else None
        return error_from_status(status_from_number(error.code), error.message, info)
    if kind is None:
        return error_from_status(grpc.StatusCode.INTERNAL, "the node sent an empty result")
    return None


def from_proto(result: kv_pb2.OperationResult) -> Result:
    error = result_error(result)
    if error is not None:
        return error
    kind = result.WhichOneof("result")
    if kind == "get":
        got = result.get
        return Versioned(got.value, got.version) if got.found else None
    if kind == "put":
        return WriteResult(result.put.succeeded, result.put.version)
    return WriteResult(result.delete.succeeded, result.delete.version)


@dataclass
class Chunk:
    """Operations (by index into the caller's list) bound for one node in one call."""

    node_id: str
    address: str
    indexes: list[int]
    request: kv_pb2.BatchRequest


MIN_CALL_TIMEOUT = 0.001
"""Seconds a batch call is given at least, so gRPC gets a positive deadline."""

FRAMING_BYTES = 16
"""Allowance per operation for protobuf framing when sizing a chunk."""


def plan(
    cluster_map: ClusterMap,
    encoded: Sequence[tuple[bytes, kv_pb2.Operation]],
    indexes: Sequence[int],
    max_ops: int,
    leaders: Leaders | None = None,
    now: float = 0.0,
) -> list[Chunk]:
    """Group operations by the node that serves each (its owner, or with replicas the leader
    of its partition as far as ``leaders`` knows) and cut each group at the node's op and
    byte limits. A node that turns out not to lead an operation's partition forwards it."""
    max_ops = min(max_ops, cluster_map.limits.max_batch_ops)
    max_bytes = cluster_map.limits.max_batch_bytes
    leaders = leaders if leaders is not None else Leaders()
    by_owner: defaultdict[str, list[int]] = defaultdict(list)
    for index in indexes:
        by_owner[leaders.target(cluster_map, encoded[index][0], now=now)].append(index)
    chunks = []
    for node_id, owned in by_owner.items():
        address = cluster_map.address_of(node_id)
        part: list[int] = []
        size = 0
        for index in owned:
            op_size = encoded[index][1].ByteSize() + FRAMING_BYTES
            if part and (len(part) == max_ops or size + op_size > max_bytes):
                chunks.append(_chunk(node_id, address, part, encoded))
                part, size = [], 0
            part.append(index)
            size += op_size
        if part:
            chunks.append(_chunk(node_id, address, part, encoded))
    return chunks


def _chunk(
    node_id: str, address: str, part: list[int], encoded: Sequence[tuple[bytes, kv_pb2.Operation]]
) -> Chunk:
    request = kv_pb2.BatchRequest(operations=[encoded[i][1] for i in part])
    return Chunk(node_id, address, part, request)


def needs_resend(result: Result) -> bool:
    """Refused for a stale map, or failed without running where another try may succeed (the
    node was unreachable or stopping, or no leader was known yet): safe to send again, even an
    unconditional put."""
    return isinstance(result, KvError) and (
        result.invalid_metadata or (result.never_ran and result.retriable)
    )


def first_error(results: Sequence[Result]) -> KvError | None:
    return next((r for r in results if isinstance(r, KvError)), None)


class BatchRun:
    """One ``batch()`` call across its rounds: what is left to send, and the results so far.

    Pure (the caller passes ``now``). Both clients drive it the same way and differ
    only in how they wait for the calls: plan the chunks, record each chunk's answer,
    then ask for another round (after ``pause``, on a fresh map), which resends only what
    provably did not run and may succeed elsewhere or later (``needs_resend``), while the
    deadline allows and for at most ``ROUNDS`` rounds. A node a whole chunk could not reach
    (or that is stopping) is suspect for the client's leader table, so the next round goes
    to another replica of each partition, which serves it or forwards it to the new leader.
    """

    ROUNDS = 8
    FIRST_PAUSE = 0.05
    MAX_PAUSE = 0.5

    def __init__(
        self,
        operations: Sequence[Operation],
        *,
        max_ops: int,
        budget: float,
        now: float,
        leaders: Leaders | None = None,
    ) -> None:
        self.encoded = [to_proto(op) for op in operations]
        self._leaders = leaders
        self.results: list[Result] = [None] * len(self.encoded)
        self.pending = list(range(len(self.encoded)))
        self.deadline = now + budget
        self.round = 0
        self.pause = 0.0
        """Seconds to wait before the round ``another_round`` just allowed."""
        self._max_ops = max_ops

    def remaining(self, now: float) -> float:
        """Seconds left for the next calls (never zero: gRPC needs a positive deadline)."""
        return max(MIN_CALL_TIMEOUT, self.deadline - now)

    def chunks(self, cluster_map: ClusterMap, now: float) -> list[Chunk]:
        return plan(cluster_map, self.encoded, self.pending, self._max_ops, self._leaders, now)

    def record(
        self,
        chunk: Chunk,
        response: kv_pb2.BatchResponse | KvError,
        *,
        never_sent: bool = False,
        now: float = 0.0,
    ) -> None:
        """One chunk's answer, or its call's error (``never_sent``: no connection was made)."""
        if isinstance(response, KvError):
            if never_sent:
                response.never_ran = True
            if self._leaders is not None and (
                never_sent or isinstance(response, ShuttingDownError)
            ):
                self._leaders.suspect(chunk.node_id, now)
        elif self._leaders is not None:
            self._leaders.answered(chunk.node_id)
        record(self.results, chunk, response)

    def another_round(self, now: float) -> bool:
        """Whether to send what is left again (then wait ``pause`` seconds first)."""
        self.pending = [i for i in self.pending if needs_resend(self.results[i])]
        self.round += 1
        left = [self.results[i] for i in self.pending]
        stale_only = all(isinstance(r, KvError) and r.invalid_metadata for r in left)
        # Stale-map refusals go at once (the new map says where); the others wait for an
        # election or a restart, with backoff.
        self.pause = 0.0 if stale_only else min(self.MAX_PAUSE, self.FIRST_PAUSE * 2**self.round)
        return bool(self.pending) and self.round < self.ROUNDS and now + self.pause < self.deadline


def values(results: Sequence[Result]) -> list[bytes | None]:
    error = first_error(results)
    if error is not None:
        raise error
    return [r.value if isinstance(r, Versioned) else None for r in results]


def versions(results: Sequence[Result]) -> list[int]:
    error = first_error(results)
    if error is not None:
        raise error
    return [r.version if isinstance(r, WriteResult) else 0 for r in results]


def record(results: list[Result], chunk: Chunk, response: kv_pb2.BatchResponse | KvError) -> None:
    """Store one chunk's outcome: per-operation results, or its call's error for each."""
    if isinstance(response, KvError):
        for index in chunk.indexes:
            results[index] = response
        return
    for index, result in zip(chunk.indexes, response.results, strict=True):
        results[index] = from_proto(result)
