"""Behaviour of the Raft core, one rule per test, on a fault-free lockstep cluster."""

from __future__ import annotations

import random

import pytest

from kv_raft.node import NotLeader, ProposalDropped, RawNode
from kv_raft.progress import ProgressState
from kv_raft.sim.lockstep import LockstepCluster
from kv_raft.storage import MemoryStorage
from kv_raft.types import (
    NO_NODE,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    HardState,
    Message,
    MessageType,
    Role,
    Snapshot,
    SnapshotMeta,
)


def role_of(node: RawNode) -> Role:
    """Read the role through a call, so that mypy does not narrow it across steps."""
    return node.role


def test_a_leader_is_elected_by_ticking_alone() -> None:
    c = LockstepCluster(3)
    c.tick(40)
    assert len(c.leaders()) == 1
    leader = c.nodes[c.leaders()[0]]
    assert all(n.leader == leader.id and n.term == leader.term for n in c.nodes.values())


def test_proposal_commits_and_applies_everywhere_in_order() -> None:
    c = LockstepCluster(5)
    leader = c.elect(1)
    for i in range(10):
        leader.propose(f"v{i}".encode())
    c.stabilize()
    c.tick(2)  # heartbeats carry the final commit index to followers
    expected = [f"v{i}".encode() for i in range(10)]
    for node_id in c.ids:
        assert c.data_applied(node_id) == expected


def test_follower_reports_the_leader_instead_of_dropping_a_proposal() -> None:
    c = LockstepCluster(3)
    c.elect(2)
    with pytest.raises(NotLeader) as err:
        c.nodes[1].propose(b"x")
    assert err.value.leader == 2
    with pytest.raises(NotLeader):
        c.nodes[3].read_index(b"r1")


def test_vote_is_in_the_same_ready_as_the_vote_response() -> None:
    """Persist-before-send: the Ready that carries a grant also carries the vote to persist."""
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    node = RawNode(Config(id=2, rng=random.Random(1)), storage)
    node.step(Message(MessageType.VOTE, to=2, frm=1, term=2, index=1, log_term=1))
    rd = node.ready()
    assert rd.hard_state == HardState(term=2, vote=1, commit=1)
    assert rd.must_sync
    assert [(m.type, m.reject) for m in rd.messages] == [(MessageType.VOTE_RESP, False)]


def test_a_node_votes_once_per_term_even_after_restart() -> None:
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    node = RawNode(Config(id=2, rng=random.Random(1)), storage)
    node.step(Message(MessageType.VOTE, to=2, frm=1, term=2, index=1, log_term=1))
    rd = node.ready()
    assert rd.hard_state is not None
    storage.set_hard_state(rd.hard_state)
    restarted = RawNode(Config(id=2, rng=random.Random(1)), storage)
    restarted.step(Message(MessageType.VOTE, to=2, frm=3, term=2, index=1, log_term=1))
    assert [m.reject for m in restarted.ready().messages] == [True]


def test_stale_vote_grants_are_not_counted() -> None:
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    node = RawNode(Config(id=1, rng=random.Random(1), pre_vote=False), storage)
    node.campaign()
    node.ready()
    node.campaign()  # a second election: term 3
    assert node.term == 3 and node.role == Role.CANDIDATE
    node.step(Message(MessageType.VOTE_RESP, to=1, frm=2, term=2))
    assert role_of(node) == Role.CANDIDATE
    node.step(Message(MessageType.VOTE_RESP, to=1, frm=2, term=3))
    assert role_of(node) == Role.LEADER


def test_candidate_with_stale_log_loses() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    leader.propose(b"x")
    c.stabilize()
    c.heal()
    c.nodes[3].campaign()  # pre-vote fails: its log is behind
    c.stabilize()
    assert c.leaders() == [1]
    assert c.nodes[3].term == leader.term


def test_pre_vote_keeps_a_partitioned_node_from_inflating_terms() -> None:
    c = LockstepCluster(3)
    c.elect(1)
    term = c.nodes[1].term
    c.isolate(3)
    c.tick(100)
    assert c.nodes[3].term == term
    c.heal()
    c.tick(5)
    assert c.leaders() == [1] and c.nodes[1].term == term


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    c = LockstepCluster(3)
    c.elect(1)
    c.isolate(1)
    c.tick(25)
    assert c.nodes[1].role == Role.FOLLOWER
    assert sorted(c.leaders()) in ([2], [3])


def test_leader_lease_ignores_disruptive_vote_requests() -> None:
    c = LockstepCluster(3)
    c.elect(1)
    term = c.nodes[1].term
    c.nodes[2].step(Message(MessageType.VOTE, to=2, frm=3, term=term + 1, index=99, log_term=99))
    assert c.nodes[2].term == term


