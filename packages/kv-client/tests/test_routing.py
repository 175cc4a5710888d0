"""Pure parts of the SDK: error mapping, retry decisions, map routing, batch planning."""

from __future__ import annotations

import grpc
import pytest
from grpc import StatusCode as Code

from kv.v1 import kv_pb2
from kv_client import _calls, batch
from kv_client.coalesce import CoalesceConfig, take_group
from kv_client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    StaleMapError,
    TooLargeError,
    UnavailableError,
    error_from_status,
)
from kv_client.retry import RetryPolicy, Safety, next_pause
from kv_client.types import WriteResult
from kv_common.cluster_map import ClusterMap, ClusterMapError, Member
from kv_common.wire import STALE_MAP_PREFIX

MEMBERS = (Member("a", "127.0.0.1:1"), Member("b", "127.0.0.1:2"), Member("c", "127.0.0.1:3"))


def cluster_map(epoch: int = 1) -> ClusterMap:
    return ClusterMap.build(
        epoch=epoch, members=MEMBERS, partitions=256, replication_factor=1, vnodes=32
    )


@pytest.mark.parametrize(
    ("code", "details", "kind", "retriable", "stale"),
    [
        (
            Code.INVALID_ARGUMENT,
            "key must not be empty",
            InvalidArgumentError,
            False,
            False,
        ),
        (
            Code.RESOURCE_EXHAUSTED,
            "value is 9 bytes; the limit is 8",
            TooLargeError,
            False,
            False,
        ),
        (Code.RESOURCE_EXHAUSTED, "server overloaded", UnavailableError, True, False),
        (Code.UNAVAILABLE, "owner 'b' is unreachable", UnavailableError, True, False),
        (Code.DEADLINE_EXCEEDED, "late", DeadlineExceededError, False, False),
        (
            Code.FAILED_PRECONDITION,
            f"{STALE_MAP_PREFIX}: moved",
            StaleMapError,
            True,
            True,
        ),
        (
            Code.FAILED_PRECONDITION,
            "cluster lists differ",
            FailedPreconditionError,
            False,
            False,
        ),
    ],
)
def test_status_codes_map_to_typed_errors(
    code: grpc.StatusCode, details: str, kind: type, retriable: bool, stale: bool
) -> None:
    error = error_from_status(code, details)
    assert type(error) is kind
    assert (error.retriable, error.invalid_metadata) == (retriable, stale)
    assert error.message == details


def test_retry_rules_follow_call_safety() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, multiplier=2.0, max_backoff=0.15)
    down = UnavailableError("down")
    stale = StaleMapError("stale")
    bad = InvalidArgumentError("bad")

    def pause(
        error: Exception, safety: Safety, *, attempt: int = 0, sent: bool = True
    ) -> float | None:
        assert isinstance(error, (UnavailableError, StaleMapError, InvalidArgumentError))
        return next_pause(
            policy, error, attempt=attempt, safety=safety, never_sent=not sent, time_left=10.0
        )

    assert pause(down, Safety.IDEMPOTENT) == 0.1
    assert pause(down, Safety.CONDITIONAL) == 0.1
    assert pause(down, Safety.UNCONDITIONAL) is None, "a put that may have run is not resent"
    assert pause(down, Safety.UNCONDITIONAL, sent=False) == 0.1
    assert pause(stale, Safety.UNCONDITIONAL) == 0.1, "a stale-map refusal never ran"
    assert pause(bad, Safety.IDEMPOTENT) is None
    assert pause(down, Safety.IDEMPOTENT, attempt=1) == 0.15, "backoff is capped"
    assert pause(down, Safety.IDEMPOTENT, attempt=2) is None, "attempts are bounded"
    assert (
        next_pause(
            policy, down, attempt=0, safety=Safety.IDEMPOTENT, never_sent=False, time_left=0.05
        )
        is None
    ), "no retry that cannot finish before the deadline"


def test_keys_are_checked_and_encoded() -> None:
    assert _calls.encode_key("é") == "é".encode()
    assert _calls.encode_key(b"\x00") == b"\x00"
    with pytest.raises(InvalidArgumentError):
        _calls.encode_key("")
    with pytest.raises(InvalidArgumentError, match="4096"):
        _calls.encode_key(b"x" * 4097)
    with pytest.raises(InvalidArgumentError, match="non-negative"):
        _calls.put_if_version("k", "v", -1)


def test_cluster_map_routes_with_the_shared_placement() -> None:
    cmap = cluster_map()
    roundtrip = ClusterMap.from_proto(cmap.to_proto())
    for i in range(200):
        key = f"k{i}".encode()
        assert roundtrip.owner_of(key) == cmap.owner_of(key)
        node_id, address = cmap.owner_of(key)
        assert cmap.addresses[node_id] == address
        location = cmap.locate(key)
        assert (location.node_id, location.partition) == (node_id, cmap.placement.partition_of(key))
    with pytest.raises(ClusterMapError, match="twice"):
        ClusterMap.build(
            epoch=1, members=(*MEMBERS, MEMBERS[0]), partitions=256, replication_factor=1, vnodes=8
        )
    with pytest.raises(ClusterMapError):
        ClusterMap.build(epoch=1, members=MEMBERS, partitions=100, replication_factor=1, vnodes=8)


def test_batch_plan_groups_by_owner_and_chunks() -> None:
    cmap = cluster_map()
    ops = [batch.Put(f"k{i}", "v") for i in range(50)]
    encoded = [batch.to_proto(op) for op in ops]
    chunks = batch.plan(cmap, encoded, range(50), max_ops=7)
    assert sorted(i for c in chunks for i in c.indexes) == list(range(50))
    for chunk in chunks:
        assert len(chunk.indexes) <= 7
        assert {cmap.owner_of(encoded[i][0])[0] for i in chunk.indexes} == {chunk.node_id}
        assert [op.put.key for op in chunk.request.operations] == [
            encoded[i][0] for i in chunk.indexes
        ]


def test_batch_results_decode_per_operation() -> None:
    results: list[batch.Result] = [None, None, None]
    chunk = batch.Chunk("a", "x", [2, 0], kv_pb2.BatchRequest())
    response = kv_pb2.BatchResponse(
        results=[
            kv_pb2.OperationResult(put=kv_pb2.PutResponse(succeeded=True, version=4)),
            kv_pb2.OperationResult(
                error=kv_pb2.OperationError(code=14, message="owner 'b' is unreachable")
            ),
        ]
    )
    batch.record(results, chunk, response)
    assert results[2] == WriteResult(True, 4)
    assert isinstance(results[0], UnavailableError)
    with pytest.raises(UnavailableError):
        batch.values(results)


def test_coalesced_groups_respect_count_and_bytes() -> None:
    class Waiting:
        def __init__(self, size: int) -> None:
            self.operation = kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"k", value=b"v" * size))

    config = CoalesceConfig(max_ops=3, max_bytes=100)
    queue = [Waiting(10) for _ in range(5)]
    assert len(take_group(queue, config)) == 3
    assert len(queue) == 2
    big = [Waiting(500), Waiting(10)]
    assert len(take_group(big, config)) == 1, "an oversized call still goes, alone"
    assert len(take_group(big, config)) == 1
