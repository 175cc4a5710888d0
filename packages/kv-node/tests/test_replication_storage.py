"""The replica store: MemoryStorage's semantics on disk, plus apply, snapshots and durability."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from kv_common.limits import MAX_KEY_BYTES
from kv_node.replication import storage as storage_module
from kv_node.replication.command import CommandError, decode_command, encode_command
from kv_node.replication.storage import (
    ENV_FLAGS,
    INLINE_KEY_BYTES,
    LAYOUT,
    AppliedEntry,
    ApplyGapError,
    GroupLog,
    GroupWrite,
    ReplicaStore,
    SnapshotDataError,
    decode_snapshot_data,
)
from kv_node.store import (
    DeleteOp,
    GetOp,
    Op,
    PutOp,
    ReadResult,
    StoreError,
    WriteResult,
)
from kv_node.store.lmdb_store import LmdbStore
from kv_raft import (
    CompactedError,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    RawNode,
    Snapshot,
    SnapshotMeta,
    UnavailableError,
)

MAP_SIZE = 1 << 30
THREE = ConfState(voters=frozenset({1, 2, 3}))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "replica"


@pytest.fixture
def store(path: Path) -> Iterator[ReplicaStore]:
    opened = ReplicaStore.open(path, map_size=MAP_SIZE)
    opened.bootstrap({0: THREE, 1: THREE})
    yield opened
    opened.close()


def command(index: int, *ops: Op, term: int = 2) -> Entry:
    return Entry(term=term, index=index, data=encode_command(ops))


def apply(store: ReplicaStore, group: int, *entries: Entry) -> list[AppliedEntry]:
    """Append ``entries`` and apply them at once, as a leader of one does."""
    commit = entries[-1].index
    write = GroupWrite(group, HardState(2, 1, commit), entries, None, entries)
    return store.commit([write]).get(group, [])


def contents(store: ReplicaStore, group: int) -> dict[bytes, tuple[bytes, int]]:
    snapshot = store.group(group).snapshot()
    return {key: (value, version) for key, value, version in decode_snapshot_data(snapshot.data)}


def reopen(store: ReplicaStore, path: Path, **kwargs: Any) -> ReplicaStore:
    store.close()
    return ReplicaStore.open(path, map_size=MAP_SIZE, **kwargs)


# -- founding and reopening --------------------------------------------------------------------
def test_a_founded_group_reads_exactly_like_a_founding_memory_storage(store: ReplicaStore) -> None:
    model = MemoryStorage(THREE)
    log = store.group(0)
    assert log.initial_state() == model.initial_state()
    assert (log.first_index(), log.last_index()) == (model.first_index(), model.last_index())
    assert log.term(1) == model.term(1) == 1
    assert log.snapshot().meta == model.snapshot().meta
    assert store.applied(0) == 1
    with pytest.raises(CompactedError):
        log.term(0)
    with pytest.raises(UnavailableError):
        log.term(2)


def test_bootstrap_founds_only_groups_that_have_no_state(store: ReplicaStore) -> None:
    apply(store, 0, command(2, PutOp(b"k", b"v")))
    store.bootstrap({0: ConfState(voters=frozenset({9})), 2: THREE})
    assert store.group(0).initial_state() == (HardState(2, 1, 2), THREE)
    assert store.get(0, b"k") == (b"v", 2)
    assert store.group(2).initial_state() == MemoryStorage(THREE).initial_state()


def test_the_store_lists_the_groups_it_holds(store: ReplicaStore, path: Path) -> None:
    store.group(5)  # reading a group creates nothing
    store.commit([GroupWrite(9, HardState(3, 2, 0))])
    store = reopen(store, path)
    assert store.groups() == [0, 1, 9]
    store.close()


def test_a_group_without_state_reads_as_empty_storage(store: ReplicaStore) -> None:
    model = MemoryStorage()
    log = store.group(7)
    assert log.initial_state() == model.initial_state()
    assert (log.first_index(), log.last_index()) == (1, 0)
    assert log.snapshot() == model.snapshot()


def test_reopening_gives_back_the_log_hard_state_applied_index_and_data(
    store: ReplicaStore, path: Path
) -> None:
    entries = [
        command(2, PutOp(b"a", b"1")),
        Entry(term=2, index=3),
        command(4, PutOp(b"b", b"2"), term=3),
        command(5, DeleteOp(b"a"), term=3),
    ]
    store.commit([GroupWrite(0, HardState(3, 2, 4), entries, None, entries[:3])])
    before = store.group(0)
    state = (
        before.initial_state(),
        before.first_index(),
        before.last_index(),
        before.entries(2, 6),
        [before.term(i) for i in range(1, 6)],
    )
    store = reopen(store, path)
    after = store.group(0)
    assert (
        after.initial_state(),
        after.first_index(),
        after.last_index(),
        after.entries(2, 6),
        [after.term(i) for i in range(1, 6)],
    ) == state
    assert store.applied(0) == 4
    assert store.get(0, b"a") == (b"1", 2)  # entry 5 is in the log but not applied
    assert store.get(0, b"b") == (b"2", 4)
    assert store.hard_state(0) == HardState(3, 2, 4)
    store.close()


def test_replaying_committed_entries_after_a_reopen_applies_nothing_twice(
    store: ReplicaStore, path: Path
) -> None:
    entries = [command(2, PutOp(b"k", b"a")), command(3, PutOp(b"k", b"b", if_version=2))]
    apply(store, 0, *entries)
    store = reopen(store, path)
    replay = store.commit([GroupWrite(0, committed=entries)])
    assert replay == {}
    assert store.get(0, b"k") == (b"b", 3)
    assert store.applied(0) == 3
    store.close()


# -- the log: MemoryStorage's semantics ----------------------------------------------------------
def test_an_append_replaces_the_conflicting_suffix(store: ReplicaStore, path: Path) -> None:
    old = [Entry(2, i, data=b"old") for i in range(2, 7)]
    new = [Entry(3, i, data=b"new") for i in range(4, 6)]
    store.commit([GroupWrite(0, entries=old)])
    store.commit([GroupWrite(0, entries=new)])
    expected = old[:2] + new
    assert store.group(0).entries(2, 6) == expected
    assert store.group(0).last_index() == 5
    store = reopen(store, path)
    assert store.group(0).entries(2, 6) == expected
    assert [store.group(0).term(i) for i in range(2, 6)] == [2, 2, 3, 3]
    with pytest.raises(UnavailableError):
        store.group(0).term(6)
    store.close()


def test_compaction_keeps_memory_storage_errors(store: ReplicaStore, path: Path) -> None:
    entries = [Entry(2, i, data=bytes(i)) for i in range(2, 8)]
    store.commit([GroupWrite(0, HardState(2, 1, 7), entries, None, entries)])
    store.compact(0, 4)
    for reopened in (False, True):
        if reopened:
            store = reopen(store, path)
        log = store.group(0)
        assert (log.first_index(), log.last_index(), log.term(4)) == (5, 7, 2)
        with pytest.raises(CompactedError):
            log.term(3)
        with pytest.raises(CompactedError):
            log.entries(4, 6)
        with pytest.raises(UnavailableError):
            log.entries(5, 9)
        assert log.entries(5, 8) == entries[3:]
    store.close()


def test_only_applied_entries_can_be_compacted(store: ReplicaStore) -> None:
    store.commit([GroupWrite(0, entries=[Entry(2, 2), Entry(2, 3)])])
    with pytest.raises(ValueError, match="applied 1"):
        store.compact(0, 2)
    with pytest.raises(UnavailableError):
        store.compact(0, 4)
    assert store.group(0).first_index() == 2


def test_entries_respect_max_size_in_memory_and_on_disk(
    store: ReplicaStore, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "ENTRY_CACHE_ENTRIES", 2)
    model = MemoryStorage(THREE)
    entries = [Entry(2, i, data=b"x" * i) for i in range(2, 12)]
    model.append(entries)
    store.commit([GroupWrite(0, entries=entries)])
    for reopened in (False, True):
        if reopened:
            store = reopen(store, path)
        for lo, hi, max_size in [(2, 12, None), (2, 12, 0), (2, 12, 9), (5, 9, 20), (10, 12, 1)]:
            assert store.group(0).entries(lo, hi, max_size) == model.entries(lo, hi, max_size)
    store.close()


# -- applying ----------------------------------------------------------------------------------
def test_versions_are_raft_indexes_and_gets_see_earlier_ops_of_their_entry(
    store: ReplicaStore,
) -> None:
    applied = apply(
        store,
        0,
        command(2, PutOp(b"a", b"1"), GetOp(b"a"), PutOp(b"a", b"2"), GetOp(b"a")),
        command(3, GetOp(b"a"), DeleteOp(b"a"), GetOp(b"a"), DeleteOp(b"a")),
    )
    assert applied == [
        AppliedEntry(
            2,
            2,
            (
                WriteResult(True, False, 2),
                ReadResult(b"1", 2),
                WriteResult(True, True, 2),
                ReadResult(b"2", 2),
            ),
        ),
        AppliedEntry(
            3,
            2,
            (
                ReadResult(b"2", 2),
                WriteResult(True, True, 3),
                ReadResult(None, 0),
                WriteResult(True, False, 0),
            ),
        ),
    ]
    assert store.get(0, b"a") is None


def test_conditional_writes_compare_raft_index_versions(store: ReplicaStore) -> None:
    applied = apply(
        store,
        0,
        command(2, PutOp(b"k", b"v1", if_version=0)),
        command(3, PutOp(b"k", b"lost", if_version=0)),
        command(4, PutOp(b"k", b"v2", if_version=2)),
        command(5, DeleteOp(b"k", if_version=2)),
        command(6, DeleteOp(b"k", if_version=4)),
    )
    assert [entry.outcomes for entry in applied] == [
        (WriteResult(True, False, 2),),
        (WriteResult(False, True, 2),),
        (WriteResult(True, True, 4),),
        (WriteResult(False, True, 4),),
        (WriteResult(True, True, 6),),
    ]
    assert store.get(0, b"k") is None


@pytest.mark.parametrize(
    "size",
    [1, INLINE_KEY_BYTES, INLINE_KEY_BYTES + 1, INLINE_KEY_BYTES + 16, 511, 512, MAX_KEY_BYTES],
)
def test_keys_of_every_length_are_stored_and_snapshotted(
    store: ReplicaStore, path: Path, size: int
) -> None:
    key, other = b"k" * size, b"k" * (size - 1) + b"j"
    apply(store, 0, command(2, PutOp(key, b"v"), PutOp(other, b"w")), command(3, DeleteOp(other)))
    assert store.get(0, key) == (b"v", 2)
    assert store.get(0, other) is None
    assert contents(store, 0) == {key: (b"v", 2)}
    store = reopen(store, path)
    assert store.get(0, key) == (b"v", 2)
    store.close()


def test_every_key_length_around_lmdbs_limit_is_stored(store: ReplicaStore) -> None:
    """The group prefix shortens what fits inline: each length on both sides of the cut."""
    keys = [bytes([length % 251]) * length for length in range(INLINE_KEY_BYTES - 2, 520)]
    apply(store, 0, command(2, *(PutOp(key, key[:3]) for key in keys)))
    assert [store.get(0, key) for key in keys] == [(key[:3], 2) for key in keys]
    assert contents(store, 0) == {key: (key[:3], 2) for key in keys}


def test_long_keys_whose_digests_collide_stay_apart(path: Path) -> None:
    store = ReplicaStore.open(path, map_size=MAP_SIZE, digest=lambda key: b"\x00" * 16)
    store.bootstrap({0: THREE})
    first, second = b"k" * MAX_KEY_BYTES, b"k" * (MAX_KEY_BYTES - 1) + b"j"
    apply(store, 0, command(2, PutOp(first, b"1")), command(3, PutOp(second, b"2")))
    assert (store.get(0, first), store.get(0, second)) == ((b"1", 2), (b"2", 3))
    apply(store, 0, command(4, DeleteOp(first)))
    assert (store.get(0, first), store.get(0, second)) == (None, (b"2", 3))
    assert contents(store, 0) == {second: (b"2", 3)}
    store.close()


def test_partitions_are_separate(store: ReplicaStore) -> None:
    apply(store, 0, command(2, PutOp(b"k", b"zero")))
    apply(store, 1, command(2, PutOp(b"k", b"one")), command(3, PutOp(b"k", b"one!")))
    assert (store.get(0, b"k"), store.get(1, b"k")) == ((b"zero", 2), (b"one!", 3))


def test_a_malformed_command_is_the_same_failure_on_every_replica(
    store: ReplicaStore, tmp_path: Path
) -> None:
    other = ReplicaStore.open(tmp_path / "other", map_size=MAP_SIZE)
    other.bootstrap({0: THREE})
    entries = (Entry(2, 2, data=b"\x01\x00garbage"), command(3, PutOp(b"k", b"v")))
    results = [apply(replica, 0, *entries) for replica in (store, other)]
    assert results[0] == results[1]
    assert results[0][0].error is not None and "ops cannot fit" in results[0][0].error
    assert results[0][0].outcomes == ()
    assert results[0][1] == AppliedEntry(3, 2, (WriteResult(True, False, 3),))
    assert store.applied(0) == other.applied(0) == 3
    other.close()


def test_a_configuration_change_moves_the_conf_state_at_its_index(store: ReplicaStore) -> None:
    change = ConfChange(ConfChangeType.ADD_LEARNER, 4).encode()
    applied = apply(store, 0, Entry(2, 2, EntryType.CONF_CHANGE, change))
    assert applied == [AppliedEntry(2, 2)]
    expected = ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4}))
    assert store.group(0).initial_state()[1] == expected
    assert store.group(0).snapshot().meta == SnapshotMeta(2, 2, expected)


def test_a_gap_raises_and_leaves_the_store_unchanged(store: ReplicaStore, path: Path) -> None:
    apply(store, 0, command(2, PutOp(b"k", b"v")))
    before = (store.group(0).last_index(), store.hard_state(0), store.applied(0))
    writes = [
        GroupWrite(1, HardState(5, 1, 2), [command(2, PutOp(b"x", b"1"))], None, []),
        GroupWrite(
            0,
            HardState(5, 1, 4),
            [command(3, PutOp(b"k", b"w")), command(4, PutOp(b"k", b"u"))],
            None,
            [command(4, PutOp(b"k", b"u"))],
        ),
    ]
    with pytest.raises(ApplyGapError, match="entry 4 committed after applied 2"):
        store.commit(writes)
    for reopened in (False, True):
        if reopened:
            store = reopen(store, path)
        assert (store.group(0).last_index(), store.hard_state(0), store.applied(0)) == before
        assert store.get(0, b"k") == (b"v", 2)
        assert store.group(1).last_index() == 1
        assert store.hard_state(1) == HardState(1, 0, 1)
    store.close()


def test_entries_that_would_replace_applied_ones_are_refused(store: ReplicaStore) -> None:
    apply(store, 0, command(2, PutOp(b"k", b"v")), command(3, PutOp(b"k", b"w")))
    for entries in ([Entry(3, 3)], [Entry(2, 2)]):
        with pytest.raises(ValueError, match="would replace applied entries"):
            store.commit([GroupWrite(0, entries=entries)])
    store.commit([GroupWrite(0, entries=[command(3, PutOp(b"k", b"w")), Entry(3, 4)])])
    assert [store.group(0).term(i) for i in (2, 3, 4)] == [2, 2, 3]


def test_entries_whose_term_falls_are_refused(store: ReplicaStore) -> None:
    """Reopening finds each term's run by bisection, which holds only while terms never fall."""
    store.commit([GroupWrite(0, entries=[Entry(3, 2)])])
    for entries in ([Entry(2, 3)], [Entry(3, 3), Entry(4, 4), Entry(3, 5)]):
        with pytest.raises(ValueError, match="term falls"):
            store.commit([GroupWrite(0, entries=entries)])
    assert store.group(0).last_index() == 2


