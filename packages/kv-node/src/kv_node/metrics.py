"""Prometheus metrics of one node.

Each node owns a private registry (not the process-global default) so that
tests can run several servicers in one process without metric collisions.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class NodeMetrics:
    def __init__(self, keys_stored: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kv_requests",
            "Requests handled by this node, by method and outcome (ok or a gRPC code name).",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kv_request_duration_seconds",
            "Time to answer a request, forwarding included.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.forwarded = Counter(
            "kv_forwarded_requests",
            "Requests this node forwarded to the owning node, by method.",
            ["method"],
            registry=self.registry,
        )
        self.batch_operations = Counter(
            "kv_batch_operations",
            "Operations received inside Batch calls.",
            registry=self.registry,
        )
        self.commits = Counter(
            "kv_store_commits",
            "Store transactions committed (one per group of concurrent writes).",
            registry=self.registry,
        )
        self.keys = Gauge("kv_keys_stored", "Keys in this node's store.", registry=self.registry)
        self.keys.set_function(keys_stored)

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP on a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
