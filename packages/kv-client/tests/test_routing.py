"""Pure parts of the SDK: key checks, map routing, batch planning and batch results."""

from __future__ import annotations

import pytest
from grpc import StatusCode as Code

from kv.v1 import kv_pb2
from kv_client import _calls, batch
from kv_client.errors import (
    InternalError,
    InvalidArgumentError,
    NotLeaderError,
    StaleMapError,
    UnavailableError,
)
from kv_client.leaders import Leaders
from kv_client.types import Versioned, WriteResult
from kv_common.cluster_map import ClusterMap, ClusterMapError, Member
from kv_common.wire import Reason

MEMBERS = (Member("a", "127.0.0.1:1"), Member("b", "127.0.0.1:2"), Member("c", "127.0.0.1:3"))


def cluster_map(epoch: int = 1) -> ClusterMap:
    return ClusterMap.build(
        epoch=epoch, members=MEMBERS, partitions=256, replication_factor=1, vnodes=32
    )


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


def test_batch_results_decode_every_result_type() -> None:
    """Each of the five results an operation can have, in the caller's order."""
    results: list[batch.Result] = [None] * 6
    results[5] = WriteResult(True, 99)  # a slot the chunk does not cover keeps its value
    chunk = batch.Chunk("a", "x", [4, 0, 3, 1, 2], kv_pb2.BatchRequest())
    stale = kv_pb2.OperationError(
        code=Code.FAILED_PRECONDITION.value[0],
        message="moved",
        reason=Reason.STALE_MAP,
        metadata={"epoch": "3", "owner_id": "b"},
    )
    response = kv_pb2.BatchResponse(
        results=[
            kv_pb2.OperationResult(get=kv_pb2.GetResponse(found=True, value=b"v", version=7)),
            kv_pb2.OperationResult(get=kv_pb2.GetResponse(found=False)),
            kv_pb2.OperationResult(put=kv_pb2.PutResponse(succeeded=False, version=4)),
            kv_pb2.OperationResult(
                delete=kv_pb2.DeleteResponse(succeeded=True, found=True, version=9)
            ),
            kv_pb2.OperationResult(error=stale),
        ]
    )
    batch.record(results, chunk, response)
    assert results[4] == Versioned(b"v", 7)
    assert results[0] is None
    assert results[3] == WriteResult(False, 4)
    assert results[1] == WriteResult(True, 9)
    error = results[2]
    assert isinstance(error, StaleMapError)
    assert (error.reason, dict(error.metadata)) == ("STALE_MAP", {"epoch": "3", "owner_id": "b"})
    assert results[5] == WriteResult(True, 99)
    assert batch.needs_resend(error) and not batch.needs_resend(results[1])
    with pytest.raises(StaleMapError):
        batch.values(results)
    with pytest.raises(StaleMapError):
        batch.versions(results)


def test_an_empty_result_and_a_failed_chunk_are_errors() -> None:
    results: list[batch.Result] = [None, None]
    chunk = batch.Chunk("a", "x", [0, 1], kv_pb2.BatchRequest())
    batch.record(results, chunk, kv_pb2.BatchResponse(results=[kv_pb2.OperationResult()] * 2))
    assert all(isinstance(r, InternalError) for r in results)
    down = UnavailableError("node down")
    batch.record(results, chunk, down)
    assert results == [down, down]


def test_a_batch_run_resends_what_did_not_run_within_its_rounds_and_deadline() -> None:
    ops: list[batch.Operation] = [
        batch.Put("a", "1"),
        batch.Put("b", "2"),
        batch.Get("c"),
        batch.Put("d", "4"),
    ]
    run = batch.BatchRun(ops, max_ops=10, budget=2.0, now=0.0)
    assert run.remaining(0.5) == 1.5 and run.remaining(3.0) == batch.MIN_CALL_TIMEOUT
    no_leader = NotLeaderError("no leader yet", code=Code.UNAVAILABLE)
    run.results = [
        StaleMapError("moved"),
        WriteResult(True, 1),
        UnavailableError("down"),
        no_leader,
    ]
    assert run.another_round(now=1.0)
    # A put that may have run (a lost connection) is never sent twice; one that provably did
    # not (a stale map, no leader yet) is.
    assert run.pending == [0, 3]
    assert run.pause > 0, "an election is waited out with backoff"
    run.results[0] = WriteResult(True, 2)
    for _ in range(batch.BatchRun.ROUNDS):
        if not run.another_round(now=1.0):
            break
    assert run.round == batch.BatchRun.ROUNDS, "rounds are bounded"
    stale = batch.BatchRun([batch.Get("a")], max_ops=10, budget=2.0, now=0.0)
    stale.results = [StaleMapError("moved")]
    assert stale.another_round(now=1.0) and stale.pause == 0.0, "a new map: at once"
    late = batch.BatchRun([batch.Get("a")], max_ops=10, budget=2.0, now=0.0)
    late.results = [StaleMapError("moved")]
    assert not late.another_round(now=2.0), "not past the deadline"


def ok() -> kv_pb2.OperationResult:
    return kv_pb2.OperationResult(put=kv_pb2.PutResponse(succeeded=True, version=1))


def test_a_chunk_that_could_not_connect_never_ran_and_its_node_is_avoided() -> None:
    leaders = Leaders()
    replicated = ClusterMap.build(
        epoch=1, members=MEMBERS, partitions=16, replication_factor=3, vnodes=8
    )
    run = batch.BatchRun(
        [batch.Put(f"k{i}", "v") for i in range(30)], max_ops=100, budget=5.0, now=0.0,
        leaders=leaders,
    )  # fmt: skip
    chunks = run.chunks(replicated, now=0.0)
    dead = chunks[0]
    refused = UnavailableError("failed to connect", code=Code.UNAVAILABLE)
    run.record(dead, refused, never_sent=True, now=0.0)
    for chunk in chunks[1:]:
        run.record(chunk, kv_pb2.BatchResponse(results=[ok() for _ in chunk.indexes]), now=0.0)
    assert run.another_round(now=0.1)
    assert sorted(run.pending) == sorted(dead.indexes)
    again = run.chunks(replicated, now=0.1 + run.pause)
    assert again and all(c.node_id != dead.node_id for c in again)
