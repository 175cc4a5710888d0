from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Cluster


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, ["n1", "n2", "n3"])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
