"""One node's Raft groups behind one sans-IO driver, where an idle group costs nothing.

A node hosts one Raft group per partition it replicates: thousands of them. Ticking every
``RawNode`` ten times a second, each leader heartbeating its followers, would burn a core in
Python while nothing happens (docs/decisions/0004-idle-groups.md has the numbers). So groups
*sleep*: a group with nothing to do is neither ticked nor heartbeats, and node-level liveness
(``peer_alive``, from the transport) stands in for the per-group heartbeats it no longer sends.

Sleeping never affects safety, which the core guarantees whatever is ticked; it only delays
elections, and every event that needs an election wakes the groups concerned:

* A group may sleep only when *settled*: nothing for the runtime to do, every entry committed
  and applied, no read or leadership transfer pending; a leader additionally knows that every
  live follower holds its whole log; a follower has a leader whose node is alive.
* A settled leader heartbeats ``LEADER_QUIET_TICKS`` more ticks (carrying the final commit
  index to its followers), then sleeps. A settled follower sleeps once it has heard nothing for
  ``election_tick - FOLLOWER_SLEEP_MARGIN`` ticks, so it sleeps before it could campaign, and
  keeps its leader lease (which only ticking would expire) for as long as it sleeps: as long as
  its leader's node is alive, nobody can take the group over. This is checked before ticking,
  so a follower woken by a vote request falls asleep again without moving towards the end of
  its lease.
* A group wakes on a local proposal or read, on any request from a peer (and on a response
  that leaves it work), when its leader's node dies (then its followers forget that leader and
  the group's successor campaigns at once), and, for a leader, when a follower's node comes
  back (to catch it up, or to tell a resumed stale leader the new term) or when too few of its
  voters' nodes are alive (so that it steps down instead of advertising a leadership it lost).

The runtime calls ``tick``, ``step``, ``propose``, ``read_index`` and ``peer_alive`` as things
happen, and in each cycle ``collect`` (every group's Ready, and their messages grouped by
destination node), persists and applies it all, sends the messages, then ``advance``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from kv_raft import NO_NODE, Config, Message, MessageType, RawNode, Ready, Role, Storage
from kv_raft.types import DEFAULT_ELECTION_TICK, DEFAULT_HEARTBEAT_TICK, RESPONSE_TYPES

LEADER_QUIET_TICKS = 1
"""Ticks a settled leader keeps heartbeating before it sleeps. The core already sends the new
commit index to every follower the moment it advances (an append with no entries); this
heartbeat carries it once more, for a follower that lost that append. Each quiet tick costs a
heartbeat and its answer per follower, for every write to a group that was asleep: at 3 (the
first value, decision 0004) they were 12 of a put's 20 messages. A follower that misses both
only applies late, which no read waits for: reads are served by leaders."""

FOLLOWER_SLEEP_MARGIN = 2
"""A settled follower sleeps after ``election_tick - FOLLOWER_SLEEP_MARGIN`` silent ticks: before
its earliest election timeout (``election_tick``), so an idle follower never campaigns, yet close
to it, so that a follower woken by its leader's death campaigns after only a few ticks."""

QUORUM_GRACE_TICKS = 3
"""Ticks a leader told its live quorum is gone waits before CheckQuorum: two heartbeat rounds
(one a tick) and their answers, so that only a quorum that really went silent deposes it."""

_VOTE_REQUESTS = frozenset({MessageType.VOTE, MessageType.PRE_VOTE})


class GroupMessage(NamedTuple):
    """A Raft message of one group, as it travels between nodes: a (group, message) pair, so
    that a destination's messages go to the transport as they are, without a copy."""

    group: int
    message: Message


@dataclass(frozen=True, slots=True)
class GroupReady:
    group: int
    ready: Ready

    @property
    def writes(self) -> bool:
        """Whether the store has anything to do for this Ready: a snapshot to install, entries
        to append, a hard state to set or entries to apply. A Ready without any of these (only
        messages, read states or a soft-state change) promises nothing that a write would
        make durable, so the contract's "persist, then send" holds for it at once."""
        rd = self.ready
        return bool(
            rd.entries
            or rd.committed_entries
            or rd.hard_state is not None
            or rd.snapshot is not None
        )


