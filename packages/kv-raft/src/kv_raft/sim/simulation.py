"""A whole Raft cluster in one process, on one seeded RNG, with faults and continuous checking.

The simulator plays every role around the core: the runtime of each node (persist, send, apply,
advance), the network, the disks that lose what was not persisted, the clients, and an operator
who changes membership and moves leadership. Everything random draws from ``random.Random(seed)``,
so a seed replays a run exactly.

A run has two phases. During the first ``ticks`` ticks faults are injected; then they stop (the
network heals, crashed nodes restart) and the cluster has ``liveness_ticks`` ticks to elect a
leader, commit everything and answer every client: if it does not, that is a liveness failure.
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass, field

from kv_raft.faults import parse_bug
from kv_raft.node import NotLeader, ProposalDropped, RawNode
from kv_raft.sim.checker import InvariantViolation, SafetyChecker
from kv_raft.sim.disk import Fate, SimDisk
from kv_raft.sim.kvstore import Command, Kind, KVStateMachine
from kv_raft.sim.linearizability import CheckTimeout, Op, check_history
from kv_raft.sim.network import Network
from kv_raft.sim.statecheck import StateChecker
from kv_raft.storage import MemoryStorage, StorageError
from kv_raft.types import (
    NO_NODE,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Ready,
    Role,
)

# Time is counted in sub-ticks: a tick (the core's unit, ~100 ms in a real node) is split so that
# message delays and each node's own ticks can fall between two ticks of another node.
SUBTICKS = 8
# A LAN message arrives within this many sub-ticks (0 = the same sub-tick, a later round).
LAN_DELAY = 1
# Delivery rounds per sub-tick: zero-delay messages can make several round trips in one.
MAX_ROUNDS = 6
# A client waits up to this many sub-ticks between one answer and its next call.
CLIENT_THINK = SUBTICKS
# Per tick, an eager operator tries another membership change or transfer: most are refused
# while one is in flight, which is the rule under test.
EAGER_OPERATOR = 0.3
# A slow state machine applies at most this many entries at a time.
APPLY_BATCH = 16
# Share of seeds that run the "storm" fault profile.
STORM_SHARE = 0.3
# In storms: chance that a leader crashes after persisting a Ready but before sending it (just
# elected / any other Ready).
NEW_LEADER_CRASH = 0.5
LEADER_CRASH = 0.05
# History timestamps are tick * CLOCK_PER_TICK + a global event counter: strictly increasing, and
# the tick is readable in a failure report.
CLOCK_PER_TICK = 1_000_000


@dataclass(frozen=True)
class SimConfig:
    seed: int
    nodes: int = 3
    ticks: int = 1200
    """Ticks with faults injected."""
    liveness_ticks: int = 300
    """After faults stop: the bound within which the cluster must be live again."""
    clients: int = 3
    keys: int = 3
    election_tick: int = 10
    heartbeat_tick: int = 1
    snapshot_every: int = 40
    snapshot_keep: int = 4
    # Small limits so that batching, pipelining and flow control are exercised constantly.
    max_size_per_msg: int = 96
    max_inflight_msgs: int = 4
    max_inflight_bytes: int = 512
    client_timeout: int = 30
    membership: bool = True
    transfers: bool = True
    bug: str | None = None
    storm: bool = False
    """Run every seed with the storm fault profile (the default mixes calm and stormy seeds)."""
    # Pin one part of the drawn profile (to aim a planted-bug test at the fault it needs).
    skew: float | None = None
    pre_vote: bool | None = None
    operator: float | None = None

    def replay_command(self) -> str:
        cmd = (
            f"PYTHONPATH=packages/kv-raft/src python -m kv_raft.sim --seed {self.seed} "
            f"--nodes {self.nodes} --ticks {self.ticks}"
        )
        if self.liveness_ticks != SimConfig.liveness_ticks:
            cmd += f" --liveness-ticks {self.liveness_ticks}"
        if self.bug:
            cmd += f" --bug {self.bug}"
        if self.storm:
            cmd += " --storm"
        if self.skew is not None:
            cmd += f" --skew {self.skew}"
        if self.pre_vote is not None:
            cmd += " --pre-vote" if self.pre_vote else " --no-pre-vote"
        if self.operator is not None:
            cmd += f" --operator {self.operator}"
        return cmd


@dataclass
class FaultProfile:
    """Fault intensities, drawn per seed so that seeds range from calm to stormy."""

    crash: float
    # Chance, per stepped message and per Ready, of a crash at that point: after a step (its
    # changes never persisted) or after persisting a Ready but before sending or applying it.
    crash_before_persist: float
    mean_downtime: int
    partition: float
    mean_partition: int
    admin: float
    # Both protocol options are safe either way; without them elections churn far more.
    pre_vote: bool
    check_quorum: bool
    fsync_fail: float
    """Per fsync: it fails and the runtime stops the node."""
    pause: float
    """Per node and tick: the process freezes (GC pause, SIGSTOP) for several election timeouts;
    the same chance per Ready of freezing between persisting it and sending it."""
    skew: float
    """Each node's clock runs at 1 +- up to this fraction of the nominal tick rate."""
    apply_lag: int
    """0: apply in the Ready that commits. Otherwise a node applies a batch of what it was handed
    every 1 to ``apply_lag`` sub-ticks (and may crash with entries committed but unapplied)."""
    apply_stall: float
    """Per node and tick (with apply lag): the state machine stalls for election timeouts, as
    behind a slow disk, while the node goes on voting and replicating."""
    storm: bool = False
    leader_fault: float = 0.0
    """Per tick: crash, pause or isolate the current leader (storms only)."""

    @classmethod
    def draw(cls, rng: random.Random, *, storm: bool = False) -> FaultProfile:
        if storm or rng.random() < STORM_SHARE:
            # Elections all the time: quick reboots, short partitions, split votes.
            return cls(
                crash=rng.choice((0.01, 0.03)),
                crash_before_persist=rng.choice((0.0, 0.003)),
                mean_downtime=rng.choice((1, 3, 8)),
                partition=rng.choice((0.02, 0.05)),
                mean_partition=rng.choice((5, 15)),
                admin=rng.choice((0.0, 0.02, EAGER_OPERATOR)),
                pre_vote=rng.random() < 0.2,
                check_quorum=rng.random() < 0.3,
                fsync_fail=rng.choice((0.0, 0.002)),
                pause=rng.choice((0.0, 0.002, 0.005)),
                skew=rng.choice((0.0, 0.2, 0.4)),
                apply_lag=rng.choice((0, 0, 8, 24)),
                apply_stall=rng.choice((0.0, 0.01)),
                storm=True,
                leader_fault=rng.choice((0.02, 0.05, 0.1)),
            )
        return cls(
            crash=rng.choice((0.0, 0.002, 0.005, 0.01, 0.02)),
            crash_before_persist=rng.choice((0.0, 0.001, 0.003)),
            mean_downtime=rng.choice((2, 5, 20, 60)),
            partition=rng.choice((0.0, 0.005, 0.01, 0.03)),
            mean_partition=rng.choice((10, 30, 80)),
            admin=rng.choice((0.0, 0.01, 0.03, EAGER_OPERATOR)),
            pre_vote=rng.random() < 0.6,
            check_quorum=rng.random() < 0.6,
            fsync_fail=rng.choice((0.0, 0.0, 0.0005, 0.002)),
            pause=rng.choice((0.0, 0.001, 0.003)),
            skew=rng.choice((0.0, 0.1, 0.25, 0.4)),
            apply_lag=rng.choice((0, 0, 4, 16, 40)),
            apply_stall=rng.choice((0.0, 0.003, 0.01)),
        )