def test_a_committed_entry_must_be_in_the_log(store: ReplicaStore) -> None:
    with pytest.raises(ApplyGapError, match="entry 2 is not in the log"):
        store.commit([GroupWrite(0, committed=[command(2, PutOp(b"k", b"v"))])])
    assert store.applied(0) == 1


def test_one_commit_may_carry_several_writes_of_a_group(store: ReplicaStore, path: Path) -> None:
    entry = command(2, PutOp(b"k", b"v"))
    results = store.commit(
        [GroupWrite(0, entries=[entry]), GroupWrite(0, HardState(2, 1, 2), committed=[entry])]
    )
    assert results == {0: [AppliedEntry(2, 2, (WriteResult(True, False, 2),))]}
    store = reopen(store, path)
    assert (store.group(0).last_index(), store.applied(0)) == (2, 2)
    store.close()


def test_entries_that_leave_a_hole_in_the_log_are_refused(store: ReplicaStore) -> None:
    with pytest.raises(UnavailableError):
        store.commit([GroupWrite(0, entries=[Entry(2, 3)])])
    assert store.group(0).last_index() == 1


# -- snapshots ---------------------------------------------------------------------------------
def test_a_snapshot_installs_into_a_fresh_store_as_the_same_partition(
    store: ReplicaStore, tmp_path: Path
) -> None:
    long_key = b"L" * MAX_KEY_BYTES
    apply(
        store,
        0,
        command(2, PutOp(b"a", b"1"), PutOp(long_key, b"long")),
        command(3, PutOp(b"b", b"2"), DeleteOp(b"a")),
        command(4, PutOp(b"a", b"3")),
    )
    store.commit([GroupWrite(0, entries=[command(5, PutOp(b"z", b"unapplied"))])])
    snapshot = store.group(0).snapshot()
    assert snapshot.meta == SnapshotMeta(4, 2, THREE)

    fresh = ReplicaStore.open(tmp_path / "fresh", map_size=MAP_SIZE)
    fresh.bootstrap({0: ConfState(voters=frozenset({1})), 1: THREE})
    apply(fresh, 0, command(2, PutOp(b"stale", b"gone")))
    apply(fresh, 1, command(2, PutOp(b"other", b"kept")))
    fresh.commit([GroupWrite(0, snapshot=snapshot)])

    assert (
        contents(fresh, 0)
        == contents(store, 0)
        == {
            b"a": (b"3", 4),
            b"b": (b"2", 3),
            long_key: (b"long", 2),
        }
    )
    assert fresh.get(0, long_key) == (b"long", 2)
    assert fresh.get(0, b"stale") is None
    assert fresh.get(1, b"other") == (b"kept", 2)
    log = fresh.group(0)
    assert (log.first_index(), log.last_index(), log.term(4), fresh.applied(0)) == (5, 4, 2, 4)
    assert log.initial_state()[1] == THREE
    assert fresh.hard_state(0).commit == 4
    assert log.snapshot() == snapshot
    fresh.close()


