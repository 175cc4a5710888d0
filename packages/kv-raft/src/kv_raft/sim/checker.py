"""Safety invariants of Raft, checked while the simulation runs.

Each check is incremental (it looks only at what just changed) so that checking continuously costs
little more than running: the simulator calls the ``on_*`` hooks as the runtime would observe the
events, and a violation raises ``InvariantViolation`` at the first tick it becomes visible.
"""

from __future__ import annotations

from kv_raft.node import RawNode
from kv_raft.storage import StorageError
from kv_raft.types import NO_NODE, Entry, EntryType, HardState


class InvariantViolation(AssertionError):
    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


class SafetyChecker:
    def __init__(self) -> None:
        self.leader_of_term: dict[int, int] = {}
        # (index, term) -> (type, data, term of the previous entry if known): log matching.
        self._entries: dict[tuple[int, int], tuple[EntryType, bytes, int | None]] = {}
        # index -> (term, data) of the entry applied there by anyone: state machine safety.
        self.applied: dict[int, tuple[int, bytes]] = {}
        self.max_applied = 0
        self._leaders_checked: set[tuple[int, int]] = set()
        self._last_commit: dict[int, int] = {}
        self._durable_commit: dict[int, int] = {}
        self.acked: dict[int, tuple[int, bytes]] = {}
        # term -> highest index its leader committed.
        self._commit_by_term: dict[int, int] = {}
        # (node, term) -> the vote it sent out for that term.
        self._votes: dict[tuple[int, int], int] = {}

    # -- election safety and leader completeness ----------------------------------------------
    def on_leader(self, node: RawNode) -> None:
        term = node.term
        key = (node.id, term)
        if key in self._leaders_checked:
            return
        self._leaders_checked.add(key)
        other = self.leader_of_term.setdefault(term, node.id)
        if other != node.id:
            raise InvariantViolation(
                "election safety", f"nodes {other} and {node.id} both lead term {term}"
            )
        # Only what was committed in an earlier term must be there: a leader elected late (after a
        # pause, say) of an older term need not hold what a newer term committed meanwhile.
        bound = max((c for t, c in self._commit_by_term.items() if t < term), default=0)
        log = node.log
        for index in range(log.first_index(), min(bound, self.max_applied) + 1):
            term_there = log.term(index)
            expected = self.applied.get(index)
            if expected is not None and term_there != expected[0]:
                raise InvariantViolation(
                    "leader completeness",
                    f"node {node.id} leads term {term} but has term {term_there} at committed "
                    f"index {index} (applied there with term {expected[0]})",
                )

    # -- committed entries survive any future election ----------------------------------------
    def on_leader_commit(
        self,
        leader: RawNode,
        durable: dict[int, tuple[int, int, int | None]],
    ) -> None:
        """Leader completeness, checked when an entry commits instead of when it is lost.

        ``durable`` maps each node to its durable (last index, last term, term at the new commit
        index, or None if compacted away). A node whose log lacks the newly committed entry must
        be strictly behind the log of some member of every majority; otherwise it could collect a
        majority of votes and win without the entry, and the commit was premature.
        """
        commit = leader.committed
        if commit > self._commit_by_term.get(leader.term, 0):
            self._commit_by_term[leader.term] = commit
        term = leader.log.term(commit)
        if term is None:
            return
        voters = sorted(leader.voters)
        for node_id, (last_index, last_term, term_there) in durable.items():
            if term_there is None or term_there == term:
                continue  # holds it (or a snapshot covering it)
            behind = 0
            for voter in voters:
                other = durable.get(voter)
                if other is not None and (other[1], other[0]) <= (last_term, last_index):
                    behind += 1
            if behind * 2 > len(voters):
                raise InvariantViolation(
                    "leader completeness",
                    f"leader {leader.id} committed index {commit} (term {term}) in term "
                    f"{leader.term}, but node {node_id} lacks it and could win an election "
                    f"(its log ends at index {last_index} term {last_term})",
                )

    # -- log matching --------------------------------------------------------------------------
    def on_persist(self, node_id: int, entries: tuple[Entry, ...], prev_term: int | None) -> None:
        registry = self._entries
        for entry in entries:
            key = (entry.index, entry.term)
            seen = registry.get(key)
            if seen is None:
                registry[key] = (entry.type, entry.data, prev_term)
            else:
                if seen[0] != entry.type or seen[1] != entry.data:
                    raise InvariantViolation(
                        "log matching",
                        f"node {node_id} persisted a different entry at index {entry.index} "
                        f"term {entry.term}",
                    )
                if prev_term is not None and seen[2] is not None and seen[2] != prev_term:
                    raise InvariantViolation(
                        "log matching",
                        f"node {node_id}: entry ({entry.index}, {entry.term}) follows term "
                        f"{prev_term}, elsewhere term {seen[2]}",
                    )
                if seen[2] is None and prev_term is not None:
                    registry[key] = (entry.type, entry.data, prev_term)
            prev_term = entry.term

    # -- state machine safety ------------------------------------------------------------------
    def on_apply(self, node_id: int, entry: Entry) -> None:
        seen = self.applied.get(entry.index)
        if seen is None:
            self.applied[entry.index] = (entry.term, entry.data)
            if entry.index > self.max_applied:
                self.max_applied = entry.index
        elif seen != (entry.term, entry.data):
            raise InvariantViolation(
                "state machine safety",
                f"node {node_id} applied term {entry.term} at index {entry.index}, "
                f"another node applied term {seen[0]} there",
            )

    def on_ack(self, entry: Entry) -> None:
        """A client was told its write at ``entry`` succeeded."""
        self.acked[entry.index] = (entry.term, entry.data)

    # -- commit index monotonicity -------------------------------------------------------------
    def on_commit(self, node_id: int, commit: int) -> None:
        last = self._last_commit.get(node_id, 0)
        if commit < last:
            raise InvariantViolation(
                "commit monotonic", f"node {node_id} commit index went from {last} to {commit}"
            )
        self._last_commit[node_id] = commit

    def on_durable_commit(self, node_id: int, commit: int) -> None:
        last = self._durable_commit.get(node_id, 0)
        if commit < last:
            raise InvariantViolation(
                "commit monotonic",
                f"node {node_id} persisted commit index {commit} after {last}",
            )
        self._durable_commit[node_id] = commit

    def on_restart(self, node_id: int, hard_state: HardState) -> None:
        # In memory, a restarted node starts again from its durable commit index.
        self.on_durable_commit(node_id, hard_state.commit)
        self._last_commit[node_id] = hard_state.commit
        self._check_vote(node_id, hard_state, "restarted with")

    # -- one vote per term, across restarts -------------------------------------------------
    def on_hard_state_sent(self, node_id: int, hard_state: HardState) -> None:
        """The messages of a Ready carrying ``hard_state`` are leaving: its vote is cast."""
        if hard_state.vote != NO_NODE:
            self._check_vote(node_id, hard_state, "sent")
            self._votes.setdefault((node_id, hard_state.term), hard_state.vote)

    def _check_vote(self, node_id: int, hard_state: HardState, how: str) -> None:
        cast = self._votes.get((node_id, hard_state.term))
        if cast is not None and hard_state.vote not in (cast, NO_NODE):
            raise InvariantViolation(
                "one vote per term",
                f"node {node_id} {how} a vote for {hard_state.vote} in term {hard_state.term} "
                f"after voting for {cast}",
            )

    # -- PreVote never raises a term ---------------------------------------------------------
    def on_pre_vote(self, node_id: int, what: str, term_before: int, term_after: int) -> None:
        if term_after != term_before:
            raise InvariantViolation(
                "pre-vote keeps terms",
                f"node {node_id}: {what} moved its term from {term_before} to {term_after}",
            )

    # -- a follower commits only what its leader verified in its log -------------------------
    def on_follower_commit(self, follower: RawNode, leader: RawNode) -> None:
        """``follower`` just raised its commit index on a message from ``leader`` (same term).

        Every entry up to the follower's commit index must be the leader's: the follower may
        commit only a prefix that an APPEND of this leader matched (or a snapshot covered).
        """
        commit = follower.committed
        if commit > leader.log.last_index():
            raise InvariantViolation(
                "follower commit",
                f"node {follower.id} committed {commit}, beyond leader {leader.id}'s last index "
                f"{leader.log.last_index()}",
            )
        mine = follower.log.term(commit)
        theirs = leader.log.term(commit)
        if mine is not None and theirs is not None and mine != theirs:
            raise InvariantViolation(
                "follower commit",
                f"node {follower.id} committed index {commit} holding term {mine}, but leader "
                f"{leader.id} of term {leader.term} has term {theirs} there",
            )

    # -- acknowledged writes -------------------------------------------------------------------
    def check_acked_writes_kept(self, node: RawNode) -> None:
        """Every write a client saw succeed is still in ``node``'s log (or its snapshot)."""
        log = node.log
        first = log.first_index()
        for index, (term, _) in self.acked.items():
            if index < first:
                continue
            try:
                term_there = log.term(index)
            except StorageError:  # pragma: no cover - term() already maps these to None
                term_there = None
            if term_there != term:
                raise InvariantViolation(
                    "acknowledged write lost",
                    f"write acknowledged at index {index} term {term} is missing from node "
                    f"{node.id} (term there: {term_there})",
                )
