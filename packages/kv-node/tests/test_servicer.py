"""The node's gRPC behaviour, against real servers in this process."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_common.cluster_map import ClusterMap
from kv_common.limits import MAX_KEY_BYTES
from kv_common.wire import (
    EPOCH_METADATA,
    HOP_METADATA,
    NEVER_RAN,
    ErrorInfo,
    Reason,
    decode_status_details,
)
from kv_node import routing
from kv_node.store import Store
from kv_node.testing import HungOwner, InProcessCluster


def store_of(cluster: InProcessCluster, name: str) -> Store:
    """The single-copy store of node ``name`` (these nodes are not replicated)."""
    store = cluster.servers[name].node.store
    assert store is not None
    return store


def details(error: BaseException) -> str:
    assert isinstance(error, grpc.RpcError)
    text: str | None = error.details()
    return text or ""


def error_info(error: BaseException) -> ErrorInfo:
    """The ErrorInfo every refusal must carry."""
    assert isinstance(error, grpc.Call)
    info = decode_status_details(tuple(error.trailing_metadata() or ()))
    assert info is not None, f"no ErrorInfo in {error!r}"
    return info


def stub(cluster: InProcessCluster, node_id: str) -> kv_pb2_grpc.KVServiceStub:
    return kv_pb2_grpc.KVServiceStub(grpc.insecure_channel(cluster.addresses[node_id]))


def counted(cluster: InProcessCluster, node_id: str, name: str, **labels: str) -> float:
    value = cluster.servers[node_id].node.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_any_node_forwards_to_the_owner(cluster: InProcessCluster) -> None:
    key = cluster.key_owned_by("b")
    via_a = stub(cluster, "a")
    put = via_a.Put(kv_pb2.PutRequest(key=key, value=b"v"), timeout=5)
    assert put.succeeded and put.version == 1
    got = stub(cluster, "c").Get(kv_pb2.GetRequest(key=key), timeout=5)
    assert (got.found, got.value, got.version) == (True, b"v", 1)
    assert store_of(cluster, "b").get(key) == (b"v", 1)
    assert store_of(cluster, "a").get(key) is None
    assert cluster.servers["a"].node.requests_forwarded == 1
    assert cluster.servers["c"].node.requests_forwarded == 1
    assert cluster.servers["b"].node.requests_forwarded == 0


def test_routed_request_to_the_wrong_node_says_the_map_is_stale(
    cluster: InProcessCluster,
) -> None:
    key = cluster.key_owned_by("b")
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster, "a").Get(
            kv_pb2.GetRequest(key=key), timeout=5, metadata=((EPOCH_METADATA, "1"),)
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value) == ErrorInfo(
        Reason.STALE_MAP,
        {"epoch": "1", "owner_id": "b", "owner_address": cluster.addresses["b"]},
    )
    assert "'b'" in details(info.value)
    assert cluster.servers["a"].node.requests_forwarded == 0


def test_forwarded_request_is_never_forwarded_again_and_forged_text_is_not_echoed(
    cluster: InProcessCluster,
) -> None:
    key = cluster.key_owned_by("b")
    forged = "<script>" + "x" * 2000
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster, "a").Put(
            kv_pb2.PutRequest(key=key, value=b"v"), timeout=5, metadata=((HOP_METADATA, forged),)
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == Reason.NOT_OWNER
    assert error_info(info.value).metadata["owner_id"] == "b"
    message = details(info.value)
    assert "script" not in message and "xxxx" not in message
    assert "cluster list" not in message and "config" not in message
    assert store_of(cluster, "b").get(key) is None


def test_unreachable_owner_is_named_and_fails_fast(
    cluster_with_c_down: InProcessCluster,
) -> None:
    cluster = cluster_with_c_down
    key = cluster.key_owned_by("c")
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster, "a").Get(kv_pb2.GetRequest(key=key), timeout=10)
    assert time.monotonic() - start < 5
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Nothing reached the owner (the connect was refused): the refusal says the operation
    # never ran, so that an SDK may resend even an unconditional write.
    assert error_info(info.value) == ErrorInfo(
        Reason.OWNER_UNAVAILABLE,
        {"owner_id": "c", "owner_address": cluster.addresses["c"], NEVER_RAN: "true"},
    )
    assert "owner 'c'" in details(info.value)
    # The other nodes' keys still work.
    other = cluster.key_owned_by("b")
    assert stub(cluster, "a").Put(kv_pb2.PutRequest(key=other, value=b"x"), timeout=5).succeeded


@pytest.fixture
def hung_b(hung_owner: HungOwner) -> Iterator[InProcessCluster]:
    """Node a, with its peer b a server that accepts calls and never answers."""
    nodes = InProcessCluster(
        ["a", "b"], down=("b",), addresses={"b": hung_owner.address}, forward_timeout=60.0
    )
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


def slowest_round_trip(kv: kv_pb2_grpc.KVServiceStub, key: bytes, samples: int = 20) -> float:
    """How long this machine, now, takes for a local call through the node."""
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        kv.Get(kv_pb2.GetRequest(key=key), timeout=30)
        times.append(time.perf_counter() - start)
    return max(max(times), statistics.median(times) * 10)


def test_hung_owner_gives_unavailable_within_the_callers_deadline(
    hung_b: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node answers for a hung owner before the caller's own deadline.

    The node keeps back a margin of the caller's deadline to answer in; this test shares
    the GIL with the node, so the margin and the deadline are sized to this machine's
    measured round trip rather than to the 50 ms a dedicated node keeps back.
    """
    kv = stub(hung_b, "a")
    rtt = slowest_round_trip(kv, hung_b.key_owned_by("a"))
    margin = max(routing.FORWARD_MARGIN_SECONDS, 20 * rtt)
    monkeypatch.setattr(routing, "FORWARD_MARGIN_SECONDS", margin)
    monkeypatch.setattr(routing, "FORWARD_MARGIN_FRACTION", 0.5)
    deadline = max(1.0, 4 * margin)
    with pytest.raises(grpc.RpcError) as info:
        kv.Get(kv_pb2.GetRequest(key=hung_b.key_owned_by("b")), timeout=deadline)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, details(info.value)
    assert error_info(info.value).reason == Reason.OWNER_UNAVAILABLE
    assert "owner 'b'" in details(info.value)


