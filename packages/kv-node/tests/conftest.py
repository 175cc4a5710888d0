from __future__ import annotations

from collections.abc import Iterator

import pytest

from kv_node.testing import HungOwner, InProcessCluster


@pytest.fixture
def cluster() -> Iterator[InProcessCluster]:
    nodes = InProcessCluster(["a", "b", "c"])
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def cluster_with_c_down() -> Iterator[InProcessCluster]:
    nodes = InProcessCluster(["a", "b", "c"], down=("c",))
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def hung_owner() -> Iterator[HungOwner]:
    owner = HungOwner()
    try:
        yield owner
    finally:
        owner.stop()