def test_commit_only_counts_entries_of_the_current_term() -> None:
    """Raft §5.4.2 (Figure 8): an old-term entry on a majority is not committed by counting."""
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    storage.append([Entry(term=1, index=2), Entry(term=2, index=3, data=b"old")])
    storage.set_hard_state(HardState(term=3, vote=0, commit=2))
    node = RawNode(Config(id=1, rng=random.Random(1), pre_vote=False), storage)
    node.campaign()
    node.step(Message(MessageType.VOTE_RESP, to=1, frm=2, term=4))
    assert node.role == Role.LEADER
    node.ready()
    # Follower 2 acknowledges index 2 (the old entry) but not yet the new leader's empty entry.
    node.step(Message(MessageType.APPEND_RESP, to=1, frm=2, term=4, index=3))
    assert node.committed == 2
    node.step(Message(MessageType.APPEND_RESP, to=1, frm=2, term=4, index=4))
    assert node.committed == 4


def test_fast_backoff_converges_in_few_round_trips() -> None:
    c = LockstepCluster(3, pre_vote=False)
    old = c.elect(3)
    c.isolate(3)
    # Node 3 leads alone for a while: a long tail of its own term that nobody else has.
    for i in range(50):
        old.propose(f"lost{i}".encode())
    c.stabilize()
    c.tick(30)  # the majority side elects a leader of its own once node 3's lease runs out
    (leader_id,) = c.leaders()
    assert leader_id != 3
    leader = c.nodes[leader_id]
    # ... and writes a longer log of its own, so that its first probe lands beyond node 3's
    # tail and every index of that tail disagrees in term.
    for i in range(60):
        leader.propose(f"kept{i}".encode())
    c.stabilize()
    # A fresh leader knows nothing of node 3, so it starts probing at its own last index.
    leader.transfer_leadership(3 - leader_id)
    c.stabilize()
    leader_id = 3 - leader_id
    leader = c.nodes[leader_id]
    assert c.leaders() == [leader_id]
    assert c.nodes[3].log.last_index() < leader.log.last_index()
    c.heal()
    c.tick(2)
    c.stabilize()
    rejections = [m for m in c.sent if m.type == MessageType.APPEND_RESP and m.reject]
    # The divergent tail was really found and backed over, in a few round trips, not 50.
    assert 1 <= len(rejections) <= 4, len(rejections)
    c.tick(30)
    assert c.leaders() == [leader_id]
    assert c.nodes[3].log.last_index() == leader.log.last_index()
    assert c.data_applied(3) == c.data_applied(leader_id)
    assert not any(d.startswith(b"lost") for d in c.data_applied(3))


def test_flow_control_bounds_inflight_appends() -> None:
    c = LockstepCluster(3, max_inflight_msgs=3, max_size_per_msg=1)
    leader = c.elect(1)
    c.tick(1)
    c.isolate(3)
    mark = len(c.sent)
    for i in range(20):
        leader.propose(f"p{i}".encode())
    c.stabilize()
    to3 = [m for m in c.sent[mark:] if m.to == 3 and m.type == MessageType.APPEND and m.entries]
    # Twenty proposals, one entry per message, the follower silent: exactly the window is sent.
    assert len(to3) == 3, len(to3)
    assert leader.prs[3].inflights.full()


def test_read_index_needs_a_quorum_round() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    c.tick(1)
    leader.read_index(b"r1")
    c.stabilize()
    assert [rs.request_id for rs in c.read_states[1]] == [b"r1"]
    assert c.read_states[1][0].index == leader.committed
    c.isolate(1)
    leader.read_index(b"r2")
    c.stabilize()
    assert [rs.request_id for rs in c.read_states[1]] == [b"r1"]


def test_read_index_waits_for_an_entry_of_the_leaders_term() -> None:
    c = LockstepCluster(3)
    leader = c.nodes[1]
    leader.campaign()
    c.process_ready(1)
    # Votes arrive, leadership is won, but nothing from this term has committed yet.
    while c.queue and leader.role != Role.LEADER:
        m = c.queue.popleft()
        c.nodes[m.to].step(m)
        c.process_ready(m.to)
    assert leader.role == Role.LEADER
    leader.read_index(b"early")
    c.process_ready(1)
    assert c.read_states[1] == []
    c.stabilize()
    c.tick(1)
    assert [rs.request_id for rs in c.read_states[1]] == [b"early"]


def test_leadership_transfer() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    leader.propose(b"x")
    c.stabilize()
    leader.transfer_leadership(3)
    c.stabilize()
    assert c.leaders() == [3]
    assert c.nodes[1].role == Role.FOLLOWER
    with pytest.raises(ValueError, match="cannot transfer"):
        c.nodes[3].transfer_leadership(9)