@pytest.mark.parametrize(
    ("request_", "code", "reason", "metadata"),
    [
        (kv_pb2.PutRequest(key=b"", value=b"v"), "INVALID_ARGUMENT", Reason.KEY_EMPTY, {}),
        (
            kv_pb2.PutRequest(key=b"k" * (MAX_KEY_BYTES + 1), value=b"v"),
            "INVALID_ARGUMENT",
            Reason.KEY_TOO_LARGE,
            {"limit": str(MAX_KEY_BYTES), "size": str(MAX_KEY_BYTES + 1)},
        ),
        (
            kv_pb2.PutRequest(key=b"k", value=b"v" * 1025),
            "RESOURCE_EXHAUSTED",
            Reason.VALUE_TOO_LARGE,
            {"limit": "1024", "size": "1025"},
        ),
    ],
)
def test_bad_input_gets_a_reason_and_changes_nothing(
    cluster: InProcessCluster,
    request_: kv_pb2.PutRequest,
    code: str,
    reason: Reason,
    metadata: dict[str, str],
) -> None:
    kv = stub(cluster, "a")
    with pytest.raises(grpc.RpcError) as info:
        kv.Put(request_, timeout=5)
    assert info.value.code().name == code
    assert error_info(info.value) == ErrorInfo(reason, metadata)
    assert all(store_of(cluster, name).count() == 0 for name in cluster.servers)
    assert counted(cluster, "a", "kv_requests_total", method="Put", outcome=code) == 1
    # The node keeps serving.
    assert kv.Put(kv_pb2.PutRequest(key=b"fine", value=b"v"), timeout=5).succeeded


