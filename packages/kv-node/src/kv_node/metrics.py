"""Prometheus metrics of one node, served over HTTP from the node's own event loop.

Each node owns a private registry (not the process-global default) so that tests can
run several servicers in one process without metric collisions. The endpoint is a few
lines of asyncio rather than prometheus_client's threaded server, which starts a thread
per connection: idle or hostile connections cost a coroutine each here, and are dropped
after ``METRICS_IDLE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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

METRICS_IDLE_SECONDS = 10.0
"""A metrics connection that sends no complete request head in this time is closed."""

MAX_REQUEST_HEAD_BYTES = 8 * 1024
"""A scraper's request head is a few hundred bytes; anything longer is refused."""


class NodeMetrics:
    def __init__(self, keys_stored: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kv_requests",
            "Calls handled by this node, by method and outcome (OK or the gRPC status code).",
            ["method", "outcome"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "kv_refusals",
            "Calls refused by this node, by method and ErrorInfo reason (OVERLOADED, ...).",
            ["method", "reason"],
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
        self._server: asyncio.Server | None = None

    async def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP on the running event loop (raises OSError if it cannot)."""
        self._server = await asyncio.start_server(
            self._answer, host, port, limit=MAX_REQUEST_HEAD_BYTES
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(METRICS_IDLE_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method != b"GET":
                self._reply(writer, b"405 Method Not Allowed", b"text/plain", b"GET only\n")
            elif path not in (b"/metrics", b"/"):
                self._reply(writer, b"404 Not Found", b"text/plain", b"try /metrics\n")
            else:
                body = generate_latest(self.registry)
                self._reply(writer, b"200 OK", CONTENT_TYPE_LATEST.encode(), body)
            await writer.drain()
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # an idle, closed or oversized request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    def _reply(
        writer: asyncio.StreamWriter, status: bytes, content_type: bytes, body: bytes
    ) -> None:
        writer.write(
            b"HTTP/1.1 "
            + status
            + b"\r\nContent-Type: "
            + content_type
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
