"""The Raft protocol rules: every state transition of the core lives in this file.

``Raft`` reacts to ticks, messages and requests by changing its state and queueing messages and
read states; ``RawNode`` (``kv_raft.node``) turns that into Ready batches for the runtime. It reads
durable state through ``Storage`` and never writes it. Rules follow the Raft paper and thesis;
where they leave a choice, the choice made by etcd's raft is taken (PreVote, CheckQuorum with
leader lease on votes, fast back-off by term, progress states).
"""

from __future__ import annotations

from kv_raft.faults import Bug
from kv_raft.log import RaftLog
from kv_raft.progress import Progress, ProgressState
from kv_raft.quorum import VoteResult
from kv_raft.storage import CompactedError, Storage
from kv_raft.tracker import ProgressTracker
from kv_raft.types import (
    CAMPAIGN_TRANSFER,
    NO_NODE,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Role,
    Snapshot,
    SoftState,
    entry_size,
)


class ProposalDropped(Exception):
    """The proposal was not appended; it had no effect and may be retried."""


class NotLeader(ProposalDropped):
    """Sent to a non-leader; ``leader`` is who this node believes leads (NO_NODE if unknown)."""

    def __init__(self, leader: int) -> None:
        super().__init__(f"not the leader; leader is {leader or 'unknown'}")
        self.leader = leader