def test_undecodable_request_is_invalid_argument_without_internals(
    cluster: InProcessCluster,
) -> None:
    channel = grpc.insecure_channel(cluster.addresses["a"])
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/kv.v1.KVService/Put")
    truncated = b"\x0a\x05ab"  # field 1, 5 bytes announced, 2 sent
    with pytest.raises(grpc.RpcError) as info:
        raw(truncated, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(info.value).reason == Reason.INVALID_REQUEST
    message = details(info.value)
    assert "Error" not in message and "Exception" not in message and "Traceback" not in message
    assert counted(cluster, "a", "kv_requests_total", method="Put", outcome="INVALID_ARGUMENT") == 1


def test_binary_metadata_that_is_not_utf8_is_ignored(cluster: InProcessCluster) -> None:
    odd = (("trace-bin", b"\xff\xfe\x80"),)
    kv = stub(cluster, "a")
    on_b = cluster.key_owned_by("b")
    assert kv.Put(kv_pb2.PutRequest(key=on_b, value=b"1"), timeout=5, metadata=odd).succeeded
    got = kv.Get(kv_pb2.GetRequest(key=on_b), timeout=5, metadata=odd)
    assert got.value == b"1"
    response = kv.Batch(
        kv_pb2.BatchRequest(operations=[op_get(on_b), op_get(cluster.key_owned_by("a"))]),
        timeout=5,
        metadata=odd,
    )
    assert [r.WhichOneof("result") for r in response.results] == ["get", "get"]


def test_an_unexpected_failure_is_internal_and_counted_as_such(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = cluster.servers["a"].node

    def broken(key: bytes) -> tuple[bytes, int] | None:
        raise RuntimeError("disk on fire at 0xdeadbeef")

    monkeypatch.setattr(node.store, "get", broken)
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster, "a").Get(kv_pb2.GetRequest(key=cluster.key_owned_by("a")), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert error_info(info.value).reason == Reason.INTERNAL
    assert "0xdeadbeef" not in details(info.value)
    assert counted(cluster, "a", "kv_requests_total", method="Get", outcome="INTERNAL") == 1
    assert counted(cluster, "a", "kv_requests_total", method="Get", outcome="OK") == 0


def test_a_burst_beyond_the_bound_is_refused_promptly_as_overloaded(
    hung_owner: HungOwner,
) -> None:
    bound, burst = 4, 20
    nodes = InProcessCluster(
        ["a", "b"],
        down=("b",),
        addresses={"b": hung_owner.address},
        forward_timeout=60.0,
        max_in_flight=bound,
    )
    nodes.start()
    channel = grpc.insecure_channel(nodes.addresses["a"])
    try:
        kv = kv_pb2_grpc.KVServiceStub(channel)
        hung_key = nodes.key_owned_by("b")
        refused_all = threading.Event()
        refused: list[grpc.RpcError] = []
        lock = threading.Lock()

        def done(future: grpc.Future[kv_pb2.GetResponse]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if isinstance(error, grpc.RpcError):
                with lock:
                    refused.append(error)
                    if len(refused) == burst - bound:
                        refused_all.set()

        calls = [kv.Get.future(kv_pb2.GetRequest(key=hung_key), timeout=60) for _ in range(burst)]
        for call in calls:
            call.add_done_callback(done)
        assert refused_all.wait(timeout=30), f"only {len(refused)} refused"
        # The admitted calls are held by the owner, which answers none until the test
        # ends: the refusals came while the bound was full, not after a timeout.
        assert hung_owner.wait_holding(bound)
        assert sum(not call.done() for call in calls) == bound
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(error)
            assert info.reason == Reason.OVERLOADED
            assert info.metadata == {"limit": str(bound), "retry_after_ms": "50"}
        # Health checks are never refused, and the bound is counted.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refusals = counted(nodes, "a", "kv_refusals_total", method="Get", reason="OVERLOADED")
        assert refusals == burst - bound
        outcome = counted(
            nodes, "a", "kv_requests_total", method="Get", outcome="RESOURCE_EXHAUSTED"
        )
        assert outcome == burst - bound
        # Once the hung calls end, the node admits work again.
        for call in calls:
            call.cancel()
        local = nodes.key_owned_by("a")
        deadline = time.monotonic() + 10
        while nodes.servers["a"].guard.in_flight:
            assert time.monotonic() < deadline, "cancelled calls never left"
            nodes.run(_yield())
        assert kv.Put(kv_pb2.PutRequest(key=local, value=b"v"), timeout=5).succeeded
    finally:
        channel.close()
        nodes.stop()


async def _yield() -> None:
    """One turn of the nodes' event loop (lets cancellations be processed)."""


def test_get_of_a_missing_key_is_not_an_error(cluster: InProcessCluster) -> None:
    got = stub(cluster, "a").Get(kv_pb2.GetRequest(key=b"never-written"), timeout=5)
    assert (got.found, got.value, got.version) == (False, b"", 0)


def test_conditional_writes_over_the_wire(cluster: InProcessCluster) -> None:
    kv = stub(cluster, "a")
    created = kv.Put(kv_pb2.PutRequest(key=b"cas", value=b"1", if_version=0), timeout=5)
    assert created.succeeded
    lost = kv.Put(kv_pb2.PutRequest(key=b"cas", value=b"2", if_version=0), timeout=5)
    assert (lost.succeeded, lost.version) == (False, created.version)
    swapped = kv.Put(
        kv_pb2.PutRequest(key=b"cas", value=b"3", if_version=created.version), timeout=5
    )
    assert swapped.succeeded and swapped.version > created.version
    stale = kv.Delete(kv_pb2.DeleteRequest(key=b"cas", if_version=created.version), timeout=5)
    assert (stale.succeeded, stale.version) == (False, swapped.version)
    gone = kv.Delete(kv_pb2.DeleteRequest(key=b"cas", if_version=swapped.version), timeout=5)
    assert gone.succeeded and gone.found


def op_put(key: bytes, value: bytes) -> kv_pb2.Operation:
    return kv_pb2.Operation(put=kv_pb2.PutRequest(key=key, value=value))


def op_get(key: bytes) -> kv_pb2.Operation:
    return kv_pb2.Operation(get=kv_pb2.GetRequest(key=key))


def op_delete(key: bytes) -> kv_pb2.Operation:
    return kv_pb2.Operation(delete=kv_pb2.DeleteRequest(key=key))


def test_batch_spans_owners_and_keeps_order(cluster: InProcessCluster) -> None:
    keys = [cluster.key_owned_by(n, prefix=f"batch{i}") for i, n in enumerate("abcabc")]
    ops = [op_put(k, b"v-" + k) for k in keys]
    ops += [op_get(k) for k in keys]
    ops += [op_get(b""), kv_pb2.Operation()]
    response = stub(cluster, "a").Batch(kv_pb2.BatchRequest(operations=ops), timeout=5)
    assert len(response.results) == len(ops)
    for result in response.results[:6]:
        assert result.WhichOneof("result") == "put" and result.put.succeeded
    for key, result in zip(keys, response.results[6:12], strict=True):
        assert result.get.found and result.get.value == b"v-" + key
    empty, unset = response.results[12].error, response.results[13].error
    assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "KEY_EMPTY")
    assert (unset.code, unset.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "INVALID_REQUEST",
    )
    # b's and c's operations went out as one forwarded batch each.
    assert cluster.servers["a"].node.requests_forwarded == 2


@pytest.mark.parametrize("owner", ["a", "b"])
def test_each_get_in_a_batch_sees_exactly_the_writes_before_it(
    cluster: InProcessCluster, owner: str
) -> None:
    """Local (a) and forwarded (b) keys alike: the batch applies in order."""
    key = cluster.key_owned_by(owner, prefix="ordered")
    ops = [
        op_get(key),
        op_put(key, b"1"),
        op_get(key),
        op_put(key, b"2"),
        op_get(key),
        op_delete(key),
        op_get(key),
        op_put(key, b"3"),
    ]
    response = stub(cluster, "a").Batch(kv_pb2.BatchRequest(operations=ops), timeout=5)
    seen = [
        r.get.value if r.get.found else None
        for r in response.results
        if r.WhichOneof("result") == "get"
    ]
    assert seen == [None, b"1", b"2", None]
    versions = [r.put.version for r in response.results if r.WhichOneof("result") == "put"]
    gets = [r.get for r in response.results if r.WhichOneof("result") == "get"]
    assert [gets[1].version, gets[2].version] == versions[:2]
    assert store_of(cluster, owner).get(key) == (b"3", versions[2])


def test_batch_limits(cluster: InProcessCluster) -> None:
    kv = stub(cluster, "a")
    too_many = kv_pb2.BatchRequest(operations=[op_get(b"k")] * 51)
    with pytest.raises(grpc.RpcError) as info:
        kv.Batch(too_many, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(info.value) == ErrorInfo(
        Reason.BATCH_TOO_LARGE, {"limit": "50", "size": "51", "unit": "operations"}
    )
    assert "--max-batch-ops" in details(info.value)
    too_big = kv_pb2.BatchRequest(
        operations=[op_put(f"k{i}".encode(), b"x" * 1000) for i in range(20)]
    )
    with pytest.raises(grpc.RpcError) as info:
        kv.Batch(too_big, timeout=5)
    assert error_info(info.value).metadata["unit"] == "bytes"
    assert "--max-batch-bytes" in details(info.value)
    assert all(store_of(cluster, name).count() == 0 for name in cluster.servers)


def test_batch_to_an_unreachable_owner_fails_only_its_operations(
    cluster_with_c_down: InProcessCluster,
) -> None:
    cluster = cluster_with_c_down
    on_b, on_c = cluster.key_owned_by("b"), cluster.key_owned_by("c")
    response = stub(cluster, "a").Batch(
        kv_pb2.BatchRequest(operations=[op_put(on_b, b"1"), op_put(on_c, b"2")]), timeout=5
    )
    assert response.results[0].put.succeeded
    error = response.results[1].error
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert error.reason == "OWNER_UNAVAILABLE"
    assert dict(error.metadata) == {
        "owner_id": "c",
        "owner_address": cluster.addresses["c"],
        NEVER_RAN: "true",
    }
    assert "owner 'c'" in error.message


def test_batch_operation_refused_by_the_owner_keeps_its_reason(
    cluster: InProcessCluster,
) -> None:
    """A forwarded operation's refusal comes back with the owner's reason and metadata."""
    on_b = cluster.key_owned_by("b")
    response = stub(cluster, "a").Batch(
        kv_pb2.BatchRequest(operations=[op_get(on_b)]),
        timeout=5,
        metadata=((EPOCH_METADATA, "1"),),
    )
    error = response.results[0].error
    assert (error.reason, error.metadata["owner_id"]) == ("STALE_MAP", "b")


def test_cluster_map_and_node_status(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodings: list[bool] = []
    to_proto = ClusterMap.to_proto

    def counting(self: ClusterMap, *, include_partitions: bool = False) -> object:
        encodings.append(include_partitions)
        return to_proto(self, include_partitions=include_partitions)

    monkeypatch.setattr(ClusterMap, "to_proto", counting)
    channel = grpc.insecure_channel(cluster.addresses["b"])
    service = cluster_pb2_grpc.ClusterServiceStub(channel)
    for _ in range(3):
        reply = service.GetClusterMap(
            cluster_pb2.GetClusterMapRequest(include_partitions=True), timeout=5
        )
        cmap = reply.cluster_map
        assert [m.id for m in cmap.members] == ["a", "b", "c"]
        assert cmap.partition_count == 256 and len(cmap.partitions) == 256
        assert cmap.replication_factor == 1
        assert cmap.limits.max_value_bytes == 1024
        plain = service.GetClusterMap(cluster_pb2.GetClusterMapRequest(), timeout=5)
        assert len(plain.cluster_map.partitions) == 0
    assert sorted(encodings) == [False, True], "the map is encoded once per epoch"
    status = service.GetNodeStatus(cluster_pb2.GetNodeStatusRequest(), timeout=5)
    assert status.node_id == "b" and status.engine == "memory"
    assert status.address == cluster.addresses["b"]
    assert status.requests_served == 6  # the map calls above; this one is counted after


def test_a_draining_node_refuses_new_calls_as_shutting_down(cluster: InProcessCluster) -> None:
    cluster.servers["a"].node.draining = True
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster, "a").Get(kv_pb2.GetRequest(key=b"k"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(info.value).reason == Reason.SHUTTING_DOWN
    assert store_of(cluster, "a").count() == 0
