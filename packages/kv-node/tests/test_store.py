from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from kv_common.limits import MAX_KEY_BYTES
from kv_node.data_dir import claim, open_store
from kv_node.store import DeleteOp, GetOp, PutOp, ReadResult, Store, StoreError, WriteResult
from kv_node.store.lmdb_keys import DIGEST_BYTES, INLINE_KEY_BYTES
from kv_node.store.lmdb_store import DURABLE_FLAGS, LmdbStore
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


LONG_KEY_LENGTHS = (INLINE_KEY_BYTES, INLINE_KEY_BYTES + 1, 511, 512, MAX_KEY_BYTES)


def test_every_key_the_api_accepts_round_trips(store: Store) -> None:
    keys = [bytes([n % 251]) * n for n in LONG_KEY_LENGTHS]
    # Long keys that differ only after the part kept in the stored key.
    shared = b"p" * INLINE_KEY_BYTES
    keys += [shared + b"a" * 100, shared + b"b" * 100, shared + b"a" * 101]
    results = store.write([PutOp(key, key[-3:] + b"!") for key in keys])
    assert all(r.succeeded for r in results)
    for index, key in enumerate(keys):
        assert store.get(key) == (key[-3:] + b"!", index + 1)
    assert store.get(shared) is None and store.get(shared + b"c" * 100) is None
    assert store.count() == len(keys)
    (delete,) = store.write([DeleteOp(keys[-2])])
    assert delete.found and store.get(keys[-2]) is None and store.get(keys[-3]) is not None
    assert store.count() == len(keys) - 1


def test_long_keys_survive_reopen(tmp_path: Path) -> None:
    key = b"k" * MAX_KEY_BYTES
    store = LmdbStore(tmp_path / "db")
    store.write([PutOp(key, b"v")])
    store.close()
    reopened = LmdbStore(tmp_path / "db")
    assert reopened.get(key) == (b"v", 1)
    reopened.close()


def colliding(_: bytes) -> bytes:
    """Every long key gets the same digest: every long key with one prefix shares a bucket."""
    return b"\0" * DIGEST_BYTES


def test_long_keys_whose_digests_collide_stay_apart(tmp_path: Path) -> None:
    prefix = b"c" * INLINE_KEY_BYTES
    keys = [prefix + bytes([i]) * (i + 1) for i in range(5)]
    store = LmdbStore(tmp_path / "db", digest=colliding)
    store.write([PutOp(key, b"v%d" % i) for i, key in enumerate(keys)])
    assert store.count() == 5
    (cas,) = store.write([PutOp(keys[2], b"new", if_version=3)])
    assert cas == WriteResult(succeeded=True, found=True, version=6)
    (gone,) = store.write([DeleteOp(keys[0])])
    assert gone.found and store.count() == 4
    store.close()
    reopened = LmdbStore(tmp_path / "db", digest=colliding)
    assert [reopened.get(key) for key in keys] == [
        None,
        (b"v1", 2),
        (b"new", 6),
        (b"v3", 4),
        (b"v4", 5),
    ]
    reopened.write([DeleteOp(key) for key in keys])
    assert reopened.count() == 0
    reopened.close()


def test_keys_stored_by_the_old_layout_are_moved(tmp_path: Path) -> None:
    """Stores from before the long-key layout held keys of up to 511 bytes as themselves."""
    old_key = b"o" * 511
    env = lmdb.open(str(tmp_path / "db"), max_dbs=2)
    with env.begin(write=True, db=env.open_db(b"data")) as txn:
        txn.put(old_key, (7).to_bytes(8, "big") + b"old")
        txn.put(b"short", (8).to_bytes(8, "big") + b"kept")
    env.close()
    store = LmdbStore(tmp_path / "db")
    assert store.get(old_key) == (b"old", 7)
    assert store.get(b"short") == (b"kept", 8)
    assert store.count() == 2
    store.close()


def test_reads_among_writes_see_exactly_the_writes_before_them(store: Store) -> None:
    outcomes = store.apply(
        [GetOp(b"k"), PutOp(b"k", b"1"), GetOp(b"k"), PutOp(b"k", b"2"), GetOp(b"k")]
    )
    assert outcomes == [
        ReadResult(None, 0),
        WriteResult(succeeded=True, found=False, version=1),
        ReadResult(b"1", 1),
        WriteResult(succeeded=True, found=True, version=2),
        ReadResult(b"2", 2),
    ]
    (deleted, after) = store.apply([DeleteOp(b"k"), GetOp(b"k")])
    assert deleted.version == 3 and after == ReadResult(None, 0)


def test_lmdb_commits_are_flushed_before_they_return(tmp_path: Path) -> None:
    """An acknowledged write is on disk: LMDB fsyncs data and meta page inside every commit.

    kill -9 keeps the page cache, so no crash test notices a store opened
    without sync; the live environment's flags do.
    """
    store = LmdbStore(tmp_path / "db")
    flags = store.flags()
    assert {name: flags[name] for name in DURABLE_FLAGS} == {
        "sync": True,
        "metasync": True,
        "map_async": False,
    }
    store.close()


def test_one_store_is_opened_by_one_process_at_a_time(tmp_path: Path) -> None:
    first = LmdbStore(tmp_path / "db")
    with pytest.raises(StoreError, match="is in use by another process"):
        LmdbStore(tmp_path / "db")
    first.close()
    LmdbStore(tmp_path / "db").close()


@pytest.mark.parametrize("map_size", [-1, 1, 4096, 10**21])
def test_a_map_size_lmdb_cannot_use_is_a_store_error(tmp_path: Path, map_size: int) -> None:
    with pytest.raises(StoreError, match="cannot open LMDB store"):
        LmdbStore(tmp_path / "db", map_size=map_size)
    LmdbStore(tmp_path / "db").close()  # nothing was left locked or half-made
