"""``kv cluster up``'s plan: how many nodes, which engine and how many copies a new cluster
gets, and that a recorded cluster comes back exactly as it was created."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kv_common.placement import DEFAULT_PARTITIONS
from kv_tools.cluster_dir import LocalClusterError, read_layout
from kv_tools.local_cluster import node_spec, plan


def test_a_new_cluster_keeps_three_copies_capped_at_its_size(tmp_path: Path) -> None:
    assert plan(tmp_path / "three", 0, "lmdb").replication_factor == 3
    assert plan(tmp_path / "five", 5, "lmdb").replication_factor == 3
    assert plan(tmp_path / "two", 2, "lmdb").replication_factor == 2
    assert plan(tmp_path / "one-copy", 3, "lmdb", 1).replication_factor == 1


def test_the_memory_engine_keeps_one_copy(tmp_path: Path) -> None:
    assert plan(tmp_path / "memory", 3, "memory").replication_factor == 1
    with pytest.raises(LocalClusterError, match="need the lmdb engine"):
        plan(tmp_path / "refused", 3, "memory", 3)


def test_the_recorded_replication_factor_is_used_and_a_different_one_refused(
    tmp_path: Path,
) -> None:
    first = plan(tmp_path, 3, "lmdb", 2)
    assert read_layout(tmp_path) == first
    assert plan(tmp_path, 0, "lmdb") == first
    assert plan(tmp_path, 3, "lmdb", 2) == first
    with pytest.raises(LocalClusterError, match="replication factor 2; run with"):
        plan(tmp_path, 0, "lmdb", 3)


def test_a_layout_from_before_replication_runs_as_it_was_created(tmp_path: Path) -> None:
    """One copy and 4,096 partitions, the defaults then: anything else would look for its
    keys on other nodes."""
    assert plan(tmp_path, 2, "lmdb").partitions == DEFAULT_PARTITIONS
    path = tmp_path / "cluster.json"
    recorded = json.loads(path.read_text())
    del recorded["replication_factor"], recorded["partitions"]
    path.write_text(json.dumps(recorded))
    layout = read_layout(tmp_path)
    assert layout is not None
    assert (layout.replication_factor, layout.partitions) == (1, 4096)
    extra = node_spec(tmp_path, layout, layout.nodes[0]).extra
    assert extra == ("--replication-factor", "1", "--partitions", "4096")


def test_the_same_command_twice_is_accepted_when_copies_were_capped(tmp_path: Path) -> None:
    first = plan(tmp_path, 2, "lmdb", 3)
    assert first.replication_factor == 2
    assert plan(tmp_path, 2, "lmdb", 3) == first
