"""Prometheus metrics of one node, served over HTTP from the node's own event loop.

Each node owns a private registry (not the process-global default) so that tests can
run several servicers in one process without metric collisions. The endpoint is a few
lines of asyncio rather than prometheus_client's threaded server, which starts a thread
per connection: idle or hostile connections cost a coroutine each here, and are dropped
after ``METRICS_IDLE_SECONDS``.

A replicated node also reports its Raft groups (``kv_replication_*``). Those numbers are read
at scrape time from the counters replication keeps anyway (``RuntimeStats``, ``DriverStats``,
``TransportStats``, the replica store) and from one pass over the groups' cores
(``replication.overview``), so the request path pays nothing for them; only the commit
latency is observed as it happens, once per runtime cycle. Requests refused because this node
does not lead their partition are ``kv_refusals_total{reason="NOT_LEADER"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kv_node.replication.overview import overview

if TYPE_CHECKING:
    from kv_node.replication.replica import Replication

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

    def watch_replication(self, replication: Replication) -> None:
        """Report ``replication``'s groups, runtime, transport and store from now on."""
        commit_latency = Histogram(
            "kv_replication_commit_duration_seconds",
            "Time to persist and apply one runtime cycle (one LMDB transaction and its flush, "
            "for every group with work).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        replication.store.on_commit = commit_latency.observe
        self.registry.register(ReplicationCollector(replication))

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


class ReplicationCollector(Collector):
    """The ``kv_replication_*`` metrics, read from replication's own counters when scraped."""

    def __init__(self, replication: Replication) -> None:
        self._replication = replication

    def collect(self) -> Iterator[Metric]:
        replication = self._replication
        runtime = replication.runtime.stats
        driver = replication.driver
        transport = replication.transport.stats
        view = overview(driver)
        yield GaugeMetricFamily(
            "kv_replication_partitions_hosted",
            "Partitions this node holds a replica of (one Raft group each).",
            value=view.hosted,
        )
        yield GaugeMetricFamily(
            "kv_replication_partitions_led",
            "Hosted partitions this node leads.",
            value=view.led,
        )
        yield GaugeMetricFamily(
            "kv_replication_partitions_without_leader",
            "Hosted partitions for which this node knows no leader.",
            value=view.without_leader,
        )
        groups = GaugeMetricFamily(
            "kv_replication_groups",
            "Hosted Raft groups by state: awake (ticked) or asleep (idle, costs nothing).",
            labels=["state"],
        )
        groups.add_metric(["awake"], driver.awake_count)
        groups.add_metric(["asleep"], driver.asleep_count)
        yield groups
        yield GaugeMetricFamily(
            "kv_replication_replicas_behind",
            "Followers of partitions this node leads that lack entries it has committed "
            "(one per follower and partition).",
            value=view.replicas_behind,
        )
        yield GaugeMetricFamily(
            "kv_replication_apply_lag_entries",
            "Entries committed but not yet applied, summed over hosted groups.",
            value=view.apply_lag,
        )
        yield CounterMetricFamily(
            "kv_replication_leader_changes",
            "Changes of a hosted group's leader or of this node's role in it.",
            value=runtime.leader_changes,
        )
        yield CounterMetricFamily(
            "kv_replication_proposals",
            "Log entries this node proposed as leader (one entry carries many writes).",
            value=driver.stats.proposals,
        )
        yield CounterMetricFamily(
            "kv_replication_entries_applied",
            "Committed log entries applied to this node's replicas.",
            value=runtime.entries_applied,
        )
        yield CounterMetricFamily(
            "kv_replication_cycles",
            "Runtime cycles that persisted something (each one transaction and one flush).",
            value=runtime.cycles,
        )
        yield CounterMetricFamily(
            "kv_replication_compactions",
            "Group logs compacted (applied entries dropped).",
            value=runtime.compactions,
        )
        yield CounterMetricFamily(
            "kv_replication_snapshots_sent",
            "Snapshots of a whole partition sent to followers behind compaction "
            "(counted when their last chunk is written).",
            value=transport.snapshots_sent,
        )
        yield CounterMetricFamily(
            "kv_replication_snapshot_bytes_sent",
            "Snapshot data written to peers' streams, in chunks.",
            value=transport.snapshot_bytes_sent,
        )
        yield CounterMetricFamily(
            "kv_replication_snapshots_received",
            "Snapshots reassembled whole from their chunks and handed to Raft.",
            value=transport.snapshots_received,
        )
        yield CounterMetricFamily(
            "kv_replication_snapshot_bytes_received",
            "Data of the snapshots reassembled whole from peers.",
            value=transport.snapshot_bytes_received,
        )
        yield CounterMetricFamily(
            "kv_replication_snapshots_discarded",
            "Snapshots from a peer thrown away part-way (a broken chunk sequence, or the "
            "stream ended); the leader sends another.",
            value=transport.snapshots_discarded,
        )
        yield CounterMetricFamily(
            "kv_replication_peer_restarts",
            "Peers seen to have restarted (a new incarnation in their Hello), dead or not.",
            value=transport.peer_restarts,
        )
        yield CounterMetricFamily(
            "kv_replication_snapshots_installed",
            "Snapshots received from a leader and installed over a replica.",
            value=replication.store.snapshots_installed,
        )
        yield CounterMetricFamily(
            "kv_replication_messages_sent",
            "Raft messages written to peers' streams.",
            value=transport.messages_sent,
        )
        yield CounterMetricFamily(
            "kv_replication_messages_received",
            "Raft messages received from peers.",
            value=transport.messages_received,
        )
        dropped = CounterMetricFamily(
            "kv_replication_messages_dropped",
            "Raft messages dropped (Raft resends): on the way out (peer down, queue full, "
            "stream broken) or in (the runtime's inbox full).",
            labels=["stage"],
        )
        dropped.add_metric(["send"], transport.messages_dropped)
        dropped.add_metric(["receive"], runtime.inbox_dropped)
        yield dropped
        mismatches = CounterMetricFamily(
            "kv_replication_map_mismatches",
            "Peer streams refused because the two nodes' cluster maps differ: refused here "
            "(by=us) or by the peer (by=peer).",
            labels=["by"],
        )
        mismatches.add_metric(["us"], transport.map_mismatches_refused)
        mismatches.add_metric(["peer"], transport.map_mismatches_refused_by_peer)
        yield mismatches
