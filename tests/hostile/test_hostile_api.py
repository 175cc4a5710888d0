"""Hostile input, API level: well-formed requests that push every rule, on two real lmdb nodes.

Every limit at, just below and just above its bound, alone and inside batches, sent to the
key's owner and to the other node (which forwards); batches mixing valid and invalid
operations; odd versions; forged routing metadata; deadlines from 1 ms to days; calls
cancelled in flight. The nodes are started with small limits so that every bound is cheap
to reach, and each refusal must carry the reason the README's error table gives.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hostile.target import CALL_TIMEOUT, Target, Value, error_info, hostile_target, is_kv_refusal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv.v1 import kv_pb2
from kv_common.cluster_map import ClusterMap
from kv_common.limits import MAX_KEY_BYTES
from kv_common.wire import EPOCH_METADATA, HOP_METADATA, Reason

MAX_VALUE = 4096
MAX_OPS = 20
MAX_BATCH_BYTES = 64 * 1024
LIMIT_FLAGS = [
    "--max-value-bytes",
    str(MAX_VALUE),
    "--max-batch-ops",
    str(MAX_OPS),
    "--max-batch-bytes",
    str(MAX_BATCH_BYTES),
]
GRPC_CEILING = MAX_BATCH_BYTES + 64 * 1024
"""The node's gRPC message ceiling: the largest batch plus 64 KiB of framing."""

U64_MAX = 2**64 - 1
NODES = ("n1", "n2")
ENTRY = "n1"
"""Every call goes to n1; keys owned by n2 are forwarded (or refused, when marked)."""


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with hostile_target(tmp_path_factory.mktemp("api"), NODES, LIMIT_FLAGS) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def cluster_map(target: Target) -> ClusterMap:
    return target.cluster_map()


def key_of(cluster_map: ClusterMap, owner: str, prefix: str, size: int = 0) -> bytes:
    """A key that ``owner`` owns, padded to ``size`` bytes if given."""
    for i in range(10_000):
        key = f"{prefix}{i}-".encode().ljust(size, b"k")
        assert not size or len(key) == size, f"prefix {prefix!r} is too long for {size} bytes"
        if cluster_map.owner_of(key)[0] == owner:
            return key
    raise AssertionError(f"no {size}-byte key for {owner}")


def put(key: bytes, value: bytes = b"v", if_version: int | None = None) -> kv_pb2.PutRequest:
    return kv_pb2.PutRequest(key=key, value=value, if_version=if_version)