def test_a_snapshot_no_newer_than_the_applied_index_is_ignored(store: ReplicaStore) -> None:
    apply(store, 0, command(2, PutOp(b"k", b"v")), command(3, PutOp(b"k", b"w")))
    old = Snapshot(SnapshotMeta(3, 2, THREE), b"\x01")
    store.commit([GroupWrite(0, snapshot=old)])
    assert store.get(0, b"k") == (b"w", 3)
    assert store.group(0).last_index() == 3


def test_damaged_snapshot_data_is_refused_before_anything_changes(store: ReplicaStore) -> None:
    apply(store, 0, command(2, PutOp(b"k", b"v")))
    damaged = Snapshot(SnapshotMeta(9, 3, THREE), b"\x01\x00\x00\x00\x05")
    with pytest.raises(SnapshotDataError):
        store.commit([GroupWrite(0, snapshot=damaged)])
    assert store.get(0, b"k") == (b"v", 2)
    assert store.applied(0) == 2


# -- equivalence with MemoryStorage --------------------------------------------------------------
def _same(call: Callable[..., object], model_call: Callable[..., object], *args: Any) -> None:
    """Both give the same value, or both raise the same error type."""
    outcomes: list[object] = []
    for each in (call, model_call):
        try:
            outcomes.append(each(*args))
        except (CompactedError, UnavailableError) as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]