@dataclass(frozen=True, slots=True)
class Cycle:
    """One batch of work for the runtime: send ``early`` at once, persist and apply every Ready
    that ``writes`` (in one durable write), then send ``outbox``, then ``advance``.

    Both maps hold the Readies' messages regrouped by destination raft id, in group order:
    ``outbox`` those of Readies that write, which may not leave before that write is durable;
    ``early`` those of Readies that write nothing (a leader's ReadIndex and heartbeat rounds,
    a follower's answers to them), which need not wait for an unrelated group's fsync.
    """

    readies: tuple[GroupReady, ...]
    outbox: Mapping[int, tuple[GroupMessage, ...]]
    early: Mapping[int, tuple[GroupMessage, ...]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.readies


@dataclass(slots=True)
class DriverStats:
    """Counters for tests, metrics and the idle-CPU measurement."""

    raw_ticks: int = 0
    proposals: int = 0
    """Entries this node proposed as leader (each may carry many callers' writes)."""
    sleeps: int = 0
    wakes: int = 0
    unknown_group_messages: int = 0


def group_rng(seed: int, node_id: int, group: int) -> random.Random:
    """Each group's election jitter, fixed by (seed, node, group) so that runs replay exactly."""
    return random.Random(f"multiraft:{seed}:{node_id}:{group}")


class MultiRaft:
    """The Raft groups of one node (raft id ``node_id``); no I/O, no clock, no threads."""

    def __init__(
        self,
        node_id: int,
        groups: Mapping[int, Collection[int]],
        storages: Mapping[int, Storage],
        *,
        seed: int = 0,
        election_tick: int = DEFAULT_ELECTION_TICK,
        heartbeat_tick: int = DEFAULT_HEARTBEAT_TICK,
        applied: Mapping[int, int] | None = None,
        quiescence: bool = True,
    ) -> None:
        """``groups`` maps each hosted group to its founding voters (raft ids), ``storages`` each
        group to what its runtime persisted, ``applied`` each group to the index its state
        machine holds (after a restart). ``quiescence=False`` ticks every group forever (only
        for measuring what sleeping saves)."""
        self.id = node_id
        self.stats = DriverStats()
        self._election_tick = election_tick
        self._quiescence = quiescence
        self._follower_sleep_ticks = max(heartbeat_tick + 1, election_tick - FOLLOWER_SLEEP_MARGIN)
        if self._follower_sleep_ticks >= election_tick:
            raise ValueError(
                f"election_tick {election_tick} leaves no silent ticks for a follower to sleep "
                f"after before it could campaign (heartbeat_tick {heartbeat_tick})"
            )
        applied = applied or {}
        self._nodes: dict[int, RawNode] = {}
        self._founders: dict[int, tuple[int, ...]] = {}
        for group, voters in groups.items():
            if node_id not in voters:
                raise ValueError(f"group {group}: node {node_id} is not among voters {voters}")
            config = Config(
                id=node_id,
                rng=group_rng(seed, node_id, group),
                election_tick=election_tick,
                heartbeat_tick=heartbeat_tick,
                applied=applied.get(group, 0),
            )
            self._nodes[group] = RawNode(config, storages[group])
            self._founders[group] = tuple(sorted(voters))
        self._alive: dict[int, bool] = {}
        # Ordered dicts rather than sets where iteration order decides what happens next, so a
        # seed replays exactly whatever the hash seed.
        self._awake: dict[int, None] = dict.fromkeys(self._nodes)
        self._asleep: dict[int, int] = {}  # sleeping group -> its leader when it fell asleep
        self._sleepers: dict[int, dict[int, None]] = {}  # leader raft id -> its sleeping groups
        self._quiet: dict[int, int] = {}  # awake settled leader -> quiet ticks so far
        self._dirty: dict[int, None] = dict.fromkeys(self._nodes)  # may have a Ready
        self._pending_reads: dict[int, tuple[int, set[bytes]]] = {}  # group -> (term, ids)
        self._leader_lost: dict[int, int] = {}  # group -> leader seen campaigning
        self._in_cycle: set[int] = set()  # groups of outstanding cycles
        self._outstanding: list[Cycle] = []

    # -- queries ---------------------------------------------------------------------------------
    @property
    def groups(self) -> Collection[int]:
        return self._nodes.keys()

    def leader(self, group: int) -> int:
        return self._nodes[group].leader

    def role(self, group: int) -> Role:
        return self._nodes[group].role

    def term(self, group: int) -> int:
        return self._nodes[group].term

    def raw_node(self, group: int) -> RawNode:
        """The group's core, to look at (committed, applied, log); drive it only through here."""
        return self._nodes[group]

    def alive(self, peer: int) -> bool:
        """The last verdict ``peer_alive`` applied on ``peer`` (alive until told otherwise)."""
        return self._alive.get(peer, True)

    def busy(self, group: int) -> bool:
        """Whether ``group``'s Ready is out (collected, not yet advanced). Nothing may be fed
        to a busy group; its messages, writes and reads wait until ``advance``."""
        return group in self._in_cycle

    def is_asleep(self, group: int) -> bool:
        return group in self._asleep

    @property
    def awake_count(self) -> int:
        return len(self._awake)

    @property
    def asleep_count(self) -> int:
        return len(self._asleep)

    def preferred_leader(self, group: int) -> int:
        """The founding voter that ``campaign_preferred`` makes lead ``group``: spread evenly."""
        founders = self._founders[group]
        return founders[group % len(founders)]

    # -- input -----------------------------------------------------------------------------------
    def tick(self) -> None:
        """One driver tick: each awake group either falls asleep or is ticked once. A busy
        group misses the tick (time in Raft is a lower bound)."""
        in_cycle = self._in_cycle
        for group in list(self._awake):
            if group in in_cycle:
                continue
            node = self._nodes[group]
            if self._quiescence and self._settled(group, node):
                if node.role is Role.LEADER:
                    quiet = self._quiet.get(group, 0) + 1
                    if quiet > LEADER_QUIET_TICKS:
                        self._sleep(group, node)
                        continue
                    self._quiet[group] = quiet
                elif node.election_elapsed >= self._follower_sleep_ticks:
                    self._sleep(group, node)
                    continue
            else:
                self._quiet.pop(group, None)
            node.tick()
            self.stats.raw_ticks += 1
            self._dirty[group] = None

    def step(self, group: int, message: Message) -> None:
        """Feed one message that a peer sent to ``group`` (not ``busy``)."""
        node = self._nodes.get(group)
        if node is None:
            self.stats.unknown_group_messages += 1
            return
        self._check_idle(group)
        if (
            message.type in _VOTE_REQUESTS
            and message.frm == node.leader
            and node.role is Role.FOLLOWER
            and message.term > node.term
        ):
            # Our leader campaigns: it restarted faster than the transport noticed. Our lease
            # would refuse it for as long as we sleep; stay awake so that the lease expires.
            self._leader_lost[group] = message.frm
        node.step(message)
        self._dirty[group] = None
        if group in self._asleep and (
            message.type not in RESPONSE_TYPES or node.has_ready() or not self._settled(group, node)
        ):
            self._wake(group)

    def propose(self, group: int, data: bytes) -> int:
        """Append ``data`` to ``group``'s log; returns its index. Raises NotLeader (with the
        leader this node knows) or ProposalDropped, as ``RawNode.propose`` does."""
        self._check_idle(group)
        index = self._nodes[group].propose(data)
        self.stats.proposals += 1
        self._dirty[group] = None
        self._wake(group)
        return index

    def read_index(self, group: int, request_id: bytes) -> None:
        """Ask for a linearizable read of ``group``; its ReadState comes in a later cycle (or
        never, if leadership is lost first). Raises NotLeader as ``RawNode.read_index`` does."""
        self._check_idle(group)
        node = self._nodes[group]
        node.read_index(request_id)
        term, ids = self._pending_reads.get(group, (node.term, set()))
        if term != node.term:
            ids = set()
        ids.add(request_id)
        self._pending_reads[group] = (node.term, ids)
        self._dirty[group] = None
        self._wake(group)

    def campaign(self, group: int) -> None:
        """Start an election in ``group`` now (bootstrap, tests)."""
        self._check_idle(group)
        self._nodes[group].campaign()
        self._dirty[group] = None
        self._wake(group)

    def campaign_preferred(self) -> None:
        """At start, campaign at once in the groups this node is the preferred leader of, rather
        than waiting an election timeout in each (all replicas of a new group are alike, so the
        pre-vote succeeds). Where a leader already exists its followers' leases refuse it."""
        for group in self._nodes:
            if self.preferred_leader(group) == self.id:
                self.campaign(group)

    def peer_connected(self, peer: int) -> None:
        """Our stream to ``peer`` came up. Messages to a peer are dropped until then, so at
        start the campaigns of ``campaign_preferred`` may have reached nobody: campaign again
        in the groups this node is the preferred leader of that include ``peer`` and still
        know no leader (a scan of every group, but only when a link comes up)."""
        for group, node in self._nodes.items():
            if (
                node.leader == NO_NODE
                and node.role != Role.LEADER
                and self.preferred_leader(group) == self.id
                and peer in node.voters
            ):
                self.campaign(group)

    def peer_alive(self, peer: int, alive: bool) -> None:
        """The transport's verdict on a peer node: its frames stopped (False) or resumed (True).

        A restart of a peer must be reported as a death and a revival (a new incarnation), or
        its groups recover only when it campaigns (see ``step``)."""
        if peer == self.id or self._alive.get(peer, True) == alive:
            return
        if self._outstanding:
            raise RuntimeError("peer_alive() while a cycle is out: it may touch any group")
        self._alive[peer] = alive
        led_here = list(self._sleepers.get(self.id, ()))
        if alive:
            for group in led_here:
                if self._nodes[group].raft.trk.is_member(peer):
                    self._wake(group)
            return
        orphans = list(self._sleepers.get(peer, ()))
        orphans += [g for g in self._awake if self._nodes[g].leader == peer]
        for group in orphans:
            self._leader_died(group, peer)
        for group in led_here:
            voters = self._nodes[group].voters
            if peer in voters and not self._live_quorum(voters):
                self._wake(group)
        self._check_quorum_now(peer)

    # -- leadership hand-off (a stopping node) ------------------------------------------------
    def hand_off(self) -> int:
        """Move the leadership of every group led here to another voter, before this node stops.

        Each such group transfers to its most up-to-date live voter (the core sends it
        TimeoutNow once it holds the whole log, so it wins at once, with no election timeout and
        no lost write). A transfer already under way is left alone; one the core abandoned (it
        gives up after an election timeout) is started again. Called every cycle while the node
        stops, so that a group this node comes to lead again meanwhile is handed off too.
        Returns how many groups it still leads and can hand to someone; 0 means done (a group
        with no live voter besides this node cannot be handed off, and is not counted)."""
        moving = 0
        for group, node in self._nodes.items():
            if node.role is not Role.LEADER:
                continue
            if node.raft.lead_transferee != NO_NODE or group in self._in_cycle:
                moving += 1  # under way, or busy (its Ready is out): a later cycle moves it
                continue
            to = self._transferee(node)
            if to == NO_NODE:
                continue
            node.transfer_leadership(to)
            self._dirty[group] = None
            self._wake(group)
            moving += 1
        return moving

    def _check_quorum_now(self, dead: int) -> None:
        """Leaders that just lost a live quorum (``dead`` was one too many) ask CheckQuorum
        within ``QUORUM_GRACE_TICKS``, rather than at the end of their window (up to two
        election timeouts away: the window running when the peers went silent may still count
        them).

        The transport declares a peer dead after an election timeout without a frame from it,
        so its silence already spans a full window; the dead peers are marked inactive, and the
        grace lets a peer that does answer (a wrong verdict: this node's own loop stalled, and
        the frames were waiting) be heard from first. Afterwards a cut-off leader refuses new
        calls as NOT_LEADER, so callers go to the side that can elect a leader. Stepping down
        early is always safe; it only costs this side its leadership."""
        alive = self._alive
        last_tick = self._election_tick - QUORUM_GRACE_TICKS
        for group, node in self._nodes.items():
            if node.role is not Role.LEADER or dead not in node.voters:
                continue
            if self._live_quorum(node.voters):
                continue
            self._wake(group)
            raft = node.raft
            for peer, progress in raft.prs.items():
                if peer != self.id and not alive.get(peer, True):
                    progress.recent_active = False
            raft.election_elapsed = max(raft.election_elapsed, last_tick)
            self._dirty[group] = None

    def transferee(self, group: int) -> int:
        """The voter ``group``'s leadership is being handed to (``NO_NODE`` when none): the
        leader to name to callers meanwhile, since the core refuses proposals until it ends."""
        return self._nodes[group].raft.lead_transferee

    def _transferee(self, node: RawNode) -> int:
        """The live voter (besides us) whose log matches ours furthest; ties go to the lowest id
        so that every run of a seed picks the same one."""
        alive = self._alive
        best, best_match = NO_NODE, -1
        for peer in sorted(node.voters):
            if peer == self.id or not alive.get(peer, True):
                continue
            match = node.prs[peer].match
            if match > best_match:
                best, best_match = peer, match
        return best

    # -- output ----------------------------------------------------------------------------------
    def collect(self) -> Cycle:
        """Every Ready of the groups that may have one (never a scan of all groups), their
        messages split by whether they wait for the cycle's write (``Cycle``).

        A cycle may be collected while earlier ones are out (their writes being flushed):
        it holds none of their groups, which stay dirty until their cycle is advanced."""
        readies: list[GroupReady] = []
        outbox: dict[int, list[GroupMessage]] = {}
        early: dict[int, list[GroupMessage]] = {}
        in_cycle = self._in_cycle
        later: dict[int, None] = {}
        for group in self._dirty:
            if group in in_cycle:
                later[group] = None
                continue
            node = self._nodes[group]
            if not node.has_ready():
                continue
            ready = node.ready()
            item = GroupReady(group, ready)
            readies.append(item)
            self._in_cycle.add(group)
            box = outbox if item.writes else early
            for message in ready.messages:
                box.setdefault(message.to, []).append(GroupMessage(group, message))
            self._note_ready(group, node, ready)
        self._dirty = later
        cycle = Cycle(
            tuple(readies),
            {to: tuple(msgs) for to, msgs in outbox.items()},
            {to: tuple(msgs) for to, msgs in early.items()},
        )
        if readies:
            self._outstanding.append(cycle)
        return cycle

    def advance(self, cycle: Cycle) -> None:
        """The runtime persisted, sent and applied ``cycle`` (one that ``collect`` returned
        and that is not advanced yet; cycles may be advanced in any order)."""
        if not cycle.readies:
            return
        if not any(out is cycle for out in self._outstanding):
            raise RuntimeError("advance() takes a cycle that collect() returned, once")
        self._outstanding = [out for out in self._outstanding if out is not cycle]
        for item in cycle.readies:
            self._nodes[item.group].advance(item.ready)
            self._dirty[item.group] = None
            self._in_cycle.discard(item.group)

    def _check_idle(self, group: int) -> None:
        if group in self._in_cycle:
            raise RuntimeError(f"group {group} is busy: its Ready is out until advance()")

    # -- sleeping and waking ---------------------------------------------------------------------
    def _settled(self, group: int, node: RawNode) -> bool:
        if group in self._in_cycle or group in self._pending_reads or node.has_ready():
            return False
        last = node.log.last_index()
        if node.committed != last or node.applied != last:
            return False
        role = node.role
        if role is Role.LEADER:
            if node.raft.lead_transferee != NO_NODE:
                return False
            alive = self._alive
            for peer, progress in node.prs.items():
                if progress.match != last and peer != self.id and alive.get(peer, True):
                    return False
            # A leader without a live quorum stays awake until CheckQuorum deposes it.
            return self._live_quorum(node.voters)
        leader = node.leader
        return (
            role is Role.FOLLOWER
            and leader != NO_NODE
            and self._alive.get(leader, True)
            and self._leader_lost.get(group) != leader
        )

    def _leader_died(self, group: int, leader: int) -> None:
        """Elect a new leader now rather than after an election timeout.

        The follower forgets its leader, so that it grants pre-votes at once instead of keeping
        the lease of a leader it knows is dead; and the successor (the first live voter in the
        group's preference order, the same on every survivor) campaigns at once. A survivor that
        still believes the leader alive keeps refusing, so a node cut off from the leader alone
        cannot depose it; then the normal election timeout takes over.
        """
        self._wake(group)
        node = self._nodes[group]
        if node.role is not Role.FOLLOWER or node.leader != leader:
            return
        _forget_leader(node)
        self._dirty[group] = None
        if self._successor(group) == self.id:
            node.campaign()

    def _successor(self, group: int) -> int:
        founders = self._founders[group]
        alive = self._alive
        for i in range(len(founders)):
            candidate = founders[(group + i) % len(founders)]
            if candidate == self.id or alive.get(candidate, True):
                return candidate
        return self.id

    def _live_quorum(self, voters: Collection[int]) -> bool:
        alive = self._alive
        live = sum(1 for v in voters if v == self.id or alive.get(v, True))
        return live > len(voters) // 2

    def _sleep(self, group: int, node: RawNode) -> None:
        del self._awake[group]
        self._quiet.pop(group, None)
        leader = node.leader
        self._asleep[group] = leader
        self._sleepers.setdefault(leader, {})[group] = None
        self.stats.sleeps += 1

    def _wake(self, group: int) -> None:
        leader = self._asleep.pop(group, None)
        if leader is None:
            return
        del self._sleepers[leader][group]
        self._awake[group] = None
        self._dirty[group] = None
        self.stats.wakes += 1
        node = self._nodes[group]
        if node.role is Role.LEADER:
            _restart_check_quorum_window(node)

    def _note_ready(self, group: int, node: RawNode, ready: Ready) -> None:
        pending = self._pending_reads.get(group)
        if pending is not None:
            term, ids = pending
            for state in ready.read_states:
                ids.discard(state.request_id)
            # The core drops queued reads when it loses leadership; so do we, or the group
            # would wait for ReadStates that never come and stay awake forever.
            if not ids or term != node.term or node.role is not Role.LEADER:
                del self._pending_reads[group]
        suspect = self._leader_lost.get(group)
        if suspect is not None and node.leader != suspect:
            del self._leader_lost[group]


def _restart_check_quorum_window(node: RawNode) -> None:
    """A waking leader judges its quorum on what it hears from now on, not before it slept.

    CheckQuorum looks at which followers were heard from since the last check. After a sleep
    those marks are stale: set by answers to heartbeats sent long ago (so a leader whose
    followers all died meanwhile would hold on for a second window), or not set for lack of
    heartbeats. Restarting the window gives the leader one full election timeout of fresh
    heartbeats. This only delays a step-down (never a safety matter: reads are confirmed by
    ReadIndex heartbeats, not by a lease). It reaches into the core because the core has no hook
    for it yet; ``RawNode.wake()`` doing exactly this would be the clean way
    (docs/decisions/0004-idle-groups.md).
    """
    raft = node.raft
    raft.election_elapsed = 0
    for peer, progress in raft.prs.items():
        if peer != raft.id:
            progress.recent_active = False


def _forget_leader(node: RawNode) -> None:
    """A follower that knows its leader's node is dead stops honouring that leader's lease.

    With PreVote and CheckQuorum a follower refuses pre-votes for an election timeout after it
    last heard from its leader; one that slept keeps that lease for as long as it sleeps. Told by
    node-level liveness that the leader is gone, it drops the leader (staying a follower in its
    term, without campaigning), so that the survivors can elect a successor at once. etcd's raft
    has exactly this as ``RawNode.ForgetLeader``; ours has no such hook yet, so the driver sets
    the field (docs/decisions/0004-idle-groups.md).
    """
    node.raft.lead = NO_NODE