@dataclass
class RunStats:
    ticks: int = 0
    committed: int = 0
    messages: int = 0
    elections: int = 0
    crashes: int = 0
    partitions: int = 0
    snapshots_sent: int = 0
    conf_changes: int = 0
    ops_ok: int = 0
    ops_unknown: int = 0
    fsync_failures: int = 0
    torn_crashes: int = 0
    """Crashes that kept only a prefix of the unsynced writes."""
    lost_unsynced: int = 0
    """Crashes that lost every unsynced write."""
    pauses: int = 0
    max_apply_lag: int = 0
    """Most entries a node had committed and handed out but not yet applied."""
    cpu_seconds: float = 0.0


@dataclass
class RunResult:
    config: SimConfig
    ok: bool
    failure: str | None
    stats: RunStats
    history: list[Op] = field(default_factory=list)

    def report(self) -> str:
        if self.ok:
            return f"seed {self.config.seed}: ok"
        return (
            f"seed {self.config.seed}: FAILED: {self.failure}\n"
            f"  replay: {self.config.replay_command()}"
        )


class LivenessFailure(AssertionError):
    pass


@dataclass
class ClientOp:
    op_id: str
    kind: Kind
    key: str
    value: str | None
    expected: str | None
    call: int
    call_tick: int
    deadline: int
    read_floor: int = 0
    """Log index of the latest write to the key acknowledged before this op was called."""
    submitted: bool = False


