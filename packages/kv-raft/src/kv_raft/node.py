"""``RawNode``: the Ready/advance bookkeeping around the protocol rules in ``kv_raft.raft``.

The rules change state and queue messages; this layer remembers what the runtime has already
been told (the last soft and hard state), gathers everything new into one ``Ready``, says whether
it must be fsynced, and on ``advance`` marks what the runtime persisted and applied. Keeping the
two apart is what lets the rules read like the paper, as etcd's ``raft`` and ``RawNode`` do.
"""

from __future__ import annotations

from kv_raft.faults import Bug
from kv_raft.log import RaftLog
from kv_raft.progress import Progress
from kv_raft.raft import NotLeader, ProposalDropped, Raft
from kv_raft.storage import Storage
from kv_raft.types import ConfChange, Config, ConfState, Message, Ready, Role

__all__ = ["NotLeader", "ProposalDropped", "RawNode"]


class RawNode:
    def __init__(self, config: Config, storage: Storage) -> None:
        self.raft = Raft(config, storage)
        self._async_apply = config.async_apply
        self._bug_vote_without_sync = Bug.VOTE_WITHOUT_SYNC in config.bugs
        self._prev_soft = self.raft.soft_state()
        self._prev_hard = storage.initial_state()[0]

    # -- what the runtime and tests may look at -------------------------------------------------
    @property
    def id(self) -> int:
        return self.raft.id

    @property
    def term(self) -> int:
        return self.raft.term

    @property
    def vote(self) -> int:
        return self.raft.vote

    @property
    def role(self) -> Role:
        return self.raft.role

    @property
    def leader(self) -> int:
        return self.raft.lead

    @property
    def log(self) -> RaftLog:
        return self.raft.log

    @property
    def committed(self) -> int:
        return self.raft.log.committed

    @property
    def applied(self) -> int:
        return self.raft.log.applied

    @property
    def voters(self) -> set[int]:
        return self.raft.trk.voters

    @property
    def learners(self) -> set[int]:
        return self.raft.trk.learners

    @property
    def conf_state(self) -> ConfState:
        return self.raft.trk.conf_state

    @property
    def prs(self) -> dict[int, Progress]:
        return self.raft.trk.progress

    @property
    def promotable(self) -> bool:
        return self.raft.promotable

    @property
    def election_elapsed(self) -> int:
        return self.raft.election_elapsed

    # -- input ----------------------------------------------------------------------------------
    def tick(self) -> None:
        self.raft.tick()

    def step(self, m: Message) -> None:
        """Feed one message received from a peer."""
        self.raft.step(m)

    def propose(self, data: bytes) -> int:
        """Append ``data`` to the log; returns its index. Raises NotLeader on a non-leader."""
        return self.raft.propose(data)

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Propose one membership change; at most one may be in flight at a time."""
        return self.raft.propose_conf_change(cc)

    def read_index(self, request_id: bytes) -> None:
        """Ask for a linearizable read; a ReadState with ``request_id`` appears in a later Ready.

        If leadership is lost first, no ReadState ever appears: callers time out and retry.
        """
        self.raft.read_index(request_id)

    def transfer_leadership(self, to: int) -> None:
        """Hand leadership to voter ``to`` once it has caught up (within one election timeout)."""
        self.raft.transfer_leadership(to)

    def campaign(self) -> None:
        """Start an election now (tests and bootstrapping); a no-op on leaders and learners."""
        self.raft.campaign()

    def report_unreachable(self, node: int) -> None:
        """The runtime failed to send to ``node``: stop pipelining to it and probe instead."""
        self.raft.report_unreachable(node)

    # -- Ready / advance ------------------------------------------------------------------------
    def has_ready(self) -> bool:
        raft = self.raft
        log = raft.log
        if raft.msgs or raft.read_states or log.unstable.entries:
            return True
        if log.unstable.snapshot is not None or log.has_next_committed_entries():
            return True
        prev_soft = self._prev_soft
        if prev_soft.leader != raft.lead or prev_soft.role != raft.role:
            return True
        return not raft.hard_state_is(self._prev_hard)

    def ready(self) -> Ready:
        """Everything the runtime must do now. Call ``advance`` with it before calling again."""
        raft = self.raft
        log = raft.log
        prev_soft = self._prev_soft
        soft_changed = prev_soft.leader != raft.lead or prev_soft.role != raft.role
        prev_hard = self._prev_hard
        hard = prev_hard if raft.hard_state_is(prev_hard) else raft.hard_state()
        entries = tuple(log.unstable_entries())
        snapshot = log.pending_snapshot()
        committed = tuple(log.next_committed_entries()) if log.has_next_committed_entries() else ()
        messages = tuple(raft.msgs)
        raft.msgs = []
        read_states = tuple(raft.read_states)
        raft.read_states = []
        # A vote or a new term is a promise made to others: it must survive a crash before any
        # message that depends on it leaves. A new commit index alone may be lost and relearned.
        vote_changed = hard.term != prev_hard.term or hard.vote != prev_hard.vote
        return Ready(
            soft_state=raft.soft_state() if soft_changed else None,
            hard_state=hard if hard is not prev_hard else None,
            entries=entries,
            snapshot=snapshot,
            committed_entries=committed,
            messages=messages,
            read_states=read_states,
            must_sync=bool(entries)
            or snapshot is not None
            or (vote_changed and not self._bug_vote_without_sync),
        )

    def advance(self, rd: Ready) -> None:
        """The runtime persisted and sent ``rd``, and installed its snapshot.

        Unless ``Config.async_apply``, it also applied ``rd.committed_entries``, and their
        configuration changes take effect now; otherwise they do at ``applied_to``.
        """
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        log = self.raft.log
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.meta.index)
            log.applying_to(rd.snapshot.meta.index)
            log.applied_to(rd.snapshot.meta.index)
        if rd.committed_entries:
            log.applying_to(rd.committed_entries[-1].index)
            if not self._async_apply:
                self.raft.applied_to(rd.committed_entries[-1].index)

    def applied_to(self, index: int) -> None:
        """With ``Config.async_apply``: the state machine has applied everything up to ``index``.

        Configuration changes among those entries take effect now.
        """
        self.raft.applied_to(index)