def refusal(target: Target, name: str, request: bytes, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        target.call(name, request, node_id=ENTRY, **kwargs)  # type: ignore[arg-type]
    return raised.value


def refused_with(error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> dict[str, str]:
    assert isinstance(error, grpc.Call)
    assert error.code() == code, (error.code(), error.details())
    info = error_info(error)
    assert info is not None and info.reason == reason, info
    return dict(info.metadata)


# What one operation of each size meets: None is accepted, else (code, reason, limit).
KEY_SIZES = [
    (MAX_KEY_BYTES - 1, None),
    (MAX_KEY_BYTES, None),
    (MAX_KEY_BYTES + 1, (grpc.StatusCode.INVALID_ARGUMENT, Reason.KEY_TOO_LARGE, MAX_KEY_BYTES)),
]
VALUE_SIZES = [
    (0, None),
    (MAX_VALUE - 1, None),
    (MAX_VALUE, None),
    (MAX_VALUE + 1, (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.VALUE_TOO_LARGE, MAX_VALUE)),
]
Expected = tuple[grpc.StatusCode, Reason, int] | None


@pytest.mark.parametrize("owner", NODES)
@pytest.mark.parametrize(("size", "expected"), KEY_SIZES)
@pytest.mark.parametrize("name", ["Put", "Get", "Delete"])
def test_key_sizes_around_the_limit(
    target: Target,
    cluster_map: ClusterMap,
    owner: str,
    size: int,
    expected: Expected,
    name: str,
) -> None:
    key = key_of(cluster_map, owner, f"keysize-{name}-", size)
    message = {"Put": put(key), "Get": kv_pb2.GetRequest(key=key)}.get(
        name, kv_pb2.DeleteRequest(key=key)
    )
    request = message.SerializeToString()
    if expected is None:
        target.call(name, request, node_id=ENTRY)
        return
    code, reason, limit = expected
    metadata = refused_with(refusal(target, name, request), code, reason)
    assert metadata == {"limit": str(limit), "size": str(size)}


@pytest.mark.parametrize("owner", NODES)
@pytest.mark.parametrize(("size", "expected"), VALUE_SIZES)
def test_value_sizes_around_the_limit(
    target: Target, cluster_map: ClusterMap, owner: str, size: int, expected: Expected
) -> None:
    key = key_of(cluster_map, owner, f"valuesize-{size}-")
    request = put(key, b"x" * size).SerializeToString()
    if expected is None:
        assert kv_pb2.PutResponse.FromString(target.call("Put", request, node_id=ENTRY)).succeeded
        return
    code, reason, limit = expected
    metadata = refused_with(refusal(target, "Put", request), code, reason)
    assert metadata == {"limit": str(limit), "size": str(size)}
    assert target.read([key])[key] is None


def test_empty_keys_are_refused(target: Target) -> None:
    for name, message in (
        ("Put", put(b"")),
        ("Get", kv_pb2.GetRequest()),
        ("Delete", kv_pb2.DeleteRequest()),
    ):
        error = refusal(target, name, message.SerializeToString())
        assert refused_with(error, grpc.StatusCode.INVALID_ARGUMENT, Reason.KEY_EMPTY) == {}


def test_a_message_over_the_grpc_ceiling_is_refused_by_grpc(target: Target) -> None:
    request = put(b"ceiling", b"x" * GRPC_CEILING).SerializeToString()
    error = refusal(target, "Put", request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert target.read([b"ceiling"])[b"ceiling"] is None


def operation(kind: str, key: bytes, value: bytes = b"") -> kv_pb2.Operation:
    if kind == "put":
        return kv_pb2.Operation(put=put(key, value))
    if kind == "get":
        return kv_pb2.Operation(get=kv_pb2.GetRequest(key=key))
    return kv_pb2.Operation(delete=kv_pb2.DeleteRequest(key=key))


@pytest.mark.parametrize("owner", NODES)
def test_a_batch_mixing_valid_and_invalid_operations(
    target: Target, cluster_map: ClusterMap, owner: str
) -> None:
    """Valid operations are applied; each invalid one is refused with its own reason."""

    def key(size: int, tag: str) -> bytes:
        return key_of(cluster_map, owner, f"mixed-{tag}-", size)

    cases: list[tuple[kv_pb2.Operation, str | None]] = [
        (operation("put", key(MAX_KEY_BYTES, "a"), b"at the key limit"), None),
        (operation("put", key(MAX_KEY_BYTES + 1, "b"), b"v"), Reason.KEY_TOO_LARGE),
        (operation("put", key(20, "c"), b"x" * MAX_VALUE), None),
        (operation("put", key(20, "d"), b"x" * (MAX_VALUE + 1)), Reason.VALUE_TOO_LARGE),
        (operation("get", b""), Reason.KEY_EMPTY),
        (operation("delete", key(MAX_KEY_BYTES + 1, "e")), Reason.KEY_TOO_LARGE),
        (kv_pb2.Operation(), Reason.INVALID_REQUEST),
        (operation("get", key(MAX_KEY_BYTES, "a")), None),
        (operation("delete", key(20, "c")), None),
        (operation("get", key(MAX_KEY_BYTES - 1, "f")), None),
    ]
    request = kv_pb2.BatchRequest(operations=[op for op, _ in cases])
    reply = kv_pb2.BatchResponse.FromString(
        target.call("Batch", request.SerializeToString(), node_id=ENTRY)
    )
    assert len(reply.results) == len(cases)
    for (op, reason), result in zip(cases, reply.results, strict=True):
        if reason is None:
            assert result.WhichOneof("result") == op.WhichOneof("op"), result
        else:
            assert result.WhichOneof("result") == "error", result
            assert result.error.reason == reason
    assert reply.results[7].get.value == b"at the key limit"
    stored = target.read([key(MAX_KEY_BYTES, "a"), key(20, "c"), key(20, "d")])
    assert list(stored.values())[1:] == [None, None]


def batch_of_bytes(prefix: bytes, size: int) -> kv_pb2.BatchRequest:
    """A batch of puts, each value within the limit, whose encoded size is exactly ``size``."""
    count = -(-size // (MAX_VALUE - PUT_FRAMING_BYTES))
    value = b"x" * (size // count - PUT_FRAMING_BYTES)
    request = kv_pb2.BatchRequest(
        operations=[operation("put", prefix + b"%d" % i, value) for i in range(count)]
    )
    framing = request.ByteSize() - count * len(value)
    for op in request.operations:  # spread the bytes still missing over every value
        op.put.value = b"x" * ((size - framing) // count)
    last = request.operations[-1].put
    while request.ByteSize() != size:
        missing = size - request.ByteSize()
        last.value = last.value + b"y" * missing if missing > 0 else last.value[:missing]
    assert count <= MAX_OPS and len(last.value) <= MAX_VALUE
    return request


PUT_FRAMING_BYTES = 64
"""More than a put's key and tags add to its value inside a Batch."""


@pytest.mark.parametrize(
    ("count", "size", "unit"),
    [
        (MAX_OPS - 1, None, None),
        (MAX_OPS, None, None),
        (MAX_OPS + 1, None, "operations"),
        (None, MAX_BATCH_BYTES - 1, None),
        (None, MAX_BATCH_BYTES, None),
        (None, MAX_BATCH_BYTES + 1, "bytes"),
    ],
)
def test_batch_limits(
    target: Target, count: int | None, size: int | None, unit: str | None
) -> None:
    prefix = b"batchlimit-%d-%d-" % (count or 0, size or 0)
    if count is not None:
        request = kv_pb2.BatchRequest(
            operations=[operation("put", prefix + b"%d" % i, b"v") for i in range(count)]
        )
    else:
        assert size is not None
        request = batch_of_bytes(prefix, size)
    keys = [op.put.key for op in request.operations]
    if unit is None:
        reply = kv_pb2.BatchResponse.FromString(
            target.call("Batch", request.SerializeToString(), node_id=ENTRY)
        )
        assert all(r.put.succeeded for r in reply.results)
        return
    error = refusal(target, "Batch", request.SerializeToString())
    metadata = refused_with(error, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.BATCH_TOO_LARGE)
    assert metadata["unit"] == unit
    assert metadata["limit"] == str(MAX_OPS if unit == "operations" else MAX_BATCH_BYTES)
    assert all(value is None for value in target.read(keys).values()), "a refused batch wrote"


@pytest.mark.parametrize("owner", NODES)
def test_odd_versions(target: Target, cluster_map: ClusterMap, owner: str) -> None:
    present = key_of(cluster_map, owner, "version-present-")
    absent = key_of(cluster_map, owner, "version-absent-")
    version = target.put(present, b"first", node_id=ENTRY)

    def put_if(key: bytes, if_version: int) -> tuple[bool, int]:
        request = put(key, b"conditional", if_version).SerializeToString()
        reply = kv_pb2.PutResponse.FromString(target.call("Put", request, node_id=ENTRY))
        return reply.succeeded, reply.version

    def delete_if(key: bytes, if_version: int) -> tuple[bool, bool, int]:
        request = kv_pb2.DeleteRequest(key=key, if_version=if_version).SerializeToString()
        reply = kv_pb2.DeleteResponse.FromString(target.call("Delete", request, node_id=ENTRY))
        return reply.succeeded, reply.found, reply.version

    assert put_if(present, U64_MAX) == (False, version)
    assert put_if(present, 0) == (False, version)
    assert put_if(present, version + 1) == (False, version)
    # A delete whose condition fails reports found=False: it removed nothing.
    assert delete_if(present, U64_MAX) == (False, False, version)
    assert delete_if(present, 0) == (False, False, version)
    assert put_if(absent, U64_MAX) == (False, 0)
    assert delete_if(absent, U64_MAX) == (False, False, 0)
    assert delete_if(absent, 0) == (True, False, 0)
    assert target.read([present, absent]) == {present: (b"first", version), absent: None}
    created, new_version = put_if(absent, 0)
    assert created and new_version > version


EPOCH_VALUES = ["garbage", "9" * 1000, "-1", "", "0", "18446744073709551616"]
HOP_VALUES = ["n2", "n1", "", "<script>" + "x" * 2000]


@pytest.mark.parametrize("epoch", EPOCH_VALUES)
def test_forged_epochs(target: Target, cluster_map: ClusterMap, epoch: str) -> None:
    """Any kv-epoch marks a call as routed: the owner serves it, another node says where the
    key lives (with its own epoch, never the forged value), and nothing is forwarded."""
    metadata = ((EPOCH_METADATA, epoch),)
    mine = key_of(cluster_map, ENTRY, "epoch-mine-")
    theirs = key_of(cluster_map, "n2", "epoch-theirs-")
    target.call("Put", put(mine).SerializeToString(), node_id=ENTRY, metadata=metadata)
    error = refusal(target, "Put", put(theirs).SerializeToString(), metadata=metadata)
    where = refused_with(error, grpc.StatusCode.FAILED_PRECONDITION, Reason.STALE_MAP)
    assert where["epoch"] == str(cluster_map.epoch) and where["owner_id"] == "n2"
    assert epoch not in (error.details() or "") or len(epoch) < 2
    assert target.read([theirs])[theirs] is None


@pytest.mark.parametrize("hop", HOP_VALUES)
def test_forged_hop_markers(target: Target, cluster_map: ClusterMap, hop: str) -> None:
    """A forged kv-forwarded-by is served by the owner and refused, not forwarded, elsewhere;
    in a batch, per operation."""
    metadata = ((HOP_METADATA, hop),)
    mine = key_of(cluster_map, ENTRY, "hop-mine-")
    theirs = key_of(cluster_map, "n2", "hop-theirs-")
    target.call("Put", put(mine).SerializeToString(), node_id=ENTRY, metadata=metadata)
    error = refusal(target, "Put", put(theirs).SerializeToString(), metadata=metadata)
    refused_with(error, grpc.StatusCode.FAILED_PRECONDITION, Reason.NOT_OWNER)
    assert "script" not in (error.details() or "")
    batch = kv_pb2.BatchRequest(operations=[operation("put", mine), operation("put", theirs)])
    reply = kv_pb2.BatchResponse.FromString(
        target.call("Batch", batch.SerializeToString(), node_id=ENTRY, metadata=metadata)
    )
    assert reply.results[0].put.succeeded
    assert reply.results[1].error.reason == Reason.NOT_OWNER
    assert target.read([theirs])[theirs] is None


DEADLINES = [0.001, 0.003, 0.01, 0.05, 1.0, 3600.0, 3 * 86400.0]


@pytest.mark.parametrize("owner", NODES)
@pytest.mark.parametrize("deadline", DEADLINES)
def test_deadlines_from_a_millisecond_to_days(
    target: Target, cluster_map: ClusterMap, owner: str, deadline: float
) -> None:
    """A write either completes or fails as the deadline says; the ledger keeps unknown ones."""
    key = key_of(cluster_map, owner, f"deadline-{deadline}-")
    batch = kv_pb2.BatchRequest(operations=[operation("put", key + b"/b", b"batched")])
    for name, request in (
        ("Put", put(key, b"timed").SerializeToString()),
        ("Batch", batch.SerializeToString()),
    ):
        try:
            target.call(name, request, node_id=ENTRY, timeout=deadline)
            continue
        except grpc.RpcError as raised:
            error = raised
        assert isinstance(error, grpc.Call)
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            # The node's own refusal when its budget for forwarding ran out first.
            assert is_kv_refusal(error), (error.code(), error.details())
            info = error_info(error)
            assert info is not None
            assert info.reason in (Reason.DEADLINE_EXCEEDED, Reason.OWNER_UNAVAILABLE)
    if deadline >= 1.0:
        assert target.ledger.known.get(key) is not None, "a generous deadline was not met"


CANCELLED_CALLS = 40


@pytest.mark.parametrize("owner", NODES)
def test_calls_cancelled_in_flight(target: Target, cluster_map: ClusterMap, owner: str) -> None:
    """Puts and batches cancelled at once, or after others finish: each write is applied
    whole or not at all, and the node serves on."""
    started = []
    raw_put, raw_batch = target.raw("Put", ENTRY), target.raw("Batch", ENTRY)
    for i in range(CANCELLED_CALLS):
        key = key_of(cluster_map, owner, f"cancel-{i}-")
        value = b"%d" % i * 500
        if i % 2:
            request = put(key, value).SerializeToString()
            started.append(("Put", request, raw_put.future(request, timeout=CALL_TIMEOUT)))
        else:
            ops = [operation("put", key + b"/%d" % j, value) for j in range(3)]
            request = kv_pb2.BatchRequest(operations=ops).SerializeToString()
            started.append(("Batch", request, raw_batch.future(request, timeout=CALL_TIMEOUT)))
        if i % 3 == 0:
            started[-1][2].cancel()
    for _, _, future in started[1::3]:
        future.cancel()
    outcomes = [target.settle(name, request, future) for name, request, future in started]
    assert any(o is None for o in outcomes), "nothing was cancelled: the test proves nothing"
    target.put(key_of(cluster_map, owner, "after-cancel-"), b"still serving", node_id=ENTRY)


FUZZ_KEYS = [b"fuzz/%d" % i for i in range(4)]
BAD_KEYS = [b"", b"k" * (MAX_KEY_BYTES + 1)]
REASONS = {str(reason) for reason in Reason}


@st.composite
def fuzz_operation(draw: st.DrawFn) -> kv_pb2.Operation:
    """Any operation a client can express: a few shared keys (owned by both nodes), bad
    keys, values around the limit, and conditions that may or may not hold."""
    # Repeats weight the choices: mostly valid keys and operations, so that writes and reads
    # of one key meet in a batch often; versions near the keys' current ones.
    key = draw(st.sampled_from(FUZZ_KEYS * 4 + BAD_KEYS))
    version = draw(st.sampled_from([None, None, None, 0, 1, 2, 3, 5, 8, 13, 21, U64_MAX]))
    kind = draw(st.sampled_from(["put", "put", "get", "get", "delete", "none"]))
    if kind == "put":
        size = draw(st.sampled_from([0, 1, MAX_VALUE, MAX_VALUE + 1]))
        return kv_pb2.Operation(put=put(key, b"p" * size, version))
    if kind == "delete":
        return kv_pb2.Operation(delete=kv_pb2.DeleteRequest(key=key, if_version=version))
    if kind == "get":
        return kv_pb2.Operation(get=kv_pb2.GetRequest(key=key))
    return kv_pb2.Operation()


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(operations=st.lists(fuzz_operation(), min_size=1, max_size=MAX_OPS))
def test_random_batches_across_both_nodes(
    target: Target, cluster_map: ClusterMap, operations: list[kv_pb2.Operation]
) -> None:
    """Whatever a batch holds, each operation gets its own result and every refusal a
    reason the README lists; and each result agrees with a model of the keys that starts
    from what the ledger knows and applies the batch's operations in order."""
    assert {cluster_map.owner_of(key)[0] for key in FUZZ_KEYS} == set(NODES)
    model: dict[bytes, Value] = {
        key: target.ledger.known.get(key) for key in FUZZ_KEYS if key not in target.ledger.maybe
    }
    request = kv_pb2.BatchRequest(operations=operations).SerializeToString()
    reply = kv_pb2.BatchResponse.FromString(target.call("Batch", request, node_id=ENTRY))
    assert len(reply.results) == len(operations)
    for operation, result in zip(operations, reply.results, strict=True):
        kind = result.WhichOneof("result")
        if kind == "error":
            assert result.error.reason in REASONS, result.error
            assert result.error.code != grpc.StatusCode.INTERNAL.value[0], result.error
            continue
        assert kind is not None and kind == operation.WhichOneof("op")
        key = getattr(operation, kind).key
        if key not in model:
            continue  # an earlier write's outcome is unknown: nothing to compare with
        current = model[key]
        current_version = current[1] if current is not None else 0
        if kind == "get":
            got = result.get
            assert ((got.value, got.version) if got.found else None) == current
        elif kind == "put":
            if result.put.succeeded:
                assert result.put.version > current_version
                model[key] = (operation.put.value, result.put.version)
            else:
                assert result.put.version == current_version
        elif result.delete.succeeded:
            assert result.delete.found == (current is not None)
            model[key] = None
        else:
            assert result.delete.version == current_version


def test_after_every_attack_acknowledged_writes_survive_kill_9(target: Target) -> None:
    target.crash_and_check()
