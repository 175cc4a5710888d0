"""Fault actions on a harness cluster's real processes and on its peer links.

Every action records its start and end into the run's ``History``, on the same clock as the
operations, so the report can say what the clients saw during each fault.

Every method here must be called from the thread that started the cluster: the launcher arms
each node with a parent-death signal tied to the *thread* that spawned it, so a node restarted
from a short-lived worker thread would be killed the moment that thread ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

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


__all__ = ["Faults", "PeerLinks"]
