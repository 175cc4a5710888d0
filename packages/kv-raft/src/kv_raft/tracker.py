"""Who votes, who only learns, how far each member has replicated, and the votes of an election.

The leader's view of its followers and the candidate's tally live here, as in etcd's
``tracker.ProgressTracker``, so that the protocol rules ask questions ("what index does a quorum
hold?", "has a quorum been active?", "is the election won?") instead of counting by hand.
"""

from __future__ import annotations

from collections.abc import Iterable

from kv_raft.progress import Progress
from kv_raft.quorum import VoteResult, has_quorum, quorum_index, vote_result
from kv_raft.types import ConfChange, ConfChangeType, ConfState


class ProgressTracker:
    def __init__(
        self, conf_state: ConfState, max_inflight_msgs: int, max_inflight_bytes: int
    ) -> None:
        self.voters: set[int] = set(conf_state.voters)
        self.learners: set[int] = set(conf_state.learners)
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self._max_msgs = max_inflight_msgs
        self._max_bytes = max_inflight_bytes

    # -- membership ------------------------------------------------------------------------------
    @property
    def conf_state(self) -> ConfState:
        return ConfState(frozenset(self.voters), frozenset(self.learners))

    def is_member(self, node: int) -> bool:
        return node in self.voters or node in self.learners

    def restore(self, conf_state: ConfState) -> None:
        self.voters = set(conf_state.voters)
        self.learners = set(conf_state.learners)

    def change(self, cc: ConfChange) -> None:
        """One server at a time: any majority before overlaps any majority after."""
        node = cc.node_id
        if cc.type == ConfChangeType.ADD_NODE:
            self.learners.discard(node)
            self.voters.add(node)
        elif cc.type == ConfChangeType.ADD_LEARNER:
            if node not in self.voters:
                self.learners.add(node)
        else:
            self.voters.discard(node)
            self.learners.discard(node)

    # -- progress --------------------------------------------------------------------------------
    def new_progress(self, next_index: int, *, is_learner: bool = False) -> Progress:
        return Progress(next_index, self._max_msgs, self._max_bytes, is_learner=is_learner)

    def reset_progress(self, self_id: int, last_index: int) -> None:
        """Fresh progress for every member: all are probed from our last index onwards."""
        self.progress = {}
        for node in self.voters | self.learners:
            pr = self.new_progress(last_index + 1, is_learner=node in self.learners)
            if node == self_id:
                pr.match = last_index
            self.progress[node] = pr

    def sync_progress(self, node: int, last_index: int) -> None:
        """After a membership change: track a new member, update a promoted one, drop a gone one."""
        if self.is_member(node):
            pr = self.progress.get(node)
            if pr is None:
                pr = self.progress[node] = self.new_progress(last_index + 1)
            pr.is_learner = node in self.learners
        else:
            self.progress.pop(node, None)

    def committed(self) -> int:
        """The largest index a quorum of voters hold."""
        progress = self.progress
        # committed_index's rule, without building its map of matches.
        return quorum_index([progress[v].match if v in progress else 0 for v in self.voters])

    def quorum_active(self, self_id: int) -> bool:
        """Has a quorum been heard from since the last call? (CheckQuorum; clears the marks.)"""
        active = {self_id}
        for node, pr in self.progress.items():
            if node != self_id:
                if pr.recent_active:
                    active.add(node)
                pr.recent_active = False
        return has_quorum(self.voters, active)

    def is_quorum(self, members: Iterable[int]) -> bool:
        return has_quorum(self.voters, members)

    # -- elections -------------------------------------------------------------------------------
    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, node: int, granted: bool) -> None:
        """Only a voter's first answer counts (a duplicate cannot flip it)."""
        self.votes.setdefault(node, granted)

    def tally_votes(self) -> VoteResult:
        return vote_result(self.voters, self.votes)
