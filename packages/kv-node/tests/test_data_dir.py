"""The data directory's identity, in process: upgrades, interrupted starts, clean-up.

The refusals themselves run against real processes in tests/test_damaged_disk.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import pytest

from kv_common.cluster_map import ClusterMap, Member
from kv_node.data_dir import (
    IDENTITY_FILE,
    IDENTITY_FORMAT,
    REPLICA_DIR,
    Identity,
    describe_placement,
    discard_if_not_started,
    open_replica_store,
    open_store,
    read_identity,
)
from kv_node.store import PutOp, StoreError
from kv_node.store.lmdb_file import DATA_FILE
from kv_node.store.lmdb_store import LmdbStore
from kv_raft import ConfState


class StartFailed(Exception):
    pass


def start_then_fail(data_dir: Path, *, started_first: bool) -> None:
    """What main does: open the store, maybe report the node started, then fail."""
    with discard_if_not_started(data_dir) as started:
        open_store("lmdb", data_dir, "n1").close()
        if started_first:
            started()
        raise StartFailed


def test_a_new_store_is_recorded_in_the_identity(tmp_path: Path) -> None:
    store = open_store("lmdb", tmp_path / "n1", "n1")
    assert isinstance(store, LmdbStore)
    store_id = store.store_id
    store.close()
    identity = read_identity(tmp_path / "n1")
    assert identity is not None
    assert (identity.node_id, identity.format, identity.lmdb_store_id) == (
        "n1",
        IDENTITY_FORMAT,
        store_id,
    )


def test_a_format_1_directory_is_upgraded_with_its_data(tmp_path: Path) -> None:
    """Directories written before store ids existed keep working and gain one."""
    data_dir = tmp_path / "n1"
    (data_dir / "lmdb").mkdir(parents=True)
    (data_dir / IDENTITY_FILE).write_text(json.dumps({"node_id": "n1", "format": 1}))
    env = lmdb.open(str(data_dir / "lmdb"), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"k", (5).to_bytes(8, "big") + b"v", db=env.open_db(b"data", txn=txn))
        txn.put(b"revision", (5).to_bytes(8, "big"), db=env.open_db(b"meta", txn=txn))
    env.close()
    store = open_store("lmdb", data_dir, "n1")
    assert store.get(b"k") == (b"v", 5) and store.revision == 5
    store.close()
    identity = read_identity(data_dir)
    assert identity is not None and identity.format == 2 and identity.lmdb_store_id is not None
    (data_dir / "lmdb" / "data.mdb").unlink()
    with pytest.raises(StoreError, match=r"data\.mdb is missing"):
        open_store("lmdb", data_dir, "n1")


def test_a_format_1_directory_whose_store_vanished_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "n1"
    (data_dir / "lmdb").mkdir(parents=True)
    (data_dir / "lmdb" / "lock.mdb").write_bytes(b"")
    (data_dir / IDENTITY_FILE).write_text(json.dumps({"node_id": "n1", "format": 1}))
    with pytest.raises(StoreError, match=r"data\.mdb is missing from a store created there"):
        open_store("lmdb", data_dir, "n1")
    assert not (data_dir / "lmdb" / "data.mdb").exists()


def test_a_start_interrupted_before_the_identity_was_written_is_resumed(tmp_path: Path) -> None:
    """A store with nothing in it and no identity is what a first start leaves if it dies early."""
    store = open_store("lmdb", tmp_path / "n1", "n1")
    store.close()
    (tmp_path / "n1" / IDENTITY_FILE).unlink()
    again = open_store("lmdb", tmp_path / "n1", "n1")
    (result,) = again.write([PutOp(b"k", b"v")])
    assert result.version == 1
    again.close()
    assert read_identity(tmp_path / "n1") is not None


def test_a_failed_start_removes_only_what_it_created(tmp_path: Path) -> None:
    data_dir = tmp_path / "n1"
    data_dir.mkdir()
    (data_dir / "lost+found").mkdir()
    (data_dir / "notes.txt").write_text("the operator's")
    with pytest.raises(StartFailed):
        start_then_fail(data_dir, started_first=False)
    assert sorted(p.name for p in data_dir.iterdir()) == ["lost+found", "notes.txt"]


def test_a_started_node_keeps_its_data_dir_whatever_happens_later(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "n1"
    with pytest.raises(StartFailed):
        start_then_fail(data_dir, started_first=True)
    assert (data_dir / IDENTITY_FILE).exists() and (data_dir / "lmdb" / "data.mdb").exists()


def test_a_failed_open_leaves_a_fresh_directory_absent(tmp_path: Path) -> None:
    """LMDB refuses a map it cannot reserve after the directory was claimed: nothing stays."""
    with pytest.raises(StoreError, match="cannot open LMDB store"):
        open_store("lmdb", tmp_path / "new" / "n1", "n1", map_size=1 << 62)
    assert not (tmp_path / "new").exists()


REPLICA_MAP = 1 << 24
PLACEMENT = "members n1,n2,n3; 1024 partitions; 512 vnodes; replication factor 3"
HOSTED = range(1024)


def test_a_replica_store_is_recorded_and_reopened(tmp_path: Path) -> None:
    store = open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    )
    store_id = store.store_id
    store.close()
    assert read_identity(tmp_path) == Identity(
        "n1", 2, replica_store_id=store_id, placement=PLACEMENT
    )
    again = open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    )
    assert again.store_id == store_id
    again.close()


def test_a_lost_replica_store_is_refused_never_started_empty(tmp_path: Path) -> None:
    open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    ).close()
    (tmp_path / REPLICA_DIR / DATA_FILE).unlink()
    with pytest.raises(StoreError, match="could elect two leaders"):
        open_replica_store(tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED)
    assert not (tmp_path / REPLICA_DIR / DATA_FILE).exists()


def test_a_replaced_replica_store_is_refused(tmp_path: Path) -> None:
    open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    ).close()
    other = tmp_path / "other"
    open_replica_store(
        other, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    ).close()
    (tmp_path / REPLICA_DIR / DATA_FILE).write_bytes((other / REPLICA_DIR / DATA_FILE).read_bytes())
    with pytest.raises(StoreError, match=r"is not the one kv-node\.json records"):
        open_replica_store(tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED)


def test_one_copy_and_replicas_never_share_a_directory(tmp_path: Path) -> None:
    single, replicated = tmp_path / "single", tmp_path / "replicated"
    open_store("lmdb", single, "n1", map_size=REPLICA_MAP).close()
    with pytest.raises(StoreError, match="holds a single-copy store"):
        open_replica_store(single, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED)
    open_replica_store(
        replicated, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    ).close()
    with pytest.raises(StoreError, match="holds a replica store"):
        open_store("lmdb", replicated, "n1", map_size=REPLICA_MAP)
    with pytest.raises(StoreError, match="belongs to node 'n1', not 'n2'"):
        open_replica_store(
            replicated, "n2", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
        )


def test_a_replica_store_is_refused_under_another_placement(tmp_path: Path) -> None:
    open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    ).close()
    before = (tmp_path / IDENTITY_FILE).read_bytes()
    other = PLACEMENT.replace("1024 partitions", "4096 partitions")
    with pytest.raises(StoreError, match="holds replicas for members n1,n2,n3; 1024 partitions"):
        open_replica_store(tmp_path, "n1", map_size=REPLICA_MAP, placement=other, hosted=HOSTED)
    assert (tmp_path / IDENTITY_FILE).read_bytes() == before


def test_a_replica_store_from_before_placement_was_recorded_records_it(tmp_path: Path) -> None:
    store = open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    )
    store_id = store.store_id
    store.close()
    document = json.loads((tmp_path / IDENTITY_FILE).read_text())
    del document["placement"]
    (tmp_path / IDENTITY_FILE).write_text(json.dumps(document))
    open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED
    ).close()
    assert read_identity(tmp_path) == Identity(
        "n1", 2, replica_store_id=store_id, placement=PLACEMENT
    )


def test_describe_placement_names_what_moves_partitions() -> None:
    members = tuple(Member(n, f"127.0.0.1:{7000 + i}") for i, n in enumerate(["n2", "n1", "n3"]))
    built = ClusterMap.build(
        epoch=1, members=members, partitions=64, replication_factor=3, vnodes=8
    )
    assert describe_placement(built) == (
        "members n1,n2,n3; 64 partitions; 8 vnodes; replication factor 3"
    )
    moved = ClusterMap.build(
        epoch=2,
        members=tuple(Member(m.node_id, "10.0.0.1:" + str(i)) for i, m in enumerate(members, 1)),
        partitions=64,
        replication_factor=3,
        vnodes=8,
    )
    assert describe_placement(moved) == describe_placement(built)


def test_an_old_replica_store_holding_other_partitions_is_refused(tmp_path: Path) -> None:
    """A replica directory from before the placement was recorded, created with 4,096
    partitions (the default then), must not start at 1,024: it holds groups 1024..4095."""
    store = open_replica_store(
        tmp_path, "n1", map_size=REPLICA_MAP, placement="old", hosted=range(4096)
    )
    store.bootstrap({p: ConfState(voters=frozenset({1, 2, 3})) for p in (5, 4095)})
    store.close()
    document = json.loads((tmp_path / IDENTITY_FILE).read_text())
    del document["placement"]
    (tmp_path / IDENTITY_FILE).write_text(json.dumps(document))
    before = (tmp_path / IDENTITY_FILE).read_bytes()
    with pytest.raises(StoreError, match="holds partition 4095's group"):
        open_replica_store(tmp_path, "n1", map_size=REPLICA_MAP, placement=PLACEMENT, hosted=HOSTED)
    assert (tmp_path / IDENTITY_FILE).read_bytes() == before


def test_a_single_copy_store_records_its_placement_and_refuses_another(tmp_path: Path) -> None:
    one_copy = PLACEMENT.replace("replication factor 3", "replication factor 1")
    store = open_store("lmdb", tmp_path, "n1", map_size=REPLICA_MAP, placement=one_copy)
    store.write([PutOp(b"k", b"v")])
    store.close()
    identity = read_identity(tmp_path)
    assert identity is not None and identity.placement == one_copy
    before = (tmp_path / IDENTITY_FILE).read_bytes()
    moved = one_copy.replace("members n1,n2,n3", "members n1,n2,n3,n4")
    with pytest.raises(StoreError, match="holds keys for members n1,n2,n3; 1024 partitions"):
        open_store("lmdb", tmp_path, "n1", map_size=REPLICA_MAP, placement=moved)
    assert (tmp_path / IDENTITY_FILE).read_bytes() == before
    open_store("lmdb", tmp_path, "n1", map_size=REPLICA_MAP, placement=one_copy).close()
    open_store("lmdb", tmp_path, "n1", map_size=REPLICA_MAP).close()  # tools: no check
    assert (tmp_path / IDENTITY_FILE).read_bytes() == before
