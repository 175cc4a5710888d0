"""The node's gRPC behaviour, against real servers in this process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_common.wire import EPOCH_METADATA, HOP_METADATA, STALE_MAP_PREFIX
from kv_node.testing import InProcessCluster


def details(error: BaseException) -> str:
    assert isinstance(error, grpc.RpcError)
    text: str | None = error.details()
    return text or ""


def stub(cluster: InProcessCluster, node_id: str) -> kv_pb2_grpc.KVServiceStub:
    return kv_pb2_grpc.KVServiceStub(grpc.insecure_channel(cluster.addresses[node_id]))


def test_any_node_forwards_to_the_owner(cluster: InProcessCluster) -> None:
    key = cluster.key_owned_by("b")
    via_a = stub(cluster, "a")
    put = via_a.Put(kv_pb2.PutRequest(key=key, value=b"v"), timeout=5)
    assert put.succeeded and put.version == 1
    got = stub(cluster, "c").Get(kv_pb2.GetRequest(key=key), timeout=5)
    assert (got.found, got.value, got.version) == (True, b"v", 1)
    assert cluster.servers["b"].node.store.get(key) == (b"v", 1)
    assert cluster.servers["a"].node.store.get(key) is None
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
    assert details(info.value).startswith(STALE_MAP_PREFIX)
    assert "'b'" in details(info.value)
    assert cluster.servers["a"].node.requests_forwarded == 0


def test_forwarded_request_is_never_forwarded_again(cluster: InProcessCluster) -> None:
    key = cluster.key_owned_by("b")
    with pytest.raises(grpc.RpcError) as info:
        stub(cluster, "a").Put(
            kv_pb2.PutRequest(key=key, value=b"v"), timeout=5, metadata=((HOP_METADATA, "c"),)
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cluster lists differ" in details(info.value)
    assert cluster.servers["b"].node.store.get(key) is None


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
    assert "owner 'c'" in details(info.value)
    assert cluster.addresses["c"] in details(info.value)
    # The other nodes' keys still work.
    other = cluster.key_owned_by("b")
    assert stub(cluster, "a").Put(kv_pb2.PutRequest(key=other, value=b"x"), timeout=5).succeeded


@pytest.fixture
def silent_owner() -> Iterator[str]:
    """A TCP listener that accepts connections and never answers: a hung node."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_hung_owner_gives_unavailable_within_the_callers_deadline(silent_owner: str) -> None:
    nodes = InProcessCluster(["a", "b"], down=("b",))
    nodes.addresses["b"] = silent_owner
    cluster = ",".join(f"{i}={a}" for i, a in nodes.addresses.items())
    from kv_node.config import build_config

    for node_id in nodes.configs:
        old = nodes.configs[node_id]
        nodes.configs[node_id] = build_config(
            node_id=node_id,
            listen=None,
            advertise=None,
            cluster=cluster,
            engine="memory",
            data_dir=None,
            metrics_listen=None,
            max_value_bytes=old.max_value_bytes,
            max_batch_ops=old.max_batch_ops,
            max_batch_bytes=old.max_batch_bytes,
            partitions=old.cluster.partitions,
            vnodes=old.cluster.vnodes,
            forward_timeout=30.0,
            drain_seconds=0.5,
            lmdb_map_size=1 << 24,
        )
    nodes.start()
    try:
        key = nodes.key_owned_by("b")
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub(nodes, "a").Get(kv_pb2.GetRequest(key=key), timeout=1.0)
        elapsed = time.monotonic() - start
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, details(info.value)
        assert "owner 'b'" in details(info.value)
        assert elapsed < 1.0
    finally:
        nodes.stop()


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (kv_pb2.PutRequest(key=b"", value=b"v"), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (
            kv_pb2.PutRequest(key=b"k" * 4097, value=b"v"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "the limit is 4096",
        ),
        (
            kv_pb2.PutRequest(key=b"k", value=b"v" * 1025),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the limit is 1024 bytes",
        ),
    ],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(
    cluster: InProcessCluster, request_: kv_pb2.PutRequest, code: grpc.StatusCode, text: str
) -> None:
    kv = stub(cluster, "a")
    with pytest.raises(grpc.RpcError) as info:
        kv.Put(request_, timeout=5)
    assert info.value.code() == code
    assert text in details(info.value)
    assert all(s.node.store.count() == 0 for s in cluster.servers.values())
    # The node keeps serving.
    assert kv.Put(kv_pb2.PutRequest(key=b"fine", value=b"v"), timeout=5).succeeded


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
    assert response.results[12].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "operation 13" in response.results[13].error.message
    # b's and c's operations went out as one forwarded batch each.
    assert cluster.servers["a"].node.requests_forwarded == 2


def test_batch_limits(cluster: InProcessCluster) -> None:
    kv = stub(cluster, "a")
    too_many = kv_pb2.BatchRequest(operations=[op_get(b"k")] * 51)
    with pytest.raises(grpc.RpcError) as info:
        kv.Batch(too_many, timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 50 (--max-batch-ops)" in details(info.value)
    too_big = kv_pb2.BatchRequest(
        operations=[op_put(f"k{i}".encode(), b"x" * 1000) for i in range(20)]
    )
    with pytest.raises(grpc.RpcError) as info:
        kv.Batch(too_big, timeout=5)
    assert "--max-batch-bytes" in details(info.value)
    assert all(s.node.store.count() == 0 for s in cluster.servers.values())


def test_batch_to_an_unreachable_owner_fails_only_its_operations(
    cluster_with_c_down: InProcessCluster,
) -> None:
    cluster = cluster_with_c_down
    on_b, on_c = cluster.key_owned_by("b"), cluster.key_owned_by("c")
    response = stub(cluster, "a").Batch(
        kv_pb2.BatchRequest(operations=[op_put(on_b, b"1"), op_put(on_c, b"2")]), timeout=5
    )
    assert response.results[0].put.succeeded
    assert response.results[1].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "owner 'c'" in response.results[1].error.message


def test_cluster_map_and_node_status(cluster: InProcessCluster) -> None:
    channel = grpc.insecure_channel(cluster.addresses["b"])
    service = cluster_pb2_grpc.ClusterServiceStub(channel)
    reply = service.GetClusterMap(
        cluster_pb2.GetClusterMapRequest(include_partitions=True), timeout=5
    )
    cmap = reply.cluster_map
    assert [m.id for m in cmap.members] == ["a", "b", "c"]
    assert cmap.partition_count == 256 and len(cmap.partitions) == 256
    assert cmap.replication_factor == 1
    status = service.GetNodeStatus(cluster_pb2.GetNodeStatusRequest(), timeout=5)
    assert status.node_id == "b" and status.engine == "memory"
    assert status.address == cluster.addresses["b"]
