from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Cluster, running_cluster
from kv_node.testing import InProcessCluster


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path, ["n1", "n2", "n3"]) as cluster:
        yield cluster


@pytest.fixture
def cluster() -> Iterator[InProcessCluster]:
    """Three in-process nodes on the memory engine (cheap; for SDK behaviour, not crashes)."""
    nodes = InProcessCluster(["a", "b", "c"])
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def cluster_with_c_down() -> Iterator[InProcessCluster]:
    """The same three nodes with "c" never started: its keys' owner refuses connections."""
    nodes = InProcessCluster(["a", "b", "c"], down=("c",))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