class SimClient:
    def __init__(self, client_id: int, sim: Simulation) -> None:
        self.id = client_id
        self.sim = sim
        self.target = NO_NODE
        self.op: ClientOp | None = None
        self.next_at = 0
        self.seq = 0
        self.last_seen: dict[str, str | None] = {}

    def act(self, now: int, may_start: bool) -> None:
        sim = self.sim
        op = self.op
        if op is not None and now >= op.deadline:
            if op.submitted:
                sim.record(self, op, None, None)
                sim.stats.ops_unknown += 1
            # Like a real client after a timeout: suspect the node, try another one.
            self.target = sim.rng.choice(sim.node_ids)
            self.op = None
            self.next_at = sim.now_sub() + sim.rng.randint(0, CLIENT_THINK)
            op = None
        if op is None:
            if not may_start or sim.now_sub() < self.next_at:
                return
            op = self.op = self._new_op(now)
        if not op.submitted:
            self._submit(op)

    def _new_op(self, now: int) -> ClientOp:
        rng = self.sim.rng
        self.seq += 1
        op_id = f"c{self.id}.{self.seq}"
        key = f"k{rng.randrange(self.sim.cfg.keys)}"
        r = rng.random()
        value: str | None = None
        expected: str | None = None
        kind: Kind
        if r < 0.4:
            kind = "get"
        elif r < 0.75:
            kind, value = "put", op_id
        else:
            kind, value = "cas", op_id
            written = self.sim.written.get(key, [])
            if rng.random() < 0.6:
                expected = self.last_seen.get(key)
            elif written and rng.random() < 0.8:
                expected = rng.choice(written[-3:])
        return ClientOp(
            op_id,
            kind,
            key,
            value,
            expected,
            call=self.sim.clock(),
            call_tick=now,
            deadline=now + self.sim.cfg.client_timeout,
            read_floor=self.sim.states.read_floor(key),
        )

    def _submit(self, op: ClientOp) -> None:
        sim = self.sim
        node = sim.nodes.get(self.target)
        if node is None or node.raw is None:
            self.target = sim.rng.choice(sim.node_ids)
            return
        if node.paused_until:
            return  # the call hangs on a frozen process until the client times out
        raw = node.raw
        try:
            if op.kind == "get":
                raw.read_index(op.op_id.encode())
                node.pending_reads[op.op_id.encode()] = self
            else:
                cmd = Command(op.op_id, op.kind, op.key, op.value, op.expected)
                raw.propose(cmd.encode())
                node.pending_props[op.op_id] = self
            op.submitted = True
            sim.process_ready(node)
        except NotLeader as e:
            self.target = e.leader if e.leader != NO_NODE else sim.rng.choice(sim.node_ids)
        except ProposalDropped:
            pass

    def complete(self, op_id: str, output: str | bool | None) -> bool:
        op = self.op
        if op is None or op.op_id != op_id:
            return False
        self.sim.record(self, op, output, self.sim.clock())
        self.sim.stats.ops_ok += 1
        if op.kind == "get":
            assert not isinstance(output, bool)
            self.last_seen[op.key] = output
        elif op.kind == "put" or output is True:
            self.last_seen[op.key] = op.value
        self.op = None
        self.next_at = self.sim.now_sub() + self.sim.rng.randint(0, CLIENT_THINK)
        return True


