"""A real three-node cluster, driven as a user would: SDK, raw stubs, kill, restart."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Cluster
from kv.v1 import kv_pb2, kv_pb2_grpc
from kv_client import Client, UnavailableError

KEYS = 1000


def test_three_nodes_route_forward_survive_a_kill_and_restart(three_nodes: Cluster) -> None:
    cluster = three_nodes
    keys = [f"user:{i:05d}" for i in range(KEYS)]
    with Client(cluster.addresses[0]) as kv:
        for key in keys:
            kv.put(key, "v-" + key)
        for key in keys:
            assert kv.get(key) == ("v-" + key).encode()
        statuses = {n.node_id: kv.node_status(n.address) for n in cluster.nodes.values()}
        owners = {key: kv.locate(key).node_id for key in keys}

    # 1. The SDK routed everything directly: no node forwarded anything.
    assert all(s.requests_forwarded == 0 for s in statuses.values()), statuses
    assert sum(s.keys_stored for s in statuses.values()) == KEYS
    assert all(s.keys_stored > KEYS / 6 for s in statuses.values()), "keys spread over nodes"

    # 2. Raw generated stubs against one node: the same keys work through forwarding.
    n1 = cluster.nodes["n1"]
    raw = kv_pb2_grpc.KVServiceStub(grpc.insecure_channel(n1.address))
    for key in keys[:200]:
        got = raw.Get(kv_pb2.GetRequest(key=key.encode()), timeout=5)
        assert got.found and got.value == ("v-" + key).encode()
    with Client(n1.address) as kv:
        forwarded = kv.node_status(n1.address).requests_forwarded
    expected = sum(1 for key in keys[:200] if owners[key] != "n1")
    assert forwarded == expected

    # 3. kill -9 one node: its keys fail fast with UNAVAILABLE, the others keep working.
    victim = cluster.nodes["n2"]
    victim.kill()
    lost = [k for k in keys if owners[k] == "n2"]
    kept = [k for k in keys if owners[k] != "n2"]
    with Client(n1.address, timeout=3.0) as kv:
        start = time.monotonic()
        for key in lost[:5]:
            with pytest.raises(UnavailableError, match="n2"):
                kv.get(key)
        assert time.monotonic() - start < 10, "five failures must come fast"
        for key in kept[:100]:
            assert kv.get(key) == ("v-" + key).encode()
        kv.put(kept[0], "still writable")
    with pytest.raises(grpc.RpcError) as info:
        raw.Get(kv_pb2.GetRequest(key=lost[0].encode()), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "owner 'n2'" in (info.value.details() or "")

    # 4. Restart it on its data directory: its keys are back, through SDK and forwarding.
    victim.start()
    victim.wait_ready()
    with Client(n1.address) as kv:
        for key in lost:
            assert kv.get(key) == ("v-" + key).encode()
    deadline = time.monotonic() + 10
    while True:  # n1's peer channel reconnects on its own backoff schedule
        try:
            got = raw.Get(kv_pb2.GetRequest(key=lost[0].encode()), timeout=5)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert got.value == ("v-" + lost[0]).encode()


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a node's /metrics, by name and sorted labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_what_each_node_served_and_forwarded(three_nodes: Cluster) -> None:
    """Puts sent to n1 without routing: n1 forwards each one it does not own, once."""
    keys = [f"m{i}" for i in range(60)]
    with Client(three_nodes.addresses) as kv:
        owners = {key: kv.locate(key).node_id for key in keys}
    n1 = three_nodes.nodes["n1"]
    raw = kv_pb2_grpc.KVServiceStub(grpc.insecure_channel(n1.address))
    for key in keys:
        assert raw.Put(kv_pb2.PutRequest(key=key.encode(), value=b"v"), timeout=5).succeeded
    with pytest.raises(grpc.RpcError):
        raw.Get(kv_pb2.GetRequest(key=b""), timeout=5)

    owned = {
        node_id: sum(1 for o in owners.values() if o == node_id) for node_id in three_nodes.nodes
    }
    assert all(owned.values()), owned  # every node owns some of the keys
    put_ok = ("kv_requests_total", (("method", "Put"), ("outcome", "OK")))
    forwarded = ("kv_forwarded_requests_total", (("method", "Put"),))
    refused = ("kv_requests_total", (("method", "Get"), ("outcome", "INVALID_ARGUMENT")))
    n1_metrics = scrape(n1.metrics or "")
    assert n1_metrics[put_ok] == len(keys)
    assert n1_metrics[forwarded] == len(keys) - owned["n1"]
    assert n1_metrics[refused] == 1
    assert n1_metrics[("kv_keys_stored", ())] == owned["n1"]
    for node_id in ("n2", "n3"):
        samples = scrape(three_nodes.nodes[node_id].metrics or "")
        assert samples[put_ok] == owned[node_id], node_id  # only what n1 forwarded to it
        assert samples.get(forwarded, 0.0) == 0.0, node_id
        assert samples[("kv_keys_stored", ())] == owned[node_id]


def test_health_and_reflection(three_nodes: Cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(three_nodes.addresses[0])
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kv.v1.KVService", "kv.v1.ClusterService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"kv.v1.KVService", "kv.v1.ClusterService", "grpc.health.v1.Health"} <= names
