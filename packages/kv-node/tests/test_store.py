from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kv_node.data_dir import claim, open_store
from kv_node.store import DeleteOp, PutOp, Store, StoreError, WriteResult
from kv_node.store.lmdb_store import LmdbStore
from kv_node.store.memory import MemoryStore


@pytest.fixture(params=["memory", "lmdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    engine: Store = MemoryStore() if request.param == "memory" else LmdbStore(tmp_path / "db")
    yield engine
    engine.close()


def test_put_get_delete_round_trip(store: Store) -> None:
    assert store.get(b"k") is None
    (put,) = store.write([PutOp(b"k", b"v1")])
    assert put == WriteResult(succeeded=True, found=False, version=1)
    assert store.get(b"k") == (b"v1", 1)
    (delete,) = store.write([DeleteOp(b"k")])
    assert delete == WriteResult(succeeded=True, found=True, version=2)
    assert store.get(b"k") is None
    assert store.count() == 0


def test_versions_are_revisions_and_never_reused(store: Store) -> None:
    store.write([PutOp(b"a", b"1"), PutOp(b"b", b"1")])
    store.write([DeleteOp(b"a")])
    (again,) = store.write([PutOp(b"a", b"2")])
    assert again.version == 4, "a recreated key gets a fresh revision, not version 1"
    assert store.revision == 4


def test_conditional_put(store: Store) -> None:
    (first,) = store.write([PutOp(b"k", b"v", if_version=0)])
    assert first.succeeded and first.version == 1
    (absent_again,) = store.write([PutOp(b"k", b"x", if_version=0)])
    assert absent_again == WriteResult(succeeded=False, found=True, version=1)
    (stale,) = store.write([PutOp(b"k", b"x", if_version=7)])
    assert not stale.succeeded and stale.version == 1
    (cas,) = store.write([PutOp(b"k", b"y", if_version=1)])
    assert cas.succeeded and cas.version == 2
    assert store.get(b"k") == (b"y", 2)


def test_conditional_delete(store: Store) -> None:
    (missing,) = store.write([DeleteOp(b"k", if_version=3)])
    assert missing == WriteResult(succeeded=False, found=False, version=0)
    store.write([PutOp(b"k", b"v")])
    (wrong,) = store.write([DeleteOp(b"k", if_version=9)])
    assert not wrong.succeeded and store.get(b"k") == (b"v", 1)
    (right,) = store.write([DeleteOp(b"k", if_version=1)])
    assert right.succeeded and right.found and store.get(b"k") is None


def test_failed_writes_do_not_advance_the_revision(store: Store) -> None:
    store.write([PutOp(b"k", b"v")])
    store.write([PutOp(b"k", b"x", if_version=0), DeleteOp(b"missing")])
    assert store.revision == 1


def test_a_batch_sees_its_own_earlier_writes(store: Store) -> None:
    results = store.write([PutOp(b"k", b"1"), PutOp(b"k", b"2", if_version=1), DeleteOp(b"k")])
    assert [r.succeeded for r in results] == [True, True, True]
    assert [r.version for r in results] == [1, 2, 3]
    assert store.get(b"k") is None


def test_binary_keys_and_values(store: Store) -> None:
    key, value = bytes(range(256)), b"\x00" * 1000 + b"\xff"
    store.write([PutOp(key, value)])
    assert store.get(key) == (value, 1)


def test_lmdb_survives_reopen(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db")
    store.write([PutOp(f"k{i}".encode(), f"v{i}".encode()) for i in range(100)])
    store.write([DeleteOp(b"k0")])
    store.close()
    reopened = LmdbStore(tmp_path / "db")
    assert reopened.count() == 99
    assert reopened.get(b"k99") == (b"v99", 100)
    assert reopened.revision == 101
    (next_write,) = reopened.write([PutOp(b"new", b"x")])
    assert next_write.version == 102
    reopened.close()


def test_data_dir_remembers_its_node(tmp_path: Path) -> None:
    claim(tmp_path / "d", "n1")
    claim(tmp_path / "d", "n1")
    with pytest.raises(StoreError, match="belongs to node 'n1', not 'n2'"):
        claim(tmp_path / "d", "n2")


def test_unwritable_data_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot use data directory"):
        open_store("lmdb", blocker / "sub", "n1")


def test_unknown_engine_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unknown engine 'rocks'"):
        open_store("rocks", tmp_path, "n1")


def test_open_store_picks_the_engine(tmp_path: Path) -> None:
    durable = open_store("lmdb", tmp_path / "a", "n1")
    volatile = open_store("memory", None, "n1")
    assert (durable.engine, durable.durable) == ("lmdb", True)
    assert (volatile.engine, volatile.durable) == ("memory", False)
    durable.close()