class SimNode:
    """One node's process: its disk, its Raft core and state machine, and its runtime state."""

    def __init__(self, node_id: int, storage: MemoryStorage, rate: float) -> None:
        self.id = node_id
        self.disk = SimDisk(storage)
        self.raw: RawNode | None = None
        self.kv = KVStateMachine()
        self.down_until = 0
        self.pending_props: dict[str, SimClient] = {}
        self.pending_reads: dict[bytes, SimClient] = {}
        self.waiting_reads: list[tuple[int, bytes, SimClient]] = []
        # Time: this node ticks every ``period`` sub-ticks (its clock may run fast or slow).
        self.period = SUBTICKS / rate
        self.next_tick = 0.0
        # A frozen process: messages for it wait in ``inbox``; ``held`` is a Ready it persisted
        # but had not yet sent when it froze.
        self.paused_until = 0
        self.inbox: list[Message] = []
        self.held: Ready | None = None
        # Committed entries handed out by the core and not yet applied (apply lag).
        self.apply_queue: list[Entry] = []
        self.apply_stalled_until = 0
        self.next_apply = 0  # sub-tick of the next batch

    @property
    def storage(self) -> MemoryStorage:
        return self.disk.live

    @property
    def running(self) -> bool:
        return self.raw is not None and not self.paused_until


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self._bugs = frozenset() if cfg.bug is None else frozenset({parse_bug(cfg.bug)})
        self.rng = random.Random(cfg.seed)
        self.profile = FaultProfile.draw(self.rng, storm=cfg.storm)
        if cfg.skew is not None:
            self.profile.skew = cfg.skew
        if cfg.pre_vote is not None:
            self.profile.pre_vote = cfg.pre_vote
        if cfg.operator is not None:
            self.profile.admin = cfg.operator
        self.network = Network(self.rng)
        self.checker = SafetyChecker()
        self.states = StateChecker()
        self.stats = RunStats()
        self.history: list[Op] = []
        self.written: dict[str, list[str]] = {}
        self.now = 0
        self._sub = 0  # the sub-tick within ``now`` being simulated
        self._clock = 0
        self.node_ids = list(range(1, cfg.nodes + 1))
        conf = ConfState(voters=frozenset(self.node_ids))
        skew = self.profile.skew
        self.nodes = {
            i: SimNode(i, MemoryStorage(conf), 1 + self.rng.uniform(-skew, skew))
            for i in self.node_ids
        }
        for node in self.nodes.values():
            self._start(node)
        self.clients = [SimClient(c, self) for c in range(1, cfg.clients + 1)]
        self._draw_network_faults()
        self._partition_until = 0

    # -- plumbing ---------------------------------------------------------------------------------
    def now_sub(self) -> int:
        return self.now * SUBTICKS + self._sub

    def clock(self) -> int:
        self._clock += 1
        return self.now * CLOCK_PER_TICK + self._clock

    def record(
        self, client: SimClient, op: ClientOp, output: str | bool | None, ret: int | None
    ) -> None:
        self.history.append(
            Op(
                client=client.id,
                key=op.key,
                kind=op.kind,
                value=op.value,
                expected=op.expected,
                output=output,
                call=op.call,
                ret=ret,
            )
        )

    def _raft_config(self, node: SimNode) -> Config:
        cfg = self.cfg
        return Config(
            id=node.id,
            rng=self.rng,
            election_tick=cfg.election_tick,
            heartbeat_tick=cfg.heartbeat_tick,
            applied=node.storage.snapshot().meta.index,
            # One entry per APPEND in storms: a follower's match then crosses every entry.
            max_size_per_msg=1 if self.profile.storm else cfg.max_size_per_msg,
            max_inflight_msgs=cfg.max_inflight_msgs,
            max_inflight_bytes=cfg.max_inflight_bytes,
            pre_vote=self.profile.pre_vote,
            check_quorum=self.profile.check_quorum,
            async_apply=self.profile.apply_lag > 0,
            bugs=self._bugs,
        )

    def _start(self, node: SimNode) -> None:
        snapshot = node.storage.snapshot()
        node.kv = KVStateMachine.restore(snapshot.data)
        self.states.on_snapshot(node.id, snapshot.meta.index, snapshot.data, "restarted from")
        node.raw = RawNode(self._raft_config(node), node.storage)
        node.next_tick = self.now * SUBTICKS + self.rng.random() * node.period
        self.checker.on_restart(node.id, node.storage.hard_state)

    def _crash(self, node: SimNode) -> None:
        fate = node.disk.crash(self.rng)
        if fate == Fate.PREFIX:
            self.stats.torn_crashes += 1
        elif fate == Fate.LOST:
            self.stats.lost_unsynced += 1
        node.raw = None
        node.pending_props.clear()
        node.pending_reads.clear()
        node.waiting_reads.clear()
        node.apply_queue.clear()
        node.inbox.clear()
        node.held = None
        node.paused_until = 0
        node.down_until = self.now + 1 + int(self.rng.expovariate(1 / self.profile.mean_downtime))
        self.stats.crashes += 1

    def _pause(self, node: SimNode) -> None:
        timeouts = self.rng.randint(2, 6)
        node.paused_until = self.now + timeouts * self.cfg.election_tick
        self.stats.pauses += 1

    def _resume(self, node: SimNode) -> None:
        """The process runs again with everything it had in memory and in flight."""
        node.paused_until = 0
        # Ticks missed while frozen are lost (as with a ticker), not replayed in a burst.
        node.next_tick = self.now * SUBTICKS + node.period
        held, node.held = node.held, None
        if held is not None:
            self._finish_ready(node, held)
        inbox, node.inbox = node.inbox, []
        for m in inbox:
            if node.raw is None:
                return
            self._step(node, m)
        self.process_ready(node)

    @property
    def faulty(self) -> bool:
        return self.now < self.cfg.ticks

    # -- faults -----------------------------------------------------------------------------------
    def _draw_network_faults(self) -> None:
        f = self.network.faults
        rng = self.rng
        if self.profile.storm:
            f.drop = rng.choice((0.0, 0.05, 0.15))
            f.duplicate = rng.choice((0.0, 0.05))
            f.delay_prob = rng.choice((0.3, 0.6))
            f.max_delay = rng.choice((10, 25)) * SUBTICKS
            f.late_prob = rng.choice((0.01, 0.05))
            f.max_late = rng.choice((20, 40)) * SUBTICKS
            return
        f.drop = rng.choice((0.0, 0.02, 0.1, 0.2))
        f.duplicate = rng.choice((0.0, 0.02, 0.1))
        f.delay_prob = rng.choice((0.0, 0.1, 0.3))
        f.max_delay = rng.choice((1, 3, 8)) * SUBTICKS
        f.late_prob = rng.choice((0.0, 0.005, 0.02, 0.05))
        f.max_late = rng.choice((20, 60)) * SUBTICKS

    def _inject_faults(self) -> None:
        rng = self.rng
        p = self.profile
        now = self.now
        for node in self.nodes.values():
            if node.raw is None:
                if now >= node.down_until:
                    self._start(node)
            elif node.paused_until:
                if now >= node.paused_until:
                    self._resume(node)
            elif p.crash and rng.random() < p.crash:
                self._crash(node)
            elif p.pause and rng.random() < p.pause:
                self._pause(node)
            if p.apply_stall and rng.random() < p.apply_stall:
                node.apply_stalled_until = now + rng.randint(1, 4) * self.cfg.election_tick
        if self._partition_until and now >= self._partition_until:
            self.network.heal()
            self._partition_until = 0
        elif not self._partition_until and p.partition and rng.random() < p.partition:
            ids = self.node_ids[:]
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            groups = [set(ids[:cut]), set(ids[cut:])]
            self.network.isolate(groups, one_way=rng.random() < 0.3)
            self._partition_until = now + 1 + int(rng.expovariate(1 / p.mean_partition))
            self.stats.partitions += 1
        if p.leader_fault and rng.random() < p.leader_fault:
            leader = self.current_leader()
            if leader is not None:
                r = rng.random()
                if r < 0.6:
                    self._crash(leader)
                elif r < 0.75:
                    self._pause(leader)
                elif not self._partition_until:
                    rest = set(self.node_ids) - {leader.id}
                    self.network.isolate([{leader.id}, rest], one_way=rng.random() < 0.3)
                    self._partition_until = now + 1 + int(rng.expovariate(1 / p.mean_partition))
                    self.stats.partitions += 1
        if rng.random() < 0.002:
            self._draw_network_faults()

    def _stop_faults(self) -> None:
        self.network.heal()
        self._partition_until = 0
        f = self.network.faults
        f.drop = f.duplicate = f.late_prob = 0.0
        f.delay_prob = 0.1
        f.max_delay = 2 * SUBTICKS
        for node in self.nodes.values():
            if node.raw is None:
                self._start(node)
            elif node.paused_until:
                self._resume(node)
            node.apply_stalled_until = 0

    # -- the runtime of each node -----------------------------------------------------------------
    def _after_step(self, node: SimNode) -> None:
        raw = node.raw
        assert raw is not None
        if raw.role == Role.LEADER:
            self.checker.on_leader(raw)
        self.checker.on_commit(node.id, raw.committed)

    def _step(self, node: SimNode, m: Message) -> None:
        raw = node.raw
        assert raw is not None
        term, commit = raw.term, raw.committed
        raw.step(m)
        checker = self.checker
        # A pre-vote grant that completes a pre-election starts the real one, in a new term.
        if m.type == MessageType.PRE_VOTE or (
            m.type == MessageType.PRE_VOTE_RESP
            and not m.reject
            and raw.role not in (Role.CANDIDATE, Role.LEADER)
        ):
            checker.on_pre_vote(node.id, f"a {m.type.name} from {m.frm}", term, raw.term)
        if raw.committed > commit and raw.role != Role.LEADER:
            leader = self.nodes[m.frm].raw
            if leader is not None and leader.term == raw.term and leader.role == Role.LEADER:
                checker.on_follower_commit(raw, leader)
        self._after_step(node)

    def _tick(self, node: SimNode) -> None:
        raw = node.raw
        assert raw is not None
        term, role = raw.term, raw.role
        raw.tick()
        if raw.role == Role.PRE_CANDIDATE and role != Role.PRE_CANDIDATE:
            self.checker.on_pre_vote(node.id, "becoming a pre-candidate", term, raw.term)
        self._after_step(node)

    def _check_leader_commit(self, raw: RawNode) -> None:
        """Called once the leader's commit index advanced and its Ready is persisted.

        Judged twice: on what each node has written (what it would campaign with now) and on
        what it has fsynced (what it would campaign with after a crash).
        """
        commit = raw.committed
        for synced in (False, True):
            durable: dict[int, tuple[int, int, int | None]] = {}
            for node in self.nodes.values():
                storage = node.disk.synced if synced else node.storage
                last = storage.last_index()
                if commit < storage.first_index() - 1:
                    there: int | None = None
                elif commit > last:
                    there = 0
                else:
                    there = storage.term(commit)
                durable[node.id] = (last, storage.term(last), there)
            self.checker.on_leader_commit(raw, durable)

    def _sync(self, node: SimNode) -> bool:
        """fsync; False if it failed, in which case the node has been stopped."""
        if self.faulty and self.profile.fsync_fail and self.rng.random() < self.profile.fsync_fail:
            self.stats.fsync_failures += 1
            self._crash(node)
            return False
        node.disk.sync()
        self.checker.on_durable_commit(node.id, node.disk.synced.hard_state.commit)
        return True

    def process_ready(self, node: SimNode) -> None:
        raw = node.raw
        checker = self.checker
        while raw is not None and node.raw is raw and not node.paused_until and raw.has_ready():
            rd = raw.ready()
            disk = node.disk
            if rd.snapshot is not None:
                disk.apply_snapshot(rd.snapshot)
            if rd.entries:
                disk.append(rd.entries)
                try:
                    prev_term: int | None = disk.live.term(rd.entries[0].index - 1)
                except StorageError:
                    prev_term = None
                checker.on_persist(node.id, rd.entries, prev_term)
            if rd.hard_state is not None:
                disk.set_hard_state(rd.hard_state)
            if rd.must_sync and not self._sync(node):
                return
            p = self.profile
            crash_p = p.crash_before_persist
            if p.storm and raw.role == Role.LEADER:
                # A leader that dies with entries nobody else has: the raw material of Figure 8.
                crash_p = NEW_LEADER_CRASH if rd.soft_state is not None else LEADER_CRASH
            if self.faulty and crash_p and self.rng.random() < crash_p:
                # Persisted but crashed before sending or applying anything.
                self._crash(node)
                return
            if self.faulty and p.pause and self.rng.random() < p.pause:
                node.held = rd  # frozen between the write and the send
                self._pause(node)
                return
            self._finish_ready(node, rd)

    def _finish_ready(self, node: SimNode, rd: Ready) -> None:
        """Steps 2-4 of the Ready contract: send, install and apply (or queue), advance."""
        raw = node.raw
        assert raw is not None
        if rd.hard_state is not None:
            self.checker.on_hard_state_sent(node.id, rd.hard_state)
        now = self.now_sub()
        send = self.network.send
        for m in rd.messages:
            if m.snapshot is not None:
                self.stats.snapshots_sent += 1
            send(m, now)
        if rd.snapshot is not None:
            data = rd.snapshot.data
            self.states.on_snapshot(node.id, rd.snapshot.meta.index, data, "installed")
            node.kv = KVStateMachine.restore(data)
            node.apply_queue.clear()  # everything queued is older than the snapshot
        if self.profile.apply_lag:
            node.apply_queue.extend(rd.committed_entries)
            lag = len(node.apply_queue)
            if lag > self.stats.max_apply_lag:
                self.stats.max_apply_lag = lag
        else:
            for entry in rd.committed_entries:
                self._apply(node, entry)
        for rs in rd.read_states:
            client = node.pending_reads.pop(rs.request_id, None)
            if client is not None:
                node.waiting_reads.append((rs.index, rs.request_id, client))
        raw.advance(rd)
        if rd.hard_state is not None and raw.role == Role.LEADER:
            self._check_leader_commit(raw)
        self._after_apply(node, raw)

    def _after_apply(self, node: SimNode, raw: RawNode) -> None:
        if node.waiting_reads:
            self._serve_reads(node, raw.applied)
        self._maybe_snapshot(node, raw)
        self.checker.on_commit(node.id, raw.committed)

    def _apply_some(self, node: SimNode) -> None:
        """A slow state machine catches up by a batch of what it was handed."""
        raw = node.raw
        assert raw is not None
        batch = self.rng.randint(1, APPLY_BATCH)
        entries, node.apply_queue = node.apply_queue[:batch], node.apply_queue[batch:]
        for entry in entries:
            self._apply(node, entry)
        raw.applied_to(entries[-1].index)
        self._after_apply(node, raw)
        self.process_ready(node)

    def _apply(self, node: SimNode, entry: Entry) -> None:
        self.checker.on_apply(node.id, entry)
        self.states.on_apply(entry)
        if entry.type == EntryType.CONF_CHANGE:
            self.stats.conf_changes += 1
            return
        if not entry.data:
            return
        cmd = Command.decode(entry.data)
        output = node.kv.apply(cmd)
        if cmd.value is not None and (cmd.kind == "put" or output is True):
            self.written.setdefault(cmd.key, []).append(cmd.value)
        client = node.pending_props.pop(cmd.op_id, None)
        if client is not None and client.complete(cmd.op_id, output):
            self.checker.on_ack(entry)
            if cmd.kind == "put" or output is True:
                self.states.on_write_acked(cmd.key, entry.index)

    def _serve_reads(self, node: SimNode, applied: int) -> None:
        still: list[tuple[int, bytes, SimClient]] = []
        for index, rid, client in node.waiting_reads:
            if index <= applied:
                op = client.op
                if op is not None and op.op_id.encode() == rid:
                    value = node.kv.data.get(op.key)
                    self.states.on_read(node.id, op.key, value, op.read_floor)
                    client.complete(op.op_id, value)
            else:
                still.append((index, rid, client))
        node.waiting_reads = still

    def _maybe_snapshot(self, node: SimNode, raw: RawNode) -> None:
        storage = node.storage
        applied = raw.applied
        if applied - storage.snapshot().meta.index < self.cfg.snapshot_every:
            return
        data = node.kv.snapshot()
        self.states.on_snapshot(node.id, applied, data, "took")
        compact_to = max(applied - self.cfg.snapshot_keep, 1)
        node.disk.save_app_snapshot(applied, raw.conf_state, data, compact_to)
        self._sync(node)  # a snapshot is fsynced before the log it replaces is dropped

    # -- one tick ---------------------------------------------------------------------------------
    def _deliver(self, now: int) -> None:
        nodes = self.nodes
        rng = self.rng
        for _ in range(MAX_ROUNDS):
            due = self.network.due(now)
            if not due:
                return
            self.stats.messages += len(due)
            touched: dict[int, SimNode] = {}
            for m in due:
                node = nodes.get(m.to)
                if node is None or node.raw is None:
                    continue
                if node.paused_until:
                    node.inbox.append(m)
                    continue
                self._step(node, m)
                touched[node.id] = node
                p = self.profile.crash_before_persist
                if p and self.faulty and rng.random() < p:
                    self._crash(node)  # whatever this message changed was never persisted
            for node in touched.values():
                self.process_ready(node)

    def _admin(self) -> None:
        """An operator: membership changes one server at a time, and leadership transfers."""
        if not (self.cfg.membership or self.cfg.transfers):
            return
        if self.faulty and self.rng.random() >= self.profile.admin:
            return
        if not self.faulty and self.now % 5:
            return
        leader = self.current_leader()
        if leader is None or leader.raw is None or leader.paused_until:
            return
        raw = leader.raw
        rng = self.rng
        try:
            if self.cfg.membership and raw.learners:
                raw.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, min(raw.learners)))
            elif self.cfg.membership and len(raw.voters) < len(self.node_ids):
                missing = [n for n in self.node_ids if n not in raw.voters]
                raw.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, missing[0]))
            elif not self.faulty:
                return
            elif self.cfg.membership and rng.random() < 0.5:
                others = sorted(raw.voters - {raw.id})
                if others:
                    victim = rng.choice(others)
                    raw.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, victim))
            elif self.cfg.transfers:
                others = sorted(raw.voters - {raw.id})
                if others:
                    raw.transfer_leadership(rng.choice(others))
        except (ProposalDropped, ValueError):
            pass
        self.process_ready(leader)

    def current_leader(self) -> SimNode | None:
        best: SimNode | None = None
        for node in self.nodes.values():
            raw = node.raw
            if raw is None or raw.role != Role.LEADER:
                continue
            if best is None or (best.raw is not None and raw.term > best.raw.term):
                best = node
        return best

    def step_tick(self) -> None:
        cfg = self.cfg
        if self.now == cfg.ticks:
            self._stop_faults()
        if self.faulty:
            self._inject_faults()
        base = self.now * SUBTICKS
        nodes = list(self.nodes.values())
        apply_lag = self.profile.apply_lag
        rng = self.rng
        may_start = self.now < cfg.ticks + cfg.liveness_ticks - cfg.client_timeout - 5
        for sub in range(SUBTICKS):
            self._sub = sub
            now = base + sub
            for node in nodes:
                if node.running and node.next_tick <= now:
                    node.next_tick += node.period
                    self._tick(node)
                    self.process_ready(node)
            for client in self.clients:
                client.act(self.now, may_start)
            if sub == 0:
                self._admin()
            self._deliver(now)
            if apply_lag:
                for node in nodes:
                    if (
                        node.apply_queue
                        and now >= node.next_apply
                        and node.running
                        and self.now >= node.apply_stalled_until
                    ):
                        node.next_apply = now + rng.randint(1, apply_lag)
                        self._apply_some(node)
        self.now += 1

    # -- the whole run ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        start = time.process_time()
        failure: str | None = None
        try:
            for _ in range(cfg.ticks + cfg.liveness_ticks):
                self.step_tick()
            self._check_liveness()
            self._check_end()
        except InvariantViolation as e:
            failure = f"invariant violated at tick {self.now}: {e}"
        except LivenessFailure as e:
            failure = f"liveness: {e}"
        except AssertionError as e:  # LogInvariantError and friends from inside the core
            failure = f"core assertion at tick {self.now}: {type(e).__name__}: {e}"
        except Exception as e:  # any crash of the core or simulator is a failure to replay
            detail = "".join(traceback.format_exception(e)[-3:]).strip()
            failure = f"unexpected exception at tick {self.now}: {detail}"
        stats = self.stats
        stats.ticks = self.now
        stats.committed = self.checker.max_applied
        stats.elections = len(self.checker.leader_of_term)
        stats.cpu_seconds = time.process_time() - start
        return RunResult(cfg, failure is None, failure, stats, self.history)

    def _check_liveness(self) -> None:
        cfg = self.cfg
        leader = self.current_leader()
        if leader is None or leader.raw is None:
            raise LivenessFailure(
                f"no leader {cfg.liveness_ticks} ticks after faults stopped at tick {cfg.ticks}"
            )
        lraw = leader.raw
        members = lraw.voters | lraw.learners
        last = lraw.log.last_index()
        for node_id in sorted(members):
            raw = self.nodes[node_id].raw
            assert raw is not None  # every node restarted when faults stopped
            if raw.term != lraw.term or raw.leader != leader.id:
                raise LivenessFailure(
                    f"node {node_id} (term {raw.term}, leader {raw.leader}) does not follow "
                    f"leader {leader.id} of term {lraw.term}"
                )
            if raw.applied != last:
                raise LivenessFailure(
                    f"node {node_id} applied {raw.applied}, leader {leader.id} has {last} entries "
                    f"{cfg.liveness_ticks} ticks after faults stopped"
                )
        settle = cfg.ticks + cfg.liveness_ticks // 3
        for op in self.history:
            if op.ret is None and op.call > settle * CLOCK_PER_TICK:
                raise LivenessFailure(f"operation {op} issued after tick {settle} timed out")
        for client in self.clients:
            if client.op is not None and client.op.call_tick > settle:
                raise LivenessFailure(f"client {client.id} operation {client.op.op_id} pending")

    def _check_end(self) -> None:
        for client in self.clients:
            op = client.op
            if op is not None and op.submitted:
                self.record(client, op, None, None)
        for node in self.nodes.values():
            if node.raw is not None:
                self.checker.check_acked_writes_kept(node.raw)
        try:
            result = check_history(self.history)
        except CheckTimeout as e:
            raise InvariantViolation(
                "linearizability", f"checker inconclusive for keys {', '.join(e.keys)}"
            ) from e
        if not result.ok:
            raise InvariantViolation(
                "linearizability",
                f"history of key {result.key} is not linearizable: {result.message}",
            )


def run_seed(cfg: SimConfig) -> RunResult:
    return Simulation(cfg).run()
