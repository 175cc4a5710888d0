"""What the replication runtime owes its callers, and when it may answer them.

Two tables, both pure bookkeeping (no I/O, no clock, no Raft calls): the runtime tells them
what happened (an entry was proposed, applied, a read index came back, a leader changed) and
they settle the callers' futures. Keeping them apart from the runtime's loop is what lets the
rules below be tested one by one.

**Writes** (``Proposals``). Callers' writes to one group queue up between two runtime cycles;
the runtime proposes what is queued for a group as one entry (so a burst of writes costs one
entry, one append message per follower, one apply), then records which callers own which
slice of the entry. Every op of an entry gets the entry's Raft index as its version, so two
callers' writes to the same key never share an entry (else both would get one version, and a
conditional write against it could overwrite the other caller's value): a caller who writes a
key the open entry already writes, or who would take it past ``max_entry_ops``, starts the next
entry. (Reads may share: a read sees the writes before it and reports their version.) When
that index is applied, each caller gets its slice of the outcomes.
If a different entry is applied at that index (a new leader overwrote ours), the write never
happened: the callers get ``ProposalLost``, which is safe to retry.

**Reads** (``Reads``). A linearizable read waits for a read index (Raft's ReadIndex: the
leader's commit index, confirmed by a quorum of heartbeats) and then for the local applied
index to reach it. Reads are batched as etcd does: at most one ReadIndex request per group is
in flight; every read queued before it was issued is served by its answer, reads queued after
wait for the next one. A request whose answer never comes (the leader lost its leadership
first, which the core reports by silence) is abandoned when the group's leader or term changes,
and reissued after ``reissue_ticks`` ticks otherwise.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count

from kv_node.store import GetOp, Op, Outcome

DEFAULT_MAX_ENTRY_OPS = 1024
"""Most ops one entry carries: bounds an entry's size and its apply time."""
DEFAULT_REISSUE_TICKS = 20
"""A ReadIndex request unanswered this long (two election timeouts) is asked again."""


def _never(group: int) -> bool:
    return False


class ProposalLost(Exception):
    """The entry holding this write was replaced by another leader's: the write did not
    happen, and retrying it is safe."""


class EntryFailed(Exception):
    """The entry holding this write was applied as a failure (its command did not decode):
    the same on every replica, and nothing of it was written."""


class LeadershipLost(Exception):
    """This node stopped leading the group (or never did) before the call could finish.

    ``leader`` is the raft id of the leader it now knows of, 0 when none.
    """

    def __init__(self, group: int, leader: int) -> None:
        super().__init__(f"group {group}: not the leader; leader is {leader or 'unknown'}")
        self.group = group
        self.leader = leader


_Waiter = tuple[int, "asyncio.Future[list[Outcome]]"]
"""One caller of an entry: how many of its ops it owns, and its future."""


@dataclass
class _Entry:
    term: int
    waiters: list[_Waiter]


@dataclass
class _Queue:
    ops: list[Op] = field(default_factory=list)
    waiters: list[_Waiter] = field(default_factory=list)
    written: set[bytes] = field(default_factory=set)


