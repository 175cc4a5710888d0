"""Fault actions on a harness cluster's real processes and on its peer links.

Every action records its start and end into the run's ``History``, on the same clock as the
operations, so the report can say what the clients saw during each fault.

Every method here must be called from the thread that started the cluster: the launcher arms
each node with a parent-death signal tied to the *thread* that spawned it, so a node restarted
from a short-lived worker thread would be killed the moment that thread ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chaos import metrics
from chaos.history import History
from chaos.proxy import CutMode, Proxy

from harness import Cluster, NodeProcess


class PeerLinks:
    """One proxy per ordered pair of nodes: node A reaches node B's Raft stream through
    ``proxies[(A, B)]`` (``--peer-via B=<proxy>`` on A). Clients use the real addresses."""

    def __init__(self, cluster: Cluster) -> None:
        self.proxies: dict[tuple[str, str], Proxy] = {}
        try:
            for source in cluster.nodes:
                for target, node in cluster.nodes.items():
                    if source != target:
                        proxy = Proxy(node.address, name=f"{source}->{target}")
                        self.proxies[(source, target)] = proxy.start()
        except BaseException:
            self.stop()
            raise

    def node_flags(self, node_id: str) -> list[str]:
        """The ``--peer-via`` flag that routes ``node_id``'s peer links through the proxies."""
        dial = [f"{t}={p.address}" for (s, t), p in self.proxies.items() if s == node_id]
        return ["--peer-via", ",".join(dial)] if dial else []

    def touching(self, node_id: str) -> list[Proxy]:
        return [p for (s, t), p in self.proxies.items() if node_id in (s, t)]

    def heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()


SNAPSHOTS_SENT = "kv_replication_snapshots_sent_total"
INSTALLED = "kv_replication_snapshots_installed_total"
SNAPSHOT_BYTES_RECEIVED = "kv_replication_snapshot_bytes_received_total"
SNAPSHOT_BYTES_SENT = "kv_replication_snapshot_bytes_sent_total"


def _summed(addresses: list[str]) -> dict[str, float]:
    """The snapshot senders' counters, summed over the live nodes at ``addresses``."""
    total = {SNAPSHOTS_SENT: 0.0, SNAPSHOT_BYTES_SENT: 0.0}
    for address in addresses:
        counters = metrics.scrape(address)
        for name in total:
            total[name] += counters.get(name, 0.0)
    return total


@dataclass(frozen=True)
class CatchUp:
    """What it took a node that fell behind compaction to catch up."""

    down_seconds: float
    acked_while_down: int
    ready_seconds: float
    """From the restart until the node served (its health check)."""
    installed_after: float | None
    """From the node serving until its metrics showed a snapshot installed; None: never."""
    installed: int
    received: int
    bytes_received: int
    discarded: int
    sent: int
    """Snapshots the other nodes sent during the fault and the catch-up (to anyone)."""
    bytes_sent: int

    def by_snapshot(self, min_bytes: int = 0) -> bool:
        return self.installed > 0 and self.bytes_received >= min_bytes

    def describe(self) -> str:
        after = "never" if self.installed_after is None else f"{self.installed_after:.2f}s"
        return (
            f"(down {self.down_seconds:.1f}s, {self.acked_while_down} writes acked; "
            f"serving {self.ready_seconds:.1f}s after restart; snapshots: {self.received} "
            f"received ({self.bytes_received} bytes), {self.installed} installed ({after} "
            f"after serving), "
            f"{self.discarded} discarded; {self.sent} sent, {self.bytes_sent} bytes)"
        )


