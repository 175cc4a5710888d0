"""The simulator's newer parts on their own: the disk, and the checks that run as events happen."""

from __future__ import annotations

import random

import pytest

from kv_raft.sim.checker import InvariantViolation, SafetyChecker
from kv_raft.sim.disk import Fate, SimDisk
from kv_raft.sim.kvstore import Command
from kv_raft.sim.lockstep import LockstepCluster
from kv_raft.sim.statecheck import StateChecker
from kv_raft.storage import MemoryStorage
from kv_raft.types import ConfState, Entry, HardState

VOTERS = ConfState(voters=frozenset({1, 2, 3}))


def entries(first: int, last: int, term: int = 1) -> tuple[Entry, ...]:
    return tuple(Entry(term, i, data=b"e%d" % i) for i in range(first, last + 1))


def fates_seen(setup_and_crash: int = 200) -> dict[Fate, list[int]]:
    """Crash after one synced write and two unsynced ones; collect the last index per fate."""
    seen: dict[Fate, list[int]] = {}
    for seed in range(setup_and_crash):
        disk = SimDisk(MemoryStorage(VOTERS))
        disk.append(entries(2, 3))
        disk.sync()
        disk.append(entries(4, 7))
        disk.set_hard_state(HardState(term=1, vote=2, commit=3))
        fate = disk.crash(random.Random(seed))
        seen.setdefault(fate, []).append(disk.live.last_index())
        if fate != Fate.KEPT:
            assert disk.live.hard_state == HardState(term=1, commit=1)
    return seen


def test_a_crash_keeps_synced_writes_and_all_some_or_none_of_the_rest() -> None:
    seen = fates_seen()
    assert set(seen) == {Fate.LOST, Fate.PREFIX, Fate.KEPT}
    assert set(seen[Fate.LOST]) == {3}
    assert set(seen[Fate.KEPT]) == {7}
    assert set(seen[Fate.PREFIX]) <= {3, 4, 5, 6, 7} and len(set(seen[Fate.PREFIX])) > 2


def test_writes_are_readable_before_sync_and_nothing_pending_survives_whole() -> None:
    disk = SimDisk(MemoryStorage(VOTERS))
    disk.append(entries(2, 4))
    assert disk.live.last_index() == 4 and disk.synced.last_index() == 1
    assert disk.dirty
    disk.sync()
    assert disk.crash(random.Random(0)) == Fate.NOTHING_PENDING
    assert disk.live.last_index() == 4


def test_one_vote_per_term_across_restarts() -> None:
    checker = SafetyChecker()
    checker.on_hard_state_sent(2, HardState(term=4, vote=1, commit=1))
    checker.on_hard_state_sent(2, HardState(term=4, vote=1, commit=2))
    checker.on_restart(2, HardState(term=4, vote=0, commit=2))  # forgot it: caught if it acts
    with pytest.raises(InvariantViolation, match="one vote per term"):
        checker.on_hard_state_sent(2, HardState(term=4, vote=3, commit=2))
    with pytest.raises(InvariantViolation, match="one vote per term"):
        checker.on_restart(2, HardState(term=4, vote=3, commit=2))


def test_pre_vote_must_not_move_terms() -> None:
    checker = SafetyChecker()
    checker.on_pre_vote(1, "a PRE_VOTE from 2", 3, 3)
    with pytest.raises(InvariantViolation, match="pre-vote keeps terms"):
        checker.on_pre_vote(1, "a PRE_VOTE from 2", 3, 4)


def test_follower_commit_must_be_the_leaders_prefix() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    leader.propose(b"x")
    c.stabilize()
    c.tick(1)
    follower = c.nodes[2]
    checker = SafetyChecker()
    checker.on_follower_commit(follower, leader)
    # The follower's entry at its commit index is replaced behind the checker's back.
    follower.log.unstable.entries = [Entry(99, follower.committed)]
    follower.log.unstable.offset = follower.committed
    with pytest.raises(InvariantViolation, match="follower commit"):
        checker.on_follower_commit(follower, leader)


def put(op_id: str, value: str) -> bytes:
    return Command(op_id, "put", "k", value, None).encode()


def test_snapshot_must_equal_the_state_machine_at_its_index() -> None:
    states = StateChecker()
    states.on_apply(Entry(1, 2, data=put("c1.1", "a")))
    states.on_apply(Entry(1, 3, data=put("c1.2", "b")))
    states.on_snapshot(1, 2, b'{"k":"a"}', "took")
    states.on_snapshot(1, 3, b'{"k":"b"}', "took")
    with pytest.raises(InvariantViolation, match="snapshot contents"):
        states.on_snapshot(2, 3, b'{"k":"a"}', "installed")


def test_reference_state_waits_for_a_gap_to_fill() -> None:
    states = StateChecker()
    states.on_apply(Entry(1, 3, data=put("c1.2", "b")))
    states.on_snapshot(1, 3, b'{"k":"wrong"}', "took")  # index 2 unknown yet: cannot judge
    states.on_apply(Entry(1, 2, data=put("c1.1", "a")))
    with pytest.raises(InvariantViolation, match="snapshot contents"):
        states.on_snapshot(1, 3, b'{"k":"wrong"}', "took")


def test_a_read_after_an_acknowledged_write_must_see_it() -> None:
    states = StateChecker()
    states.on_apply(Entry(1, 2, data=put("c1.1", "a")))
    states.on_apply(Entry(1, 3, data=put("c1.2", "b")))
    early = states.read_floor("k")
    states.on_write_acked("k", 3)
    late = states.read_floor("k")
    states.on_read(1, "k", "a", early)  # started before the ack: may be old
    with pytest.raises(InvariantViolation, match="stale read"):
        states.on_read(1, "k", "a", late)
    with pytest.raises(InvariantViolation, match="stale read"):
        states.on_read(1, "k", None, late)
    states.on_read(1, "k", "b", late)


def test_a_read_must_not_go_back_before_what_another_read_returned() -> None:
    states = StateChecker()
    states.on_apply(Entry(1, 2, data=put("c1.1", "a")))
    states.on_read(1, "k", "a", states.read_floor("k"))  # a write not yet acknowledged, seen
    with pytest.raises(InvariantViolation, match="stale read"):
        states.on_read(2, "k", None, states.read_floor("k"))
