"""The nemesis on real processes: each fault does what it says and is recorded in the history."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos.faults import Faults, PeerLinks
from chaos.history import History
from chaos.proxy import CutMode

from harness import Cluster, running_cluster
from kv_client import Client, DeadlineExceededError, UnavailableError

pytestmark = pytest.mark.chaos

PROBE_TIMEOUT = 1.0


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path, ["n1", "n2"]) as cluster:
        yield cluster


def test_kill9_restarts_on_the_same_data_and_records_the_fault(two_nodes: Cluster) -> None:
    history = History()
    node = two_nodes.nodes["n1"]
    with Client(two_nodes.addresses) as kv:
        key = next(f"k{i}" for i in range(1000) if kv.locate(f"k{i}").node_id == "n1")
        kv.put(key, "kept")
    first = node.running()
    Faults(two_nodes, history).kill9("n1", down_ops=0, max_down=0.0)
    assert first.returncode == -signal.SIGKILL
    assert node.running() is not first and node.running().poll() is None
    with Client(two_nodes.addresses) as kv:
        assert kv.get(key) == b"kept"
    [fault] = history.faults
    assert (fault.name, fault.target) == ("kill -9 + restart", "n1")
    assert fault.end is not None and fault.end > fault.start


def test_pause_resumes_the_node(two_nodes: Cluster) -> None:
    history = History()
    Faults(two_nodes, history).pause("n2", 0.2)
    with Client(two_nodes.addresses) as kv:
        assert kv.node_status(two_nodes.nodes["n2"].address, timeout=5.0).node_id == "n2"
    [fault] = history.faults
    assert fault.end is not None and fault.end - fault.start >= 0.2e9


def test_isolate_cuts_every_link_of_one_node_then_heals(
    two_nodes: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = History()
    links = PeerLinks(two_nodes)
    try:
        via = links.proxies[("n1", "n2")].address
        assert links.node_flags("n1") == ["--peer-via", f"n2={via}"]
        faults = Faults(two_nodes, history, links)
        seen: list[type[Exception]] = []

        def probe_during_cut(seconds: float) -> None:
            # Runs where isolate() holds the cut: both directions are blackholed now.
            for proxy in links.touching("n1"):
                assert proxy.cut_mode is CutMode.BLACKHOLE
                with (
                    Client(proxy.address) as kv,
                    pytest.raises((DeadlineExceededError, UnavailableError)) as caught,
                ):
                    kv.node_status(proxy.address, timeout=PROBE_TIMEOUT)
                seen.append(caught.type)

        monkeypatch.setattr(faults, "_hold", probe_during_cut)
        faults.isolate("n1", 0.0, CutMode.BLACKHOLE)
        assert len(seen) == 2
        for proxy in links.touching("n1"):
            assert proxy.cut_mode is None
            with Client(proxy.address) as kv:
                assert kv.node_status(proxy.address, timeout=5.0).node_id in ("n1", "n2")
        [fault] = history.faults
        assert fault.name == "isolate (blackhole)" and fault.end is not None
    finally:
        links.stop()
