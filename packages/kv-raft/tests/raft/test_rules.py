"""Rules that fault injection reaches only rarely, driven directly, one message at a time."""

from __future__ import annotations

import random

import pytest

from kv_raft.node import ProposalDropped, RawNode
from kv_raft.sim.lockstep import LockstepCluster
from kv_raft.storage import MemoryStorage
from kv_raft.types import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Role,
)

VOTERS = ConfState(voters=frozenset({1, 2, 3}))


def node_with(entries: list[Entry], hard_state: HardState, *, pre_vote: bool = True) -> RawNode:
    storage = MemoryStorage(VOTERS)
    storage.append(entries)
    storage.set_hard_state(hard_state)
    return RawNode(Config(id=2, rng=random.Random(1), pre_vote=pre_vote), storage)


def test_read_state_carries_the_commit_index_of_the_request() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    leader.propose(b"w")
    c.stabilize()
    c.tick(1)
    at_request = leader.committed
    assert leader.log.term(at_request) == leader.term
    leader.read_index(b"r")
    leader.propose(b"later")
    c.process_ready(1)
    # The new entry commits before the read's heartbeat round completes.
    sent = list(c.queue)
    c.queue.clear()
    c.queue.extend(m for m in sent if m.type != MessageType.HEARTBEAT)
    c.queue.extend(m for m in sent if m.type == MessageType.HEARTBEAT)
    c.stabilize()
    [rs] = c.read_states[1]
    assert (rs.request_id, rs.index) == (b"r", at_request)
    assert leader.committed == at_request + 1


def test_read_state_index_covers_every_acknowledged_write() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    index = leader.propose(b"acked")
    c.stabilize()
    assert c.data_applied(1)[-1] == b"acked"
    leader.read_index(b"r")
    c.stabilize()
    assert c.read_states[1][-1].index >= index


def test_append_inside_a_matching_prefix_keeps_the_tail_and_commits_only_the_prefix() -> None:
    """A delayed APPEND covers 2..3, which match; 4..5 beyond (term 2) may still be replaced."""
    log = [Entry(1, 2), Entry(1, 3), Entry(2, 4, data=b"maybe"), Entry(2, 5, data=b"stale")]
    node = node_with(log, HardState(term=3, vote=0, commit=1))
    append = Message(
        MessageType.APPEND,
        to=2,
        frm=1,
        term=3,
        index=1,
        log_term=1,
        entries=(Entry(1, 2), Entry(1, 3)),
        commit=5,
    )
    node.step(append)
    assert node.log.last_index() == 5  # nothing truncated: the entries matched
    assert node.committed == 3  # not 5: only 2..3 were verified against the leader's log
    [reply] = node.ready().messages
    assert (reply.type, reply.index, reply.reject) == (MessageType.APPEND_RESP, 3, False)


def test_append_with_a_different_tail_truncates_only_from_the_conflict() -> None:
    log = [Entry(1, 2), Entry(2, 3, data=b"old"), Entry(2, 4, data=b"old")]
    node = node_with(log, HardState(term=3, vote=0, commit=2))
    append = Message(
        MessageType.APPEND,
        to=2,
        frm=1,
        term=3,
        index=2,
        log_term=1,
        entries=(Entry(3, 3, data=b"new"),),
        commit=3,
    )
    node.step(append)
    assert node.log.last_index() == 3
    assert node.log.term(3) == 3
    assert node.committed == 3


def test_a_new_leader_proposes_no_conf_change_before_applying_its_log() -> None:
    c = LockstepCluster(3, async_apply=True)  # nothing is applied until applied_to is called
    c.elect(1).propose(b"a")
    c.stabilize()
    c.nodes[1].transfer_leadership(2)
    c.stabilize()
    leader = c.nodes[2]
    assert role_of(leader) == Role.LEADER
    earlier = leader.log.last_index() - 1  # the last entry before this term's empty one
    assert leader.applied < earlier
    with pytest.raises(ProposalDropped, match="not applied yet"):
        leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 3))
    leader.applied_to(earlier)
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 3))


def test_a_conf_change_takes_effect_when_applied_not_when_handed_out() -> None:
    c = LockstepCluster(3, async_apply=True)
    leader = c.elect(1)
    c.tick(1)
    leader.applied_to(leader.committed)
    index = leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 3))
    c.stabilize()
    c.tick(1)
    follower = c.nodes[2]
    assert follower.committed >= index and follower.log.applying >= index
    assert follower.voters == {1, 2, 3}
    # Committed but unapplied configuration: the follower must not campaign on the old one.
    follower.campaign()
    assert role_of(follower) == Role.FOLLOWER
    follower.applied_to(index)
    assert follower.voters == {1, 2}
    follower.campaign()
    assert role_of(follower) != Role.FOLLOWER