def _check(log: GroupLog, model: MemoryStorage, rng: random.Random) -> None:
    assert log.first_index() == model.first_index()
    assert log.last_index() == model.last_index()
    assert log.initial_state()[0] == model.hard_state
    for index in range(model.first_index() - 3, model.last_index() + 3):
        _same(log.term, model.term, index)
    for _ in range(6):
        lo = rng.randint(model.first_index() - 2, model.last_index() + 2)
        hi = rng.randint(lo, model.last_index() + 3)
        size = rng.choice([None, 0, 10, 40])
        _same(log.entries, model.entries, lo, hi, size)


@pytest.mark.parametrize("seed", range(40))
def test_the_log_behaves_like_memory_storage(
    path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random appends (conflicting, overlapping the compacted prefix, leaving holes), applies,
    compactions and reopens: every read answers as MemoryStorage does, and the data is what
    the applied commands wrote. A small entry cache makes both read paths run."""
    monkeypatch.setattr(storage_module, "ENTRY_CACHE_ENTRIES", 3)
    rng = random.Random(seed)
    store = ReplicaStore.open(path, map_size=MAP_SIZE)
    store.bootstrap({0: THREE})
    model = MemoryStorage(THREE)
    data: dict[bytes, tuple[bytes, int]] = {}
    applied = 1
    for _ in range(60):
        action = rng.choices(["append", "apply", "compact", "reopen"], [6, 3, 2, 1])[0]
        if action == "append":
            start = rng.randint(max(2, model.first_index() - 3), model.last_index() + 2)
            entries = []
            shortest = max(1, applied - start + 2)  # never ends before the applied index
            term = model.term(min(max(start, model.first_index()) - 1, model.last_index()))
            for index in range(start, start + rng.randint(shortest, shortest + 4)):
                if index <= applied and index >= model.first_index():
                    entries.append(model.entries(index, index + 1)[0])  # committed: never changes
                    term = entries[-1].term
                    continue
                term += rng.choice([0, 0, 1])  # terms never fall along a log
                key = bytes([rng.randint(97, 99)])
                payload = (
                    encode_command([PutOp(key, rng.randbytes(rng.randint(0, 20)))])
                    if rng.random() < 0.7
                    else rng.randbytes(rng.randint(0, 20))
                )
                entries.append(Entry(term, index, data=payload))
            try:
                model.append(entries)
            except UnavailableError:
                with pytest.raises(UnavailableError):
                    store.commit([GroupWrite(0, entries=entries)])
            else:
                store.commit([GroupWrite(0, entries=entries)])
        elif action == "apply":
            target = min(applied + rng.randint(1, 4), model.last_index())
            if target > applied:
                committed = model.entries(applied + 1, target + 1)
                hard = HardState(4, 1, target)
                model.set_hard_state(hard)
                store.commit([GroupWrite(0, hard, committed=committed)])
                for entry in committed:
                    try:
                        ops = decode_command(entry.data).ops
                    except CommandError:
                        continue
                    for op in ops:
                        assert isinstance(op, PutOp)
                        data[op.key] = (op.value, entry.index)
                applied = target
        elif action == "compact":
            index = rng.randint(model.first_index() - 2, applied)
            model.compact(index)
            store.compact(0, index)
        else:
            store = reopen(store, path, sync=False)
        _check(store.group(0), model, rng)
        assert store.applied(0) == applied
        assert contents(store, 0) == data
    store.close()


# -- durability and layout -----------------------------------------------------------------------
def test_every_commit_is_flushed_by_lmdb_before_it_returns(store: ReplicaStore) -> None:
    """LMDB's own synced commit: data pages, then the meta page, each flushed, inside the
    commit (kill -9 keeps the page cache, so no crash test notices a missing flush; the live
    flags are what a test can check). A cycle that needs no fsync gets one anyway."""
    assert {name: store.flags()[name] for name in ENV_FLAGS} == {
        "sync": True,
        "metasync": True,
        "map_async": False,
    }
    flushes = store.flushes
    store.commit([GroupWrite(0, entries=[Entry(2, 2)])])
    store.commit([GroupWrite(0, hard_state=HardState(term=2, commit=2))])
    assert store.flushes == flushes + 2


def test_a_store_opened_without_sync_never_flushes(path: Path) -> None:
    store = ReplicaStore.open(path, map_size=MAP_SIZE, sync=False)
    assert (store.flags()["sync"], store.flags()["metasync"]) == (False, False)
    store.bootstrap({0: THREE})
    store.commit([GroupWrite(0, entries=[Entry(2, 2)])])
    assert store.flushes == 0
    store.close()


def test_the_single_copy_store_is_refused_in_one_line(path: Path) -> None:
    LmdbStore(path).close()
    with pytest.raises(StoreError, match=r"^[^\n]*holds a single-copy store[^\n]*$"):
        ReplicaStore.open(path, map_size=MAP_SIZE)
    LmdbStore(path).close()  # left as it was, and not left locked


def test_another_replica_layout_is_refused(store: ReplicaStore, path: Path) -> None:
    with store._env.begin(write=True) as txn:
        txn.put(b"layout", (LAYOUT + 1).to_bytes(8, "big"), db=store._meta)
    store.close()
    with pytest.raises(StoreError, match=f"replica layout {LAYOUT + 1}; this build knows"):
        ReplicaStore.open(path, map_size=MAP_SIZE)


def test_an_unknown_lmdb_store_is_refused(path: Path) -> None:
    env = lmdb.open(str(path), max_dbs=1)
    env.open_db(b"something-else")
    env.close()
    with pytest.raises(StoreError, match="not a kv replica store"):
        ReplicaStore.open(path, map_size=MAP_SIZE)


def test_one_store_is_opened_by_one_process_at_a_time(store: ReplicaStore, path: Path) -> None:
    with pytest.raises(StoreError, match="in use by another process"):
        ReplicaStore.open(path, map_size=MAP_SIZE)


def test_the_store_id_survives_reopening(store: ReplicaStore, path: Path) -> None:
    store_id = store.store_id
    assert len(store_id) == 32
    store = reopen(store, path)
    assert store.store_id == store_id
    store.close()


# -- under the real Raft core ----------------------------------------------------------------------
class _Cluster:
    """Three RawNodes of group 0, each over its own ReplicaStore, messages delivered in memory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stores: dict[int, ReplicaStore] = {}
        self.nodes: dict[int, RawNode] = {}
        self.cut: set[int] = set()
        self.applied: dict[int, list[int]] = {1: [], 2: [], 3: []}
        """Per node, the index of every entry its store applied, across restarts."""
        for node in (1, 2, 3):
            self.start(node)

    def start(self, node: int) -> None:
        store = ReplicaStore.open(self.root / str(node), map_size=MAP_SIZE)
        store.bootstrap({0: THREE})
        self.stores[node] = store
        config = Config(id=node, rng=random.Random(node), applied=store.applied(0))
        self.nodes[node] = RawNode(config, store.group(0))

    def restart(self, node: int) -> None:
        self.stores[node].close()
        self.start(node)

    def settle(self) -> None:
        inbox: list[Message] = []
        for _ in range(1000):
            for node, raw in self.nodes.items():
                while raw.has_ready():
                    ready = raw.ready()
                    results = self.stores[node].commit([GroupWrite.from_ready(0, ready)])
                    self.applied[node] += (entry.index for entry in results.get(0, []))
                    inbox += (m for m in ready.messages if not {m.to, m.frm} & self.cut)
                    raw.advance(ready)
            if not inbox:
                return
            for message in inbox:
                self.nodes[message.to].step(message)
            inbox.clear()
        raise AssertionError("the group did not settle")

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def test_three_replicas_driven_by_the_core_agree_through_restarts_and_snapshots(
    tmp_path: Path,
) -> None:
    cluster = _Cluster(tmp_path)
    cluster.nodes[1].campaign()
    cluster.settle()
    leader = cluster.nodes[1]
    for i in range(5):
        leader.propose(encode_command([PutOp(b"k%d" % (i % 2), b"v%d" % i)]))
        cluster.settle()
    cluster.restart(2)  # recovers from its own store; nothing may be applied twice
    cluster.cut = {3}
    isolated_at = cluster.stores[3].applied(0)
    for i in range(5, 10):
        leader.propose(encode_command([PutOp(b"k%d" % (i % 2), b"v%d" % i)]))
        cluster.settle()
    applied = cluster.stores[1].applied(0)
    cluster.stores[1].compact(0, applied)  # node 3 can only catch up by a snapshot now
    cluster.cut = set()
    leader.propose(encode_command([PutOp(b"last", b"!")]))
    for _ in range(3):  # heartbeats carry the leader's view to the isolated node
        leader.tick()
        cluster.settle()
    expected = contents(cluster.stores[1], 0)
    assert expected[b"k1"] == (b"v9", expected[b"k1"][1])
    assert b"last" in expected
    for node in (2, 3):
        assert contents(cluster.stores[node], 0) == expected
        assert cluster.stores[node].applied(0) == cluster.stores[1].applied(0)
    assert cluster.stores[3].group(0).first_index() > 2  # it did install a snapshot
    last = cluster.stores[1].applied(0)
    assert cluster.applied[1] == cluster.applied[2] == list(range(2, last + 1))
    assert cluster.applied[3] == [i for i in range(2, last + 1) if i <= isolated_at or i > applied]
    cluster.close()