class Faults:
    """The nemesis: each method is one fault, recorded into ``history``."""

    def __init__(self, cluster: Cluster, history: History, links: PeerLinks | None = None) -> None:
        self.cluster = cluster
        self.history = history
        self.links = links
        self.aborted = threading.Event()  # set to cut a fault's waiting short

    def node(self, node_id: str) -> NodeProcess:
        return self.cluster.nodes[node_id]

    def _hold(self, seconds: float) -> None:
        """Keep a fault in place for its duration (part of the fault, not synchronisation)."""
        self.aborted.wait(seconds)

    def kill9(self, node_id: str, *, down_ops: int, max_down: float) -> None:
        """kill -9, stay down until the load completed ``down_ops`` more ops (or ``max_down``
        seconds), then restart on the same data directory and wait until it serves."""
        index = self.history.fault_started("kill -9 + restart", node_id)
        node = self.node(node_id)
        try:
            node.kill()
            self.history.wait_for(completed=down_ops, timeout=max_down)
        finally:
            node.start()
            node.wait_ready()
            self.history.fault_ended(index)

    def kill9_behind_compaction(
        self,
        node_id: str,
        *,
        acked_writes: int,
        max_down: float,
        catch_up_timeout: float,
        while_down: Callable[[], None] = lambda: None,
        min_bytes: int = 0,
    ) -> CatchUp:
        """kill -9, run ``while_down``, stay down until the load has ``acked_writes`` more
        writes acknowledged (enough that the live replicas compact their logs past the dead
        one's), restart on the same data, and wait until the node's metrics say it installed a
        snapshot and received at least ``min_bytes`` of snapshot data.

        What the catch-up took is returned and noted on the fault; whether it happened at all
        is the caller's verdict (``CatchUp.by_snapshot``).
        """
        index = self.history.fault_started("kill -9 behind compaction + restart", node_id)
        node = self.node(node_id)
        others = [n.metrics for n in self.cluster.nodes.values() if n is not node and n.metrics]
        sent_before = _summed(others)
        acked_before = self.history.acked_writes
        try:
            node.kill()
            down = time.monotonic()
            while_down()
            self.history.wait_for(acked_writes=acked_writes, timeout=max_down)
        finally:
            acked = self.history.acked_writes - acked_before
            restarted = time.monotonic()
            node.start()
            node.wait_ready()
            ready = time.monotonic() - restarted
            self.history.fault_ended(index)
        assert node.metrics is not None, "the harness gives every node a metrics endpoint"
        counters, installed_after = metrics.wait_for(
            node.metrics,
            lambda c: c.get(INSTALLED, 0) > 0 and c.get(SNAPSHOT_BYTES_RECEIVED, 0) >= min_bytes,
            timeout=catch_up_timeout,
        )
        sent = _summed(others)
        catch_up = CatchUp(
            down_seconds=restarted - down,
            acked_while_down=acked,
            ready_seconds=ready,
            installed_after=installed_after,
            installed=int(counters.get(INSTALLED, 0)),
            received=int(counters.get("kv_replication_snapshots_received_total", 0)),
            bytes_received=int(counters.get(SNAPSHOT_BYTES_RECEIVED, 0)),
            discarded=int(counters.get("kv_replication_snapshots_discarded_total", 0)),
            sent=int(sent[SNAPSHOTS_SENT] - sent_before[SNAPSHOTS_SENT]),
            bytes_sent=int(sent[SNAPSHOT_BYTES_SENT] - sent_before[SNAPSHOT_BYTES_SENT]),
        )
        self.history.fault_note(index, catch_up.describe())
        return catch_up

    def pause(self, node_id: str, seconds: float) -> None:
        """SIGSTOP for ``seconds``, then SIGCONT: the process keeps its sockets and state."""
        index = self.history.fault_started("SIGSTOP", node_id, note=f"{seconds:g}s")
        node = self.node(node_id)
        node.pause()
        try:
            self._hold(seconds)
        finally:
            node.resume()
            self.history.fault_ended(index)

    def restart(self, node_id: str) -> None:
        """SIGTERM (the node drains), then start again on the same data."""
        index = self.history.fault_started("restart", node_id)
        node = self.node(node_id)
        try:
            node.terminate()
        finally:
            node.start()
            node.wait_ready()
            self.history.fault_ended(index)

    def rolling_restart(self, order: Iterable[str]) -> None:
        for node_id in order:
            self.restart(node_id)

    def isolate(self, node_id: str, seconds: float, mode: CutMode) -> None:
        """Cut every peer link to and from ``node_id`` for ``seconds``, then heal."""
        assert self.links is not None, "isolate needs a cluster started with PeerLinks"
        index = self.history.fault_started(f"isolate ({mode.value})", node_id, f"{seconds:g}s")
        proxies = self.links.touching(node_id)
        try:
            for proxy in proxies:
                proxy.cut(mode)
            self._hold(seconds)
        finally:
            for proxy in proxies:
                proxy.heal()
            self.history.fault_ended(index)

    def everyone_up(self) -> None:
        """After the schedule: heal every link and start any node that is not running."""
        if self.links is not None:
            self.links.heal_all()
        for node in self.cluster.nodes.values():
            if node.process is None or node.process.poll() is not None:
                node.start()
                node.wait_ready()
            else:
                node.resume()


__all__ = ["CatchUp", "Faults", "PeerLinks"]