class Proposals:
    def __init__(self, *, max_entry_ops: int = DEFAULT_MAX_ENTRY_OPS) -> None:
        self._max_entry_ops = max_entry_ops
        self._queued: dict[int, list[_Queue]] = {}
        self._in_log: dict[tuple[int, int], _Entry] = {}

    def queue(self, group: int, ops: Sequence[Op]) -> asyncio.Future[list[Outcome]]:
        """Queue a caller's ops; the future gets one outcome per op once they are applied."""
        if not ops:
            raise ValueError("a proposal needs at least one op")
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        queues = self._queued.setdefault(group, [])
        written = {op.key for op in ops if not isinstance(op, GetOp)}
        if (
            not queues
            or len(queues[-1].ops) + len(ops) > self._max_entry_ops
            or not written.isdisjoint(queues[-1].written)
        ):
            queues.append(_Queue())
        tail = queues[-1]
        tail.ops.extend(ops)
        tail.waiters.append((len(ops), future))
        tail.written |= written
        return future

    def take(
        self, busy: Callable[[int], bool] = _never
    ) -> Iterator[tuple[int, list[Op], list[_Waiter]]]:
        """Everything queued, one (group, ops, waiters) per entry to propose; the queues empty,
        but for the groups that are ``busy`` (their Ready is out), whose writes stay queued.

        Callers that gave up (cancelled futures) are dropped here, before their ops are
        proposed; once proposed, a write happens even if its caller stopped waiting."""
        queued, self._queued = self._queued, {}
        for group, queues in queued.items():
            if busy(group):
                self._queued[group] = queues
                continue
            for queue in queues:
                ops: list[Op] = []
                waiters: list[_Waiter] = []
                position = 0
                for size, future in queue.waiters:
                    if not future.done():
                        ops.extend(queue.ops[position : position + size])
                        waiters.append((size, future))
                    position += size
                if ops:
                    yield group, ops, waiters

    def proposed(self, group: int, index: int, term: int, waiters: list[_Waiter]) -> None:
        self._in_log[(group, index)] = _Entry(term, waiters)

    def refused(self, waiters: list[_Waiter], error: Exception) -> None:
        """The proposal was not accepted (this node does not lead): nothing was written."""
        for _, future in waiters:
            if not future.done():
                future.set_exception(error)

    def applied(self, group: int, index: int, term: int, outcomes: Sequence[Outcome]) -> None:
        """Entry ``index`` of ``group`` (of ``term``) was applied with these outcomes."""
        entry = self._ours(group, index, term)
        if entry is None:
            return
        position = 0
        for size, future in entry.waiters:
            if not future.done():
                future.set_result(list(outcomes[position : position + size]))
            position += size

    def failed(self, group: int, index: int, term: int, error: str) -> None:
        """Entry ``index`` of ``group`` was applied as a failure (see ``EntryFailed``)."""
        entry = self._ours(group, index, term)
        if entry is not None:
            self.refused(entry.waiters, EntryFailed(f"group {group}, entry {index}: {error}"))

    def _ours(self, group: int, index: int, term: int) -> _Entry | None:
        """The waiting entry applied at (group, index) if it is the one applied; callers of
        an entry replaced by another leader's are failed with ``ProposalLost`` here."""
        entry = self._in_log.pop((group, index), None)
        if entry is None:
            return None
        if entry.term != term:
            self.refused(
                entry.waiters,
                ProposalLost(
                    f"group {group}: entry {index} of term {entry.term} was replaced by term "
                    f"{term}'s"
                ),
            )
            return None
        return entry

    def fail_all(self, error: Exception) -> None:
        """Shutdown: nothing more will be applied by this runtime."""
        for queues in self._queued.values():
            for queue in queues:
                self.refused(queue.waiters, error)
        for entry in self._in_log.values():
            self.refused(entry.waiters, error)
        self._queued.clear()
        self._in_log.clear()

    def in_log(self) -> int:
        """Entries proposed and not yet applied."""
        return len(self._in_log)


@dataclass
class _Request:
    request_id: bytes
    waiters: list[asyncio.Future[None]]
    issued_tick: int


@dataclass
class _GroupReads:
    queued: list[asyncio.Future[None]] = field(default_factory=list)
    in_flight: _Request | None = None
    ready: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    """Reads whose read index is known, waiting for the applied index to reach it."""


