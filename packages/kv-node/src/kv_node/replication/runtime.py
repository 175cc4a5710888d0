"""The replication runtime: one per node, the thin shell that drives every Raft group.

It owns no rule of its own. The driver (``MultiRaft``) decides what each group does, the
replica store persists and applies, the transport carries messages, and ``pending`` says which
caller to answer when. The runtime only performs what they decide, in the order the Ready
contract (``kv_raft``'s package docstring) requires, for all groups at once:

1. On a tick, or as soon as anything arrives (a message, a write, a read, a peer's liveness
   change), it feeds the driver: messages received since the last cycle, writes queued for
   each group (one entry per group per cycle, more for large or conflicting ones; see
   ``pending``), ReadIndex requests.
2. ``collect()`` gives every group's Ready. The messages and read states of Readies that
   write nothing are sent and served at once. One write transaction persists all the other
   Readies' log entries, hard states and snapshots and applies all their committed entries,
   with at most one fsync, in a worker thread (fsync blocks). Writers are answered from
   what was applied as soon as it is in the transaction, while the flush runs: their
   entries are committed, that is durable on a quorum already (``ReplicaStore.commit``).
3. Only then are those Readies' messages sent (a vote or an append acknowledgement promises
   durable state), each peer's together.
4. Reads are answered once what they wait for is applied; ``advance`` tells the driver.

A cycle's write is out while the next cycle is gathered (pipelining): at most one write is
out at a time, and the groups of its Readies are *busy* (``MultiRaft.busy``) until it is
advanced. A busy group is left out of later cycles and is fed nothing meanwhile: its messages,
writes and reads wait in the inboxes, so each group still sees Ready, persist, send, advance
strictly in turn. The other groups go on: a read of an idle group completes during another
group's flush, and the next cycle's entries are ready to write the moment the flush ends.
Liveness changes may touch any group: the next cycle waits for the write that is out, then
applies them.

Everything that touches the driver runs in the runtime's own task (the write's completion
too), so the driver needs no locks; what arrives meanwhile waits in the inboxes (messages are
bounded by ``MAX_INBOX``; writes and reads by the node's admission bound on calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kv_node.replication.command import CommandError, encode_command
from kv_node.replication.multiraft import Cycle, GroupMessage, GroupReady, MultiRaft
from kv_node.replication.pending import EntryFailed, LeadershipLost, Proposals, Reads
from kv_node.replication.storage import CommitResult, GroupWrite, ReplicaStore
from kv_node.store import GetOp, Op, Outcome
from kv_raft import Message, ProposalDropped, Role

log = logging.getLogger(__name__)

DEFAULT_TICK_SECONDS = 0.1
"""One Raft tick. With the core's default election_tick of 10, an election timeout is 1-2 s."""
DEFAULT_COMPACT_AFTER = 10_000
"""Log entries a group keeps before it compacts (drops what is applied, keeping a tail)."""
DEFAULT_KEEP_AFTER_COMPACT = 1_000
"""Applied entries kept after a compaction, so that a follower a little behind catches up
from the log instead of by a snapshot of the whole partition."""
MAX_INBOX = 65_536
"""Messages received and not yet stepped; beyond it new ones are dropped (Raft tolerates
loss) rather than letting a slow disk grow the node's memory without bound."""


class Transport(Protocol):
    """What the runtime needs of the peer transport (``transport.PeerTransport``)."""

    def send(self, peer: int, items: Sequence[tuple[int, Message]]) -> None:
        """Queue ``items`` (group, message) for ``peer``; never blocks, drops when full."""
        ...


@dataclass
class RuntimeStats:
    cycles: int = 0
    entries_applied: int = 0
    messages_sent: int = 0
    inbox_dropped: int = 0
    leader_changes: int = 0
    compactions: int = 0


@dataclass
class _Inbox:
    messages: list[tuple[int, Message]] = field(default_factory=list)
    liveness: list[tuple[int, bool]] = field(default_factory=list)
    connected: list[int] = field(default_factory=list)