class Raft:
    def __init__(self, config: Config, storage: Storage) -> None:
        config.validate()
        self.id = config.id
        self._cfg = config
        self._rng = config.rng
        bugs = config.bugs
        self._bug_stale_votes = Bug.COUNT_STALE_VOTES in bugs
        self._bug_commit_previous_term = Bug.COMMIT_PREVIOUS_TERM in bugs
        self._bug_forget_vote = Bug.FORGET_VOTE_PERSIST in bugs
        self._bug_skip_log_match = Bug.SKIP_LOG_MATCH_CHECK in bugs
        self._bug_read_no_confirm = Bug.READ_INDEX_NO_CONFIRM in bugs
        self._bug_read_before_term_commit = Bug.READ_BEFORE_TERM_COMMIT in bugs
        self._bug_conf_while_pending = Bug.CONF_CHANGE_WHILE_PENDING in bugs
        self._bug_uncapped_heartbeat = Bug.HEARTBEAT_COMMIT_UNCAPPED in bugs
        self._bug_snapshot_forever = Bug.SNAPSHOT_NEVER_RETRIED in bugs
        self.log = RaftLog(storage)
        hard_state, conf_state = storage.initial_state()
        self.term = hard_state.term
        self.vote = hard_state.vote
        self.log.commit_to(hard_state.commit)
        self.trk = ProgressTracker(conf_state, config.max_inflight_msgs, config.max_inflight_bytes)
        if config.applied > self.log.committed:
            # The state machine holds entries the log says are not committed: the runtime lost
            # data it had reported durable. Going on would apply other entries over them.
            raise ValueError(
                f"Config.applied {config.applied} is beyond the durable commit index "
                f"{self.log.committed}: storage lost acknowledged state"
            )
        if config.applied > self.log.applied:
            applied = config.applied
            # The stored ConfState is as of the snapshot; replay the configuration changes that
            # the application applied after it, before the restart.
            start = max(storage.snapshot().meta.index, self.log.applied) + 1
            for entry in self.log.slice(start, applied + 1):
                if entry.type == EntryType.CONF_CHANGE:
                    self.trk.change(ConfChange.decode(entry.data))
            self.log.applying_to(applied)
            self.log.applied_to(applied)

        self.role = Role.FOLLOWER
        self.lead = NO_NODE
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self._reads_before_commit: list[bytes] = []
        self._read_queue: list[bytes] = []
        self._read_acks: dict[bytes, tuple[int, set[int]]] = {}
        self.lead_transferee = NO_NODE
        self.pending_conf_index = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self._become_follower(self.term, NO_NODE)

    # ------------------------------------------------------------------------------------------
    # Introspection
    @property
    def leader(self) -> int:
        return self.lead

    @property
    def committed(self) -> int:
        return self.log.committed

    @property
    def applied(self) -> int:
        return self.log.applied

    @property
    def voters(self) -> set[int]:
        return self.trk.voters

    @property
    def learners(self) -> set[int]:
        return self.trk.learners

    @property
    def prs(self) -> dict[int, Progress]:
        return self.trk.progress

    @property
    def conf_state(self) -> ConfState:
        return self.trk.conf_state

    @property
    def promotable(self) -> bool:
        return self.id in self.trk.voters

    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def hard_state(self) -> HardState:
        return HardState(self.term, self._persisted_vote(), self.log.committed)

    def hard_state_is(self, hard: HardState) -> bool:
        """``hard_state() == hard``, without building one (checked for every group, every cycle)."""
        return (
            hard.term == self.term
            and hard.vote == self._persisted_vote()
            and hard.commit == self.log.committed
        )

    def _persisted_vote(self) -> int:
        """The vote the hard state carries (dropped by the planted FORGET_VOTE_PERSIST bug)."""
        return NO_NODE if self._bug_forget_vote else self.vote

    # ------------------------------------------------------------------------------------------
    # Role changes
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NO_NODE
        self.lead = NO_NODE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        tick = self._cfg.election_tick
        self.randomized_election_timeout = tick + self._rng.randrange(tick)
        self.lead_transferee = NO_NODE
        self.trk.reset_votes()
        self._reads_before_commit = []
        self._read_queue = []
        self._read_acks = {}
        self.trk.reset_progress(self.id, self.log.last_index())

    def _become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        # Term and vote stay untouched: a pre-election must not disturb anyone if it fails.
        self.role = Role.PRE_CANDIDATE
        self.trk.reset_votes()
        self.lead = NO_NODE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.lead = self.id
        self.role = Role.LEADER
        own = self.prs.get(self.id)
        if own is not None:
            own.become_replicate()
        # Earlier configuration changes in the log must be applied before a new one is proposed.
        self.pending_conf_index = self.log.last_index()
        # An entry of our own term lets us commit (and so serve reads) without §5.4.2's trap.
        self._append_entry(EntryType.NORMAL, b"")

    # ------------------------------------------------------------------------------------------
    # Time
    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self.election_elapsed += 1
            if self.promotable and self.election_elapsed >= self.randomized_election_timeout:
                self.election_elapsed = 0
                self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self._cfg.election_tick:
            self.election_elapsed = 0
            if self._cfg.check_quorum and not self.trk.quorum_active(self.id):
                self._become_follower(self.term, NO_NODE)
                return
            self.lead_transferee = NO_NODE
        for node, pr in self.prs.items():
            if pr.state == ProgressState.SNAPSHOT and node != self.id:
                pr.snapshot_elapsed += 1
                if pr.snapshot_elapsed > self._cfg.election_tick and not self._bug_snapshot_forever:
                    # The snapshot (or its answer) was lost: start again from probing.
                    pr.become_probe()
        if self.heartbeat_elapsed >= self._cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()

    # ------------------------------------------------------------------------------------------
    # Elections
    def _has_unapplied_conf_changes(self) -> bool:
        if self.log.committed <= self.log.applied:
            return False
        lo = max(self.log.applied + 1, self.log.first_index())
        return any(
            e.type == EntryType.CONF_CHANGE for e in self.log.slice(lo, self.log.committed + 1)
        )

    def _hup(self, *, transfer: bool) -> None:
        if self.role == Role.LEADER or not self.promotable:
            return
        # Counting votes with a configuration older than a committed one could elect two leaders.
        if self._has_unapplied_conf_changes():
            return
        self._campaign(pre=self._cfg.pre_vote and not transfer, transfer=transfer)

    def _campaign(self, *, pre: bool, transfer: bool = False) -> None:
        if pre:
            self._become_pre_candidate()
            vote_type = MessageType.PRE_VOTE
            term = self.term + 1
        else:
            self._become_candidate()
            vote_type = MessageType.VOTE
            term = self.term
        self.trk.record_vote(self.id, True)
        if self.trk.tally_votes() == VoteResult.WON:
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        context = CAMPAIGN_TRANSFER if transfer else b""
        for voter in sorted(self.voters):
            if voter != self.id:
                self._send(
                    vote_type,
                    voter,
                    term=term,
                    index=last_index,
                    log_term=last_term,
                    context=context,
                )

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type == MessageType.PRE_VOTE
        resp_type = MessageType.PRE_VOTE_RESP if pre else MessageType.VOTE_RESP
        can_vote = (
            self.vote == m.frm
            or (self.vote == NO_NODE and self.lead == NO_NODE)
            or (pre and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # A pre-vote grant echoes the candidate's future term so it is not dropped as stale.
            self._send(resp_type, m.frm, term=m.term)
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(resp_type, m.frm, reject=True)

    def _handle_vote_response(self, m: Message) -> None:
        self.trk.record_vote(m.frm, not m.reject)
        result = self.trk.tally_votes()
        if result == VoteResult.WON:
            if self.role == Role.PRE_CANDIDATE:
                self._campaign(pre=False, transfer=False)
            else:
                self._become_leader()
                self._bcast_append()
        elif result == VoteResult.LOST:
            self._become_follower(self.term, NO_NODE)

    # ------------------------------------------------------------------------------------------
    # Messages
    def _send(
        self,
        kind: MessageType,
        to: int,
        *,
        term: int | None = None,
        index: int = 0,
        log_term: int = 0,
        entries: tuple[Entry, ...] = (),
        commit: int = 0,
        reject: bool = False,
        reject_hint: int = 0,
        snapshot: Snapshot | None = None,
        context: bytes = b"",
    ) -> None:
        """Queue one message from this node, in our term unless ``term`` says otherwise.

        Only two messages carry another term: a candidate's (pre-)vote request, and a pre-vote
        grant, which echoes the candidate's future term so that it is not dropped as stale.
        """
        self.msgs.append(
            Message(  # positional, in Message's field order (per message sent)
                kind,
                to,
                self.id,
                self.term if term is None else term,
                log_term,
                index,
                entries,
                commit,
                reject,
                reject_hint,
                snapshot,
                context,
            )
        )

    def step(self, m: Message) -> None:
        """Feed one message received from a peer."""
        if m.to != self.id:
            return
        if m.term > self.term:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self._cfg.check_quorum
                    and self.lead != NO_NODE
                    and self.election_elapsed < self._cfg.election_tick
                )
                if in_lease and not force:
                    # We heard from a live leader recently: a disruptive candidate must wait.
                    return
            if m.type == MessageType.PRE_VOTE or (
                m.type == MessageType.PRE_VOTE_RESP and not m.reject
            ):
                pass  # pre-votes never change the term
            elif m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
                self._become_follower(m.term, m.frm)
            elif (m.type == MessageType.VOTE and self.role == Role.FOLLOWER) or (
                m.type == MessageType.VOTE_RESP and self.role == Role.CANDIDATE
            ):
                # Adopt the term but keep the election timer: only a granted vote resets it
                # (Raft §5.2). Otherwise a candidate whose log is behind, on a clock faster than
                # ours, restarts our timer every time and no up-to-date node ever campaigns; and
                # a candidate told of a newer term would wait a whole timeout to try again.
                elapsed = self.election_elapsed
                self._become_follower(m.term, NO_NODE)
                self.election_elapsed = elapsed
            else:
                self._become_follower(m.term, NO_NODE)
        elif m.term < self.term:
            if m.type in (MessageType.APPEND, MessageType.HEARTBEAT) and (
                self._cfg.check_quorum or self._cfg.pre_vote
            ):
                # A leader cut off by a partition learns our term and steps down; without this a
                # node that bumped its term could never rejoin (pre-vote keeps terms from rising).
                self._send(MessageType.APPEND_RESP, m.frm)
                return
            if m.type == MessageType.PRE_VOTE:
                self._send(MessageType.PRE_VOTE_RESP, m.frm, reject=True)
                return
            if m.type == MessageType.VOTE:
                # Tell a candidate of an older term about ours, as the paper's reply does. etcd
                # drops it; then a voter that nobody else sends to (the others' configurations
                # leave it out) can campaign in old terms forever while a stale node outruns it.
                self._send(MessageType.VOTE_RESP, m.frm, reject=True)
                return
            if not (self._bug_stale_votes and m.type == MessageType.VOTE_RESP):
                return

        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MessageType.APPEND:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif t == MessageType.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif t == MessageType.SNAPSHOT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif t == MessageType.TIMEOUT_NOW:
            self._hup(transfer=True)

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif (t == MessageType.PRE_VOTE_RESP and self.role == Role.PRE_CANDIDATE) or (
            t == MessageType.VOTE_RESP and self.role == Role.CANDIDATE
        ):
            self._handle_vote_response(m)

    def _step_leader(self, m: Message) -> None:
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if m.type == MessageType.APPEND_RESP:
            self._handle_append_response(m, pr)
        elif m.type == MessageType.HEARTBEAT_RESP:
            self._handle_heartbeat_response(m, pr)

    # ------------------------------------------------------------------------------------------
    # Follower side of replication
    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(MessageType.APPEND_RESP, m.frm, index=self.log.committed)
            return
        if self._bug_skip_log_match:
            last_new = self._append_unchecked(m)
        else:
            last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(MessageType.APPEND_RESP, m.frm, index=last_new)
            return
        hint, hint_term = self.log.find_conflict_by_term(
            min(m.index, self.log.last_index()), m.log_term
        )
        self._send(
            MessageType.APPEND_RESP,
            m.frm,
            index=m.index,
            reject=True,
            reject_hint=hint,
            log_term=hint_term,
        )

    def _append_unchecked(self, m: Message) -> int | None:
        if m.index > self.log.last_index():
            return None
        conflict = self.log.find_conflict(m.entries)
        if conflict and conflict > self.log.committed:
            self.log.append(m.entries[conflict - m.index - 1 :])
        last_new = m.index + len(m.entries)
        self.log.commit_to(min(m.commit, last_new, self.log.last_index()))
        return last_new

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(m.commit)
        self._send(MessageType.HEARTBEAT_RESP, m.frm, context=m.context)

    def _handle_snapshot(self, m: Message) -> None:
        if m.snapshot is not None:
            self._restore(m.snapshot)
        # Read after the restore: a snapshot we already held still raised our commit index, and
        # the leader leaves SNAPSHOT state only once it hears an index at least the snapshot's.
        self._send(MessageType.APPEND_RESP, m.frm, index=self.log.committed)

    def _restore(self, snapshot: Snapshot) -> bool:
        meta = snapshot.meta
        if meta.index <= self.log.committed:
            return False
        if self.log.match_term(meta.index, meta.term):
            # We already hold the snapshot's last entry: just learn that it is committed.
            self.log.commit_to(meta.index)
            return False
        self.log.restore(snapshot)
        self.trk.restore(meta.conf_state)
        return True

    # ------------------------------------------------------------------------------------------
    # Leader side of replication
    def _append_entry(self, kind: EntryType, data: bytes) -> int:
        entry = Entry(term=self.term, index=self.log.last_index() + 1, type=kind, data=data)
        self.log.append([entry])
        own = self.prs.get(self.id)
        if own is not None:
            own.maybe_update(entry.index)
        self._maybe_commit()
        self._bcast_append()
        return entry.index

    def _maybe_commit(self) -> bool:
        index = self.trk.committed()
        if not self.log.maybe_commit(index, self.term, any_term=self._bug_commit_previous_term):
            return False
        if self._reads_before_commit and self.log.term(self.log.committed) == self.term:
            waiting, self._reads_before_commit = self._reads_before_commit, []
            for request_id in waiting:
                self._start_read(request_id)
        return True

    def _bcast_append(self) -> None:
        for node in self.prs:
            if node != self.id:
                self._send_append(node)

    def _send_append(self, to: int, *, send_if_empty: bool = True) -> bool:
        pr = self.prs[to]
        if pr.is_paused():
            return False
        if pr.next > self.log.last_index() + 1:
            pr.next = self.log.last_index() + 1
        prev_index = pr.next - 1
        prev_term = self.log.term(prev_index)
        entries: list[Entry] | None = None
        if prev_term is not None:
            try:
                entries = self.log.entries_from(pr.next, self._cfg.max_size_per_msg)
            except CompactedError:
                entries = None
        if prev_term is None or entries is None:
            if not pr.recent_active:
                return False
            snapshot = self.log.storage.snapshot()
            pr.become_snapshot(snapshot.meta.index)
            self._send(MessageType.SNAPSHOT, to, snapshot=snapshot)
            return True
        if not entries and not send_if_empty:
            return False
        self._send(
            MessageType.APPEND,
            to,
            index=prev_index,
            log_term=prev_term,
            entries=tuple(entries),
            commit=self.log.committed,
        )
        if pr.state == ProgressState.REPLICATE:
            if entries:
                last = entries[-1].index
                pr.next = last + 1
                pr.inflights.add(last, sum(entry_size(e) for e in entries))
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        old_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.match + 1 >= self.log.first_index():
            pr.become_probe()
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            self._bcast_append()
        elif old_paused:
            self._send_append(m.frm)
        while self._send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send(MessageType.TIMEOUT_NOW, m.frm)

    def _handle_heartbeat_response(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        pr.probe_sent = False
        if pr.state == ProgressState.REPLICATE and pr.inflights.full():
            # Every APPEND in the window may be lost; let one more through to find out.
            pr.inflights.free_first_one()
        if pr.match < self.log.last_index():
            self._send_append(m.frm)
        if m.context:
            self._ack_read(m.context, m.frm)

    def _bcast_heartbeat(self) -> None:
        context = self._read_queue[-1] if self._read_queue else b""
        self._bcast_heartbeat_with(context)

    def _bcast_heartbeat_with(self, context: bytes) -> None:
        committed = self.log.committed
        for node, pr in self.prs.items():
            if node != self.id:
                # A follower may hold a stale tail beyond what we know it matches: never tell it
                # a commit index past that, or it would commit entries that are not ours.
                commit = committed if self._bug_uncapped_heartbeat else min(pr.match, committed)
                self._send(MessageType.HEARTBEAT, node, commit=commit, context=context)

    # ------------------------------------------------------------------------------------------
    # Linearizable reads (ReadIndex, Raft thesis §6.4)
    def _start_read(self, request_id: bytes) -> None:
        if self.voters == {self.id}:
            self.read_states.append(ReadState(self.log.committed, request_id))
            return
        if request_id in self._read_acks:
            return
        self._read_acks[request_id] = (self.log.committed, {self.id})
        self._read_queue.append(request_id)
        self._bcast_heartbeat_with(request_id)

    def _ack_read(self, request_id: bytes, frm: int) -> None:
        pending = self._read_acks.get(request_id)
        if pending is None:
            return
        pending[1].add(frm)
        if not self.trk.is_quorum(pending[1]):
            return
        # Confirming a later request confirms every earlier one too.
        position = self._read_queue.index(request_id)
        confirmed = self._read_queue[: position + 1]
        del self._read_queue[: position + 1]
        for rid in confirmed:
            index, _ = self._read_acks.pop(rid)
            self.read_states.append(ReadState(index, rid))

    # ------------------------------------------------------------------------------------------
    # Membership
    def _apply_conf_change(self, cc: ConfChange) -> None:
        self.trk.change(cc)
        if self.role != Role.LEADER:
            return
        node = cc.node_id
        self.trk.sync_progress(node, self.log.last_index())
        if node not in self.prs and node == self.lead_transferee:
            self.lead_transferee = NO_NODE
        if self._maybe_commit():
            self._bcast_append()
        elif node in self.prs and node != self.id:
            self._send_append(node)
        if self.id not in self.voters:
            # Removed (or demoted) leader: tell followers what is committed, then step aside.
            self._bcast_append()
            self._become_follower(self.term, NO_NODE)

    # ------------------------------------------------------------------------------------------
    # Public API
    def propose(self, data: bytes) -> int:
        """Append ``data`` to the log; returns its index. Raises NotLeader on a non-leader."""
        self._check_can_propose()
        return self._append_entry(EntryType.NORMAL, data)

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Propose one membership change; at most one may be in flight at a time."""
        self._check_can_propose()
        if self.pending_conf_index > self.log.applied and not self._bug_conf_while_pending:
            raise ProposalDropped("an earlier configuration change is not applied yet")
        node = cc.node_id
        if cc.type == ConfChangeType.ADD_NODE:
            if node in self.voters:
                raise ProposalDropped(f"node {node} is already a voter")
            pr = self.prs.get(node)
            if node not in self.learners or pr is None:
                raise ProposalDropped(f"node {node} must join as a learner first")
            if pr.match < self.log.committed:
                raise ProposalDropped(f"learner {node} has not caught up")
        elif cc.type == ConfChangeType.ADD_LEARNER:
            if node in self.voters or node in self.learners:
                raise ProposalDropped(f"node {node} is already a member")
        elif node not in self.voters and node not in self.learners:
            raise ProposalDropped(f"node {node} is not a member")
        elif self.voters == {node}:
            raise ProposalDropped("cannot remove the last voter")
        index = self._append_entry(EntryType.CONF_CHANGE, cc.encode())
        self.pending_conf_index = index
        return index

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee != NO_NODE:
            raise ProposalDropped(f"leadership is being transferred to {self.lead_transferee}")

    def read_index(self, request_id: bytes) -> None:
        """Ask for a linearizable read; a ReadState with ``request_id`` appears in a later Ready.

        If leadership is lost first, no ReadState ever appears: callers time out and retry.
        """
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        if not request_id:
            raise ValueError("request_id must not be empty")
        if self._bug_read_no_confirm:
            self.read_states.append(ReadState(self.log.committed, request_id))
            return
        if self.log.term(self.log.committed) != self.term and not self._bug_read_before_term_commit:
            # Our commit index may lag the true one until an entry of our term commits.
            self._reads_before_commit.append(request_id)
            return
        self._start_read(request_id)

    def transfer_leadership(self, to: int) -> None:
        """Hand leadership to voter ``to`` once it has caught up (within one election timeout)."""
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        if to == self.id or to not in self.voters:
            raise ValueError(f"cannot transfer leadership to {to}")
        if self.lead_transferee == to:
            return
        self.lead_transferee = to
        self.election_elapsed = 0
        if self.prs[to].match == self.log.last_index():
            self._send(MessageType.TIMEOUT_NOW, to)
        else:
            self._send_append(to)

    def campaign(self) -> None:
        """Start an election now (tests and bootstrapping); a no-op on leaders and learners."""
        self._hup(transfer=False)

    def report_unreachable(self, node: int) -> None:
        """The runtime failed to send to ``node``: stop pipelining to it and probe instead."""
        pr = self.prs.get(node)
        if self.role == Role.LEADER and pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    # ------------------------------------------------------------------------------------------
    # Application
    def applied_to(self, index: int) -> None:
        """The state machine has applied every entry handed out up to ``index``.

        Configuration changes among those entries take effect here, in log order, and never
        before they are applied: until then the node neither campaigns nor (as leader) accepts
        another change.
        """
        if index <= self.log.applied:
            return
        if index > self.log.applying:
            raise ValueError(
                f"applied_to({index}) beyond the entries handed out ({self.log.applying})"
            )
        for entry in self.log.slice(max(self.log.applied + 1, self.log.first_index()), index + 1):
            if entry.type == EntryType.CONF_CHANGE:
                self._apply_conf_change(ConfChange.decode(entry.data))
        self.log.applied_to(index)