class Reads:
    def __init__(self, *, reissue_ticks: int = DEFAULT_REISSUE_TICKS) -> None:
        self._reissue_ticks = reissue_ticks
        self._groups: dict[int, _GroupReads] = {}
        self._ids = count(1)
        self._tick = 0
        # What ``requests`` looks at, so that a cycle touches only the groups with work rather
        # than every group that ever had a read: the groups with reads queued (in the order
        # they were first queued), and the requests in flight in the order issued (so by issue
        # tick), whose front is checked for being due again. An entry there may be stale (its
        # request was answered or abandoned since): it is skipped when it comes up.
        self._due: dict[int, None] = {}
        self._issued: deque[tuple[int, int, _Request]] = deque()

    def queue(self, group: int) -> asyncio.Future[None]:
        """A read of ``group``: the future completes when the read may be served locally."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._groups.setdefault(group, _GroupReads()).queued.append(future)
        self._due[group] = None
        return future

    def tick(self) -> None:
        self._tick += 1

    def requests(
        self, busy: Callable[[int], bool] = _never
    ) -> Generator[tuple[int, bytes], None, None]:
        """The ReadIndex requests to issue now: (group, request id) for each group with reads
        queued and no request in flight (or one unanswered for ``reissue_ticks``), but for
        the groups that are ``busy`` (their Ready is out): those ask later."""
        groups = self._groups
        due = self._due
        issued = self._issued
        oldest = self._tick - self._reissue_ticks
        while issued and issued[0][0] <= oldest:
            _, group, request = issued.popleft()
            reads = groups.get(group)
            if reads is not None and reads.in_flight is request:
                due[group] = None  # unanswered for reissue_ticks: ask again
        if not due:
            return
        still_due: dict[int, None] = {}
        self._due = still_due
        order = list(due)
        done = 0
        try:
            for group in order:
                done += 1
                reads = groups[group]
                if busy(group):
                    still_due[group] = None
                    continue
                in_flight = reads.in_flight
                if in_flight is not None:
                    if self._tick - in_flight.issued_tick < self._reissue_ticks:
                        if reads.queued:
                            still_due[group] = None  # asked once the answer is in
                        continue
                    reads.queued[:0] = in_flight.waiters  # asked again, with the newer reads
                    reads.in_flight = None
                waiting = [future for future in reads.queued if not future.done()]
                reads.queued = []
                if not waiting:
                    continue
                request_id = next(self._ids).to_bytes(8, "big")
                request = _Request(request_id, waiting, self._tick)
                reads.in_flight = request
                issued.append((self._tick, group, request))
                yield group, request_id
        finally:
            # A caller that stops iterating early leaves the rest due, as they were.
            for group in order[done:]:
                still_due[group] = None

    def refused(self, group: int, request_id: bytes, error: Exception) -> None:
        """The request could not be issued (this node does not lead the group)."""
        reads = self._groups.get(group)
        if reads is None or reads.in_flight is None or reads.in_flight.request_id != request_id:
            return
        for future in reads.in_flight.waiters:
            if not future.done():
                future.set_exception(error)
        reads.in_flight = None

    def read_state(self, group: int, request_id: bytes, index: int, applied: int) -> None:
        """The core answered ``request_id`` with read index ``index``."""
        reads = self._groups.get(group)
        if reads is None or reads.in_flight is None or reads.in_flight.request_id != request_id:
            return  # an abandoned request: its reads were failed or asked again
        waiters = reads.in_flight.waiters
        reads.in_flight = None
        for future in waiters:
            if index <= applied:
                if not future.done():
                    future.set_result(None)
            else:
                reads.ready.append((index, future))

    def applied(self, group: int, applied: int) -> None:
        reads = self._groups.get(group)
        if reads is None or not reads.ready:
            return
        still: list[tuple[int, asyncio.Future[None]]] = []
        for index, future in reads.ready:
            if index <= applied:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((index, future))
        reads.ready = still

    def leader_changed(self, group: int, leader: int) -> None:
        """The group's leader or term changed: an unanswered request will never be answered."""
        reads = self._groups.get(group)
        if reads is None or reads.in_flight is None:
            return
        for future in reads.in_flight.waiters:
            if not future.done():
                future.set_exception(LeadershipLost(group, leader))
        reads.in_flight = None

    def fail_all(self, error: Exception) -> None:
        for reads in self._groups.values():
            pending = list(reads.queued) + [future for _, future in reads.ready]
            if reads.in_flight is not None:
                pending += reads.in_flight.waiters
            for future in pending:
                if not future.done():
                    future.set_exception(error)
        self._groups.clear()
        self._due.clear()
        self._issued.clear()

    def waiting(self) -> int:
        """Reads not yet answered, all groups."""
        total = 0
        for reads in self._groups.values():
            total += len(reads.queued) + len(reads.ready)
            if reads.in_flight is not None:
                total += len(reads.in_flight.waiters)
        return total
