"""The /metrics endpoint: what it reports, and what idle connections cost."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kv_node.testing import InProcessCluster, free_port

IDLE_CONNECTIONS = 100


@pytest.fixture
def node_with_metrics() -> Iterator[tuple[InProcessCluster, str]]:
    metrics = f"127.0.0.1:{free_port()}"
    nodes = InProcessCluster(["a"], metrics_listen=metrics)
    nodes.start()
    try:
        yield nodes, metrics
    finally:
        nodes.stop()


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.status == 200
        text: str = response.read().decode()
        return text


def test_metrics_report_calls_by_outcome(node_with_metrics: tuple[InProcessCluster, str]) -> None:
    nodes, metrics = node_with_metrics
    kv = kv_pb2_grpc.KVServiceStub(grpc.insecure_channel(nodes.addresses["a"]))
    for i in range(3):
        kv.Put(kv_pb2.PutRequest(key=f"k{i}".encode(), value=b"v"), timeout=5)
    with pytest.raises(grpc.RpcError):
        kv.Get(kv_pb2.GetRequest(key=b""), timeout=5)
    text = scrape(metrics)
    assert 'kv_requests_total{method="Put",outcome="OK"} 3.0' in text
    assert 'kv_requests_total{method="Get",outcome="INVALID_ARGUMENT"} 1.0' in text
    assert 'kv_refusals_total{method="Get",reason="KEY_EMPTY"} 1.0' in text
    assert "kv_keys_stored 3.0" in text


def test_unknown_paths_and_methods_are_refused(
    node_with_metrics: tuple[InProcessCluster, str],
) -> None:
    _, metrics = node_with_metrics
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{metrics}/secrets", timeout=5)
    assert info.value.code == 404
    request = urllib.request.Request(f"http://{metrics}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 405


def test_idle_connections_cost_no_threads(
    node_with_metrics: tuple[InProcessCluster, str],
) -> None:
    _, metrics = node_with_metrics
    host, port = metrics.rsplit(":", 1)
    scrape(metrics)
    before = threading.active_count()
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(IDLE_CONNECTIONS)]
    try:
        # A scrape after them is answered, so every idle connection has been accepted.
        assert "kv_keys_stored" in scrape(metrics)
        assert threading.active_count() - before < IDLE_CONNECTIONS // 10
    finally:
        for conn in idle:
            conn.close()