class ReplicationRuntime:
    def __init__(
        self,
        *,
        driver: MultiRaft,
        store: ReplicaStore,
        transport: Transport,
        tick_seconds: float = DEFAULT_TICK_SECONDS,
        on_leader_change: Callable[[int, int], None] | None = None,
        compact_after: int = DEFAULT_COMPACT_AFTER,
        keep_after_compact: int = DEFAULT_KEEP_AFTER_COMPACT,
    ) -> None:
        """Peers are named by raft id everywhere (``transport.raft_node_ids``)."""
        self._driver = driver
        self._store = store
        self._transport = transport
        self._tick_seconds = tick_seconds
        if not 0 <= keep_after_compact < compact_after:
            raise ValueError("keep_after_compact must be below compact_after")
        self._compact_after = compact_after
        self._keep_after_compact = keep_after_compact
        self._on_leader_change = on_leader_change
        self._proposals = Proposals()
        self._reads = Reads()
        self._inbox = _Inbox()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[None] | None = None
        """The cycle whose write is out (at most one): the next cycle is gathered meanwhile."""
        self._stopping = False
        self.stopped = asyncio.Event()
        """Set when the runtime's loop has ended, by ``stop`` or by a failed cycle."""
        self.failure: Exception | None = None
        """What ended the loop when a cycle failed (the node must exit)."""
        self.stats = RuntimeStats()
        self._handing_off = False
        self.handed_off = asyncio.Event()
        """Set once ``hand_off`` moved every leadership it could (see ``MultiRaft.hand_off``)."""

    # -- what the servicer calls ----------------------------------------------------------------
    async def write(self, group: int, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` (in order, as one unit) through the group's log; outcomes per op.

        Raises ``LeadershipLost`` (with the leader this node knows) when it does not lead the
        group, and ``ProposalLost`` when another leader's entry replaced the write's.

        Ops that are all gets (the SDK coalesces single gets into such batches) are served
        through ReadIndex, as ``read`` is: as linearizable as an entry in the log, from one
        applied state, and without a log entry or any fsync."""
        self._check_running()
        if ops and all(isinstance(op, GetOp) for op in ops):
            ready = self._reads.queue(group)
            self._wake.set()
            await ready
            return list(self._store.get_many(group, [op.key for op in ops]))
        future = self._proposals.queue(group, ops)
        self._wake.set()
        return await future

    async def read(self, group: int, key: bytes) -> tuple[bytes, int] | None:
        """A linearizable read: the value and version of ``key`` as of a read index confirmed
        by a quorum; raises ``LeadershipLost`` when this node does not lead the group."""
        self._check_running()
        future = self._reads.queue(group)
        self._wake.set()
        await future
        return self._store.get(group, key)

    def leader(self, group: int) -> int:
        """The raft id this node believes leads ``group`` (``NO_NODE`` when unknown)."""
        return self._driver.leader(group)

    # -- what the transport calls ---------------------------------------------------------------
    def on_batch(self, sender: int, items: Sequence[tuple[int, Message]]) -> None:
        """Messages from ``sender``, stepped at the start of the next cycle."""
        inbox = self._inbox.messages
        room = MAX_INBOX - len(inbox)
        if room < len(items):
            self.stats.inbox_dropped += len(items) - max(room, 0)
            items = items[: max(room, 0)]
        inbox.extend(items)
        self._wake.set()

    def on_peer_state(self, peer: int, alive: bool) -> None:
        self._inbox.liveness.append((peer, alive))
        self._wake.set()

    def on_link_up(self, peer: int) -> None:
        """Our stream to ``peer`` is up: what we send it arrives from now on."""
        self._inbox.connected.append(peer)
        self._wake.set()

    def hand_off(self) -> None:
        """Start handing every leadership here to another replica (a stopping node); from now
        on each cycle continues it, and ``handed_off`` is set once nothing is left to move."""
        self._handing_off = True
        self._wake.set()

    # -- life -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replication")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):  # a failed cycle was logged and recorded
                await self._task
            self._task = None
        self._fail_waiting(RuntimeError("the node is shutting down"))

    def _fail_waiting(self, error: Exception) -> None:
        """Nothing more will be applied: fail every write and read still waiting."""
        self._proposals.fail_all(error)
        self._reads.fail_all(error)

    def _check_running(self) -> None:
        if self._task is None or self._stopping:
            raise RuntimeError(
                f"replication stopped: {self.failure}" if self.failure else "replication stopped"
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self._tick_seconds
        try:
            while not self._stopping:
                wait = next_tick - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                self._wake.clear()
                if self._stopping:
                    break
                now = loop.time()
                if now >= next_tick:
                    self._driver.tick()
                    self._reads.tick()
                    # A late cycle (a slow fsync) skips ticks rather than bunching them: time
                    # in Raft is a lower bound, and bunched ticks would start elections at once.
                    next_tick = max(next_tick + self._tick_seconds, now)
                await self._cycle()
            await self._written()
        except Exception as exc:
            # The store failed (fsync, a full disk): what reached the disk is unknown, so
            # going on could break a promise already made. Stop replicating, fail every
            # caller, and let the node exit (``stopped``), as etcd does.
            log.exception("replication stopped: a cycle failed")
            self.failure = exc
            self._stopping = True
            self._fail_waiting(RuntimeError(f"replication stopped: {exc}"))
            self.stopped.set()
            raise
        self.stopped.set()

    async def _written(self) -> None:
        """Wait for the write that is out, if any; its failure raises here."""
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def _cycle(self) -> None:
        driver = self._driver
        pending = self._inbox
        if self._writing is not None and (
            self._writing.done() or pending.liveness or pending.connected
        ):
            # A liveness change waits for the write that is out (it may touch any group),
            # but never longer: under load a write is nearly always out, and deferring it
            # to a moment with none would starve failover.
            await self._written()  # raises at once if that write failed
        inbox, self._inbox = self._inbox, _Inbox()
        for raft_id, alive in inbox.liveness:  # none are left while a write is out
            driver.peer_alive(raft_id, alive)
        for raft_id in inbox.connected:
            driver.peer_connected(raft_id)
        busy = driver.busy
        later = self._inbox.messages
        for group, message in inbox.messages:
            if busy(group):
                later.append((group, message))  # stepped once its Ready is advanced
            else:
                driver.step(group, message)
        if self._handing_off and not driver.hand_off():
            self.handed_off.set()
        # One caller's bad request must never stop the runtime: every refusal below fails
        # only the callers it concerns.
        for group, ops, waiters in self._proposals.take(busy):
            try:
                data = encode_command(ops)
            except CommandError as bad:
                self._proposals.refused(waiters, EntryFailed(f"group {group}: {bad}"))
                continue
            try:
                index = driver.propose(group, data)
            except ProposalDropped:  # NotLeader, or a leadership transfer (name its target)
                leader = driver.transferee(group) or driver.leader(group)
                self._proposals.refused(waiters, LeadershipLost(group, leader))
                continue
            self._proposals.proposed(group, index, driver.term(group), waiters)
        for group, request_id in self._reads.requests(busy):
            try:
                driver.read_index(group, request_id)
            except ProposalDropped:
                lost = LeadershipLost(group, driver.leader(group))
                self._reads.refused(group, request_id, lost)
        cycle = driver.collect()
        if cycle.is_empty:
            return
        # Readies that write nothing (ReadIndex and heartbeat rounds, their answers, read
        # states) are done before the write: an fsync for other groups need not delay them.
        self._send(cycle.early)
        writing = [item for item in cycle.readies if item.writes]
        if len(writing) < len(cycle.readies):
            self._answer([item for item in cycle.readies if not item.writes])
        if not writing:
            driver.advance(cycle)
            return
        # One write at a time, in cycle order. This cycle was gathered while the previous
        # one's flush ran; now it waits for that flush, and the next is gathered during its own.
        await self._written()
        task = asyncio.get_running_loop().create_task(self._write(cycle, writing))
        task.add_done_callback(lambda _: self._wake.set())  # a failure is seen at once
        self._writing = task

    async def _write(self, cycle: Cycle, writing: list[GroupReady]) -> None:
        """Persist and apply the cycle's Readies that write, then send their messages, serve
        what waited for them and advance the cycle. Its groups are busy until then."""
        writes = [GroupWrite.from_ready(item.group, item.ready) for item in writing]
        loop = asyncio.get_running_loop()

        def answer_early(applied: CommitResult) -> None:
            # From the worker thread, before the flush: the writers' outcomes are final
            # (see ``ReplicaStore.commit``); they reach the loop before the flush ends.
            loop.call_soon_threadsafe(self._answer_writes, applied)

        await asyncio.to_thread(self._commit, writes, answer_early)
        self.stats.cycles += 1
        self._send(cycle.outbox)
        self._answer(writing)
        self._driver.advance(cycle)

    def _commit(
        self, writes: list[GroupWrite], on_applied: Callable[[CommitResult], None]
    ) -> CommitResult:
        """The cycle's one transaction, then compaction of logs grown past the bound (in the
        same worker thread; nothing reads the store while a cycle is out)."""
        results = self._store.commit(writes, on_applied)
        for group in results:
            applied = self._store.applied(group)
            if applied - self._store.group(group).first_index() + 1 > self._compact_after:
                self._store.compact(group, applied - self._keep_after_compact)
                self.stats.compactions += 1
        return results

    def _send(self, outbox: Mapping[int, Sequence[GroupMessage]]) -> None:
        for raft_id, messages in outbox.items():
            self._transport.send(raft_id, messages)
            self.stats.messages_sent += len(messages)

    def _answer_writes(self, results: CommitResult) -> None:
        """Each writer gets its outcomes (or learns its entry was replaced or failed)."""
        proposals = self._proposals
        for group, applied_entries in results.items():
            for applied_entry in applied_entries:
                if applied_entry.error is not None:
                    proposals.failed(
                        group, applied_entry.index, applied_entry.term, applied_entry.error
                    )
                else:
                    proposals.applied(
                        group, applied_entry.index, applied_entry.term, applied_entry.outcomes
                    )

    def _answer(self, readies: Sequence[GroupReady]) -> None:
        """Leader changes and reads; the writers were answered by ``_answer_writes``."""
        reads = self._reads
        for item in readies:
            group, rd = item.group, item.ready
            if rd.soft_state is not None:
                # A ReadIndex request is lost with the leadership: only a role or leader
                # change can end one. Becoming leader (a request issued in the same cycle
                # waits for the term's first commit) ends nothing.
                leader = rd.soft_state.leader
                if rd.soft_state.role != Role.LEADER:
                    reads.leader_changed(group, leader)
                self.stats.leader_changes += 1
                if self._on_leader_change is not None:
                    self._on_leader_change(group, leader)
            self.stats.entries_applied += len(rd.committed_entries)
            applied = self._store.applied(group)
            for state in rd.read_states:
                reads.read_state(group, state.request_id, state.index, applied)
            reads.applied(group, applied)
