"""Unit tests of the pure building blocks: majority math, the log view, in-memory storage."""

from __future__ import annotations

import pytest

from kv_raft.log import LogInvariantError, RaftLog
from kv_raft.progress import Inflights, Progress, ProgressState
from kv_raft.quorum import VoteResult, committed_index, has_quorum, vote_result
from kv_raft.storage import CompactedError, MemoryStorage, UnavailableError
from kv_raft.types import ConfChange, ConfChangeType, ConfState, Entry, Snapshot, SnapshotMeta


def ents(*terms: int, start: int = 1) -> list[Entry]:
    return [Entry(term=t, index=start + i, data=b"x") for i, t in enumerate(terms)]


def test_committed_index_is_the_median_of_voters() -> None:
    assert committed_index({1, 2, 3}, {1: 5, 2: 3, 3: 1}) == 3
    assert committed_index({1, 2, 3, 4}, {1: 5, 2: 3, 3: 1, 4: 9}) == 3
    assert committed_index({1, 2, 3}, {1: 5, 9: 100}) == 0  # non-voters do not count
    assert committed_index(set(), {}) == 0


def test_vote_result() -> None:
    assert vote_result({1, 2, 3}, {1: True, 2: True}) == VoteResult.WON
    assert vote_result({1, 2, 3}, {1: True, 2: False}) == VoteResult.PENDING
    assert vote_result({1, 2, 3}, {1: True, 2: False, 3: False}) == VoteResult.LOST
    assert vote_result({1, 2, 3, 4}, {1: True, 2: True}) == VoteResult.PENDING
    assert vote_result({1}, {1: True}) == VoteResult.WON
    assert has_quorum({1, 2, 3}, {1, 3, 7})
    assert not has_quorum({1, 2, 3}, {1, 7})


def test_memory_storage_append_compact_snapshot() -> None:
    s = MemoryStorage()
    s.append(ents(1, 1, 2, 2, 3))
    assert (s.first_index(), s.last_index()) == (1, 5)
    s.append(ents(4, 4, start=4))  # replaces the conflicting suffix
    assert [s.term(i) for i in range(1, 6)] == [1, 1, 2, 4, 4]
    s.create_snapshot(3, ConfState(voters=frozenset({1})), b"state")
    s.compact(3)
    assert s.first_index() == 4
    assert s.term(3) == 2
    with pytest.raises(CompactedError):
        s.entries(2, 4)
    with pytest.raises(UnavailableError):
        s.term(9)
    assert [e.index for e in s.entries(4, 6)] == [4, 5]
    assert [e.index for e in s.entries(4, 6, max_size=0)] == [4]  # always at least one
    s.apply_snapshot(Snapshot(SnapshotMeta(index=10, term=7), b"new"))
    assert (s.first_index(), s.last_index(), s.term(10)) == (11, 10, 7)


def test_log_maybe_append_truncates_conflicts_but_never_committed() -> None:
    storage = MemoryStorage()
    storage.append(ents(1, 1, 2))
    log = RaftLog(storage)
    assert log.maybe_append(3, 3, 0, ()) is None  # (3, 3) does not match (3, 2)
    assert log.maybe_append(2, 1, 2, tuple(ents(3, 3, start=3))) == 4
    assert [log.term(i) for i in range(1, 5)] == [1, 1, 3, 3]
    assert log.committed == 2
    log.commit_to(4)
    with pytest.raises(LogInvariantError):
        log.maybe_append(2, 1, 4, tuple(ents(5, start=3)))


def test_log_find_conflict_by_term_skips_whole_terms() -> None:
    storage = MemoryStorage()
    storage.append(ents(1, 1, 2, 2, 2, 4, 4))
    log = RaftLog(storage)
    assert log.find_conflict_by_term(7, 3) == (5, 2)
    assert log.find_conflict_by_term(7, 4) == (7, 4)
    assert log.find_conflict_by_term(4, 1) == (2, 1)
    assert log.find_conflict_by_term(3, 0) == (0, 0)


def test_log_stable_to_ignores_entries_replaced_meanwhile() -> None:
    log = RaftLog(MemoryStorage())
    log.append(ents(1, 1))
    log.append(ents(2, start=2))  # a new leader replaced index 2 before the runtime persisted
    log.stable_to(2, 1)
    assert [e.term for e in log.unstable_entries()] == [1, 2]
    log.stable_to(2, 2)
    assert log.unstable_entries() == []


def test_log_slice_spans_storage_and_unstable_with_size_limit() -> None:
    storage = MemoryStorage()
    storage.append(ents(1, 1, 1))
    log = RaftLog(storage)
    log.append(ents(2, 2, start=4))
    assert [e.index for e in log.slice(2, 6)] == [2, 3, 4, 5]
    assert [e.index for e in log.slice(2, 6, max_size=2)] == [2, 3]
    assert log.last_index() == 5


def test_inflights_window() -> None:
    inf = Inflights(max_msgs=2, max_bytes=100)
    inf.add(3, 10)
    assert not inf.full()
    inf.add(5, 10)
    assert inf.full()
    inf.free_le(4)
    assert len(inf) == 1 and not inf.full()
    inf.add(9, 95)
    assert inf.full()  # by bytes
    inf.free_first_one()
    assert inf.bytes == 95


def test_progress_probe_and_stale_rejections() -> None:
    pr = Progress(next_index=10, max_msgs=4, max_bytes=1000)
    assert not pr.maybe_decr_to(5, 3)  # not the index we probed: stale
    assert pr.maybe_decr_to(9, 3)
    assert pr.next == 4
    assert pr.maybe_update(6)
    pr.become_replicate()
    assert (pr.state, pr.next) == (ProgressState.REPLICATE, 7)
    assert not pr.maybe_decr_to(6, 0)  # below match: stale


def test_conf_change_round_trip() -> None:
    cc = ConfChange(ConfChangeType.ADD_LEARNER, 4)
    assert ConfChange.decode(cc.encode()) == cc