def test_applied_to_beyond_what_was_handed_out_is_refused() -> None:
    c = LockstepCluster(3, async_apply=True)
    leader = c.elect(1)
    with pytest.raises(ValueError, match="beyond the entries handed out"):
        leader.applied_to(leader.log.applying + 1)


def role_of(node: RawNode) -> Role:
    return node.role


def test_a_vote_alone_must_be_synced() -> None:
    """Same term, no new entries: only the vote changes, and it must still be fsynced."""
    node = node_with([], HardState(term=2, vote=0, commit=1))
    node.step(Message(MessageType.VOTE, to=2, frm=1, term=2, index=1, log_term=1))
    rd = node.ready()
    assert rd.hard_state == HardState(term=2, vote=1, commit=1)
    assert rd.must_sync
    assert [(m.type, m.reject) for m in rd.messages] == [(MessageType.VOTE_RESP, False)]


def test_a_repeated_request_from_the_same_candidate_is_granted_again() -> None:
    node = node_with([], HardState(term=2, vote=1, commit=1))
    node.step(Message(MessageType.VOTE, to=2, frm=1, term=2, index=1, log_term=1))
    node.step(Message(MessageType.VOTE, to=2, frm=3, term=2, index=1, log_term=1))
    rd = node.ready()
    assert [(m.to, m.reject) for m in rd.messages] == [(1, False), (3, True)]
    assert rd.hard_state is None  # the vote was already durable: nothing new to persist
    assert node.vote == 1


def test_a_rejected_candidate_does_not_reset_the_election_timer() -> None:
    node = node_with([Entry(2, 2)], HardState(term=2, vote=0, commit=1), pre_vote=False)
    for _ in range(4):
        node.tick()
    assert node.election_elapsed == 4
    behind = Message(MessageType.VOTE, to=2, frm=3, term=5, index=1, log_term=1)
    node.step(behind)
    assert node.term == 5
    assert node.election_elapsed == 4
    [reply] = node.ready().messages
    assert reply.reject
    granted = Message(MessageType.VOTE, to=2, frm=1, term=6, index=2, log_term=2)
    node.step(granted)
    assert node.election_elapsed == 0


def test_conf_change_entries_are_replayed_on_restart_up_to_applied() -> None:
    storage = MemoryStorage(VOTERS)
    remove = Entry(2, 2, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.REMOVE_NODE, 3).encode())
    storage.append([remove])
    storage.set_hard_state(HardState(term=2, vote=0, commit=2))
    assert RawNode(Config(id=1, rng=random.Random(1), applied=2), storage).voters == {1, 2}
    assert RawNode(Config(id=1, rng=random.Random(1), applied=1), storage).voters == {1, 2, 3}


def test_heartbeat_commit_is_capped_at_what_the_follower_is_known_to_hold() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    c.tick(1)
    c.isolate(3)
    for i in range(3):
        leader.propose(b"p%d" % i)
    c.stabilize()
    c.tick(1)
    heartbeats = [m for m in c.sent if m.type == MessageType.HEARTBEAT and m.to == 3]
    assert leader.committed > leader.prs[3].match
    assert heartbeats[-1].commit == leader.prs[3].match
    to_2 = [m for m in c.sent if m.type == MessageType.HEARTBEAT and m.to == 2]
    assert to_2[-1].commit == leader.committed


def test_a_candidate_of_an_older_term_is_told_the_newer_one() -> None:
    """Dropping the request, as etcd does, can leave a voter campaigning in old terms forever."""
    voter = node_with([], HardState(term=5, vote=0, commit=1), pre_vote=False)
    voter.step(Message(MessageType.VOTE, to=2, frm=1, term=3, index=1, log_term=1))
    [reply] = voter.ready().messages
    assert (reply.type, reply.term, reply.reject) == (MessageType.VOTE_RESP, 5, True)
    storage = MemoryStorage(VOTERS)
    candidate = RawNode(Config(id=1, rng=random.Random(1), pre_vote=False), storage)
    candidate.campaign()
    candidate.tick()
    elapsed = candidate.election_elapsed
    candidate.step(Message(MessageType.VOTE_RESP, to=1, frm=2, term=5, reject=True))
    assert (candidate.term, role_of(candidate)) == (5, Role.FOLLOWER)
    assert candidate.election_elapsed == elapsed  # tries again after its timeout, not a new one