def test_proposals_are_refused_during_transfer() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    leader.transfer_leadership(3)
    with pytest.raises(ProposalDropped):
        leader.propose(b"x")
    c.tick(25)  # the transfer times out after an election timeout
    c.heal()
    c.tick(2)
    # The transfer was abandoned: node 1 still leads and takes proposals again.
    assert c.leaders() == [1]
    index = leader.log.last_index()
    leader.propose(b"after the transfer timed out")
    assert leader.log.last_index() == index + 1


def test_lagging_follower_catches_up_by_snapshot() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    for i in range(30):
        leader.propose(f"s{i}".encode())
    c.stabilize()
    storage = c.storages[1]
    applied = leader.applied
    storage.create_snapshot(applied, leader.conf_state, b"state@%d" % applied)
    storage.compact(applied)
    c.heal()
    c.tick(3)
    assert any(m.type == MessageType.SNAPSHOT and m.to == 3 for m in c.sent)
    assert c.storages[3].snapshot().data == b"state@%d" % applied
    assert c.nodes[3].log.last_index() == leader.log.last_index()
    leader.propose(b"after")
    c.stabilize()
    c.tick(1)
    assert c.data_applied(3)[-1] == b"after"


def test_membership_learner_catches_up_then_is_promoted_then_removed() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    for i in range(5):
        leader.propose(f"m{i}".encode())
    c.stabilize()
    c.add_node(4)
    with pytest.raises(ProposalDropped):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))  # not a learner yet
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ProposalDropped):  # one change at a time
        leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2))
    c.stabilize()
    c.tick(3)
    assert 4 in leader.learners
    assert leader.prs[4].match == leader.log.last_index()
    assert c.nodes[4].learners == {4}
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))
    c.stabilize()
    c.tick(2)
    assert leader.voters == {1, 2, 3, 4}
    assert c.nodes[4].voters == {1, 2, 3, 4}
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2))
    c.stabilize()
    c.tick(2)
    assert leader.voters == {1, 3, 4}
    assert 2 not in leader.prs


def test_removed_leader_steps_down() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    c.stabilize()
    assert leader.role == Role.FOLLOWER and not leader.promotable
    c.tick(40)
    assert len(c.leaders()) == 1 and c.leaders()[0] in (2, 3)


def test_restart_recovers_log_and_commit() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    leader.propose(b"durable")
    c.stabilize()
    c.tick(1)
    committed = c.nodes[2].committed
    restarted = c.start(2)
    assert restarted.committed == committed
    assert restarted.term == leader.term
    assert restarted.leader == NO_NODE
    c.stabilize()


def test_progress_enters_replicate_after_first_ack() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    c.tick(1)
    assert leader.prs[2].state == ProgressState.REPLICATE


def test_snapshot_reply_carries_the_commit_index_after_the_restore() -> None:
    """A follower that already holds the snapshot's last entry answers with the snapshot index,
    so the leader leaves SNAPSHOT state at once instead of waiting for the snapshot timeout."""
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    storage.append([Entry(term=1, index=2), Entry(term=1, index=3)])
    storage.set_hard_state(HardState(term=1, vote=0, commit=1))
    node = RawNode(Config(id=2, rng=random.Random(1)), storage)
    snapshot = Snapshot(SnapshotMeta(index=3, term=1, conf_state=node.conf_state))
    node.step(Message(MessageType.SNAPSHOT, to=2, frm=1, term=1, snapshot=snapshot))
    [reply] = node.ready().messages
    assert (reply.type, reply.index, reply.reject) == (MessageType.APPEND_RESP, 3, False)


def test_leader_leaves_snapshot_state_on_the_reply() -> None:
    c = LockstepCluster(3)
    leader = c.elect(1)
    c.isolate(3)
    for i in range(10):
        leader.propose(f"s{i}".encode())
    c.stabilize()
    c.storages[1].create_snapshot(leader.applied, leader.conf_state, b"state")
    c.storages[1].compact(leader.applied)
    c.heal()
    c.tick(2)
    assert leader.prs[3].state == ProgressState.REPLICATE
    assert leader.prs[3].match == leader.log.last_index()


def test_applied_beyond_the_durable_commit_is_refused() -> None:
    storage = MemoryStorage(ConfState(voters=frozenset({1, 2, 3})))
    storage.append([Entry(term=1, index=2), Entry(term=1, index=3)])
    storage.set_hard_state(HardState(term=1, vote=0, commit=2))
    with pytest.raises(ValueError, match="beyond the durable commit index 2"):
        RawNode(Config(id=1, rng=random.Random(1), applied=3), storage)
    assert RawNode(Config(id=1, rng=random.Random(1), applied=2), storage).applied == 2
