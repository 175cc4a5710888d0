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
from kv_raft.sim.kvstore import Command, Kind, KVStateMachine
from kv_raft.sim.linearizability import CheckTimeout, Op, check_history
from kv_raft.sim.network import Network
from kv_raft.storage import MemoryStorage, StorageError
from kv_raft.types import (
    NO_NODE,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    Role,
)

# Delivery rounds per tick: a message with zero delay arrives in the same tick, so a tick can hold
# several round trips (a real tick is ~100 ms, a LAN round trip well under 1 ms).
MAX_ROUNDS_PER_TICK = 16
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

    def replay_command(self) -> str:
        cmd = (
            f"PYTHONPATH=packages/kv-node/src python -m kv_raft.sim --seed {self.seed} "
            f"--nodes {self.nodes} --ticks {self.ticks}"
        )
        if self.bug:
            cmd += f" --bug {self.bug}"
        if self.storm:
            cmd += " --storm"
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
    storm: bool = False
    leader_fault: float = 0.0
    """Per tick: crash or isolate the current leader (storms only)."""

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
                admin=rng.choice((0.0, 0.02)),
                pre_vote=rng.random() < 0.2,
                check_quorum=rng.random() < 0.3,
                storm=True,
                leader_fault=rng.choice((0.02, 0.05, 0.1)),
            )
        return cls(
            crash=rng.choice((0.0, 0.002, 0.005, 0.01, 0.02)),
            crash_before_persist=rng.choice((0.0, 0.001, 0.003)),
            mean_downtime=rng.choice((2, 5, 20, 60)),
            partition=rng.choice((0.0, 0.005, 0.01, 0.03)),
            mean_partition=rng.choice((10, 30, 80)),
            admin=rng.choice((0.0, 0.01, 0.03)),
            pre_vote=rng.random() < 0.6,
            check_quorum=rng.random() < 0.6,
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
            self.next_at = now + sim.rng.randint(0, 3)
            op = None
        if op is None:
            if not may_start or now < self.next_at:
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
        )

    def _submit(self, op: ClientOp) -> None:
        sim = self.sim
        node = sim.nodes.get(self.target)
        if node is None or node.raw is None:
            self.target = sim.rng.choice(sim.node_ids)
            return
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
        self.next_at = self.sim.now + self.sim.rng.randint(0, 3)
        return True


class SimNode:
    def __init__(self, node_id: int, storage: MemoryStorage) -> None:
        self.id = node_id
        self.storage = storage
        self.raw: RawNode | None = None
        self.kv = KVStateMachine()
        self.down_until = 0
        self.pending_props: dict[str, SimClient] = {}
        self.pending_reads: dict[bytes, SimClient] = {}
        self.waiting_reads: list[tuple[int, bytes, SimClient]] = []


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self._bugs = frozenset() if cfg.bug is None else frozenset({parse_bug(cfg.bug)})
        self.rng = random.Random(cfg.seed)
        self.profile = FaultProfile.draw(self.rng, storm=cfg.storm)
        self.network = Network(self.rng)
        self.checker = SafetyChecker()
        self.stats = RunStats()
        self.history: list[Op] = []
        self.written: dict[str, list[str]] = {}
        self.now = 0
        self._clock = 0
        self.node_ids = list(range(1, cfg.nodes + 1))
        conf = ConfState(voters=frozenset(self.node_ids))
        self.nodes = {i: SimNode(i, MemoryStorage(conf)) for i in self.node_ids}
        for node in self.nodes.values():
            self._start(node)
        self.clients = [SimClient(c, self) for c in range(1, cfg.clients + 1)]
        self._draw_network_faults()
        self._partition_until = 0

    # -- plumbing ---------------------------------------------------------------------------------
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
            bugs=self._bugs,
        )

    def _start(self, node: SimNode) -> None:
        node.kv = KVStateMachine.restore(node.storage.snapshot().data)
        node.raw = RawNode(self._raft_config(node), node.storage)
        self.checker.on_restart(node.id)

    def _crash(self, node: SimNode) -> None:
        node.raw = None
        node.pending_props.clear()
        node.pending_reads.clear()
        node.waiting_reads.clear()
        node.down_until = self.now + 1 + int(self.rng.expovariate(1 / self.profile.mean_downtime))
        self.stats.crashes += 1

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
            f.max_delay = rng.choice((10, 25))
            f.late_prob = rng.choice((0.01, 0.05))
            f.max_late = rng.choice((20, 40))
            return
        f.drop = rng.choice((0.0, 0.02, 0.1, 0.2))
        f.duplicate = rng.choice((0.0, 0.02, 0.1))
        f.delay_prob = rng.choice((0.0, 0.1, 0.3))
        f.max_delay = rng.choice((1, 3, 8))
        f.late_prob = rng.choice((0.0, 0.005, 0.02, 0.05))
        f.max_late = rng.choice((20, 60))

    def _inject_faults(self) -> None:
        rng = self.rng
        p = self.profile
        now = self.now
        for node in self.nodes.values():
            if node.raw is None:
                if now >= node.down_until:
                    self._start(node)
            elif p.crash and rng.random() < p.crash:
                self._crash(node)
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
                if rng.random() < 0.7:
                    self._crash(leader)
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
        f.max_delay = 2
        for node in self.nodes.values():
            if node.raw is None:
                self._start(node)

    # -- the runtime of each node -----------------------------------------------------------------
    def _after_step(self, node: SimNode) -> None:
        raw = node.raw
        assert raw is not None
        if raw.role == Role.LEADER:
            self.checker.on_leader(raw)
        self.checker.on_commit(node.id, raw.committed)

    def _check_leader_commit(self, raw: RawNode) -> None:
        """Called once the leader's commit index advanced and its Ready is persisted."""
        commit = raw.committed
        durable: dict[int, tuple[int, int, int | None]] = {}
        for node in self.nodes.values():
            storage = node.storage
            last = storage.last_index()
            if commit < storage.first_index() - 1:
                there: int | None = None
            elif commit > last:
                there = 0
            else:
                there = storage.term(commit)
            durable[node.id] = (last, storage.term(last), there)
        self.checker.on_leader_commit(raw, durable)

    def _process_ready(self, node: SimNode) -> None:
        raw = node.raw
        checker = self.checker
        while raw is not None and raw.has_ready():
            rd = raw.ready()
            storage = node.storage
            if rd.snapshot is not None:
                storage.apply_snapshot(rd.snapshot)
            if rd.entries:
                storage.append(rd.entries)
                try:
                    prev_term: int | None = storage.term(rd.entries[0].index - 1)
                except StorageError:
                    prev_term = None
                checker.on_persist(node.id, rd.entries, prev_term)
            if rd.hard_state is not None:
                storage.set_hard_state(rd.hard_state)
                checker.on_durable_commit(node.id, rd.hard_state.commit)
            crash_p = self.profile.crash_before_persist
            if self.profile.storm and raw.role == Role.LEADER:
                # A leader that dies with entries nobody else has: the raw material of Figure 8.
                crash_p = NEW_LEADER_CRASH if rd.soft_state is not None else LEADER_CRASH
            if self.faulty and crash_p and self.rng.random() < crash_p:
                # Persisted but crashed before sending or applying anything.
                self._crash(node)
                return
            now = self.now
            send = self.network.send
            for m in rd.messages:
                if m.snapshot is not None:
                    self.stats.snapshots_sent += 1
                send(m, now)
            if rd.snapshot is not None:
                node.kv = KVStateMachine.restore(rd.snapshot.data)
            for entry in rd.committed_entries:
                self._apply(node, entry)
            for rs in rd.read_states:
                client = node.pending_reads.pop(rs.request_id, None)
                if client is not None:
                    node.waiting_reads.append((rs.index, rs.request_id, client))
            raw.advance(rd)
            if rd.hard_state is not None and raw.role == Role.LEADER:
                self._check_leader_commit(raw)
            if node.waiting_reads:
                self._serve_reads(node, raw.applied)
            self._maybe_snapshot(node, raw)
            self.checker.on_commit(node.id, raw.committed)

    def _apply(self, node: SimNode, entry: Entry) -> None:
        self.checker.on_apply(node.id, entry)
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

    def _serve_reads(self, node: SimNode, applied: int) -> None:
        still: list[tuple[int, bytes, SimClient]] = []
        for index, rid, client in node.waiting_reads:
            if index <= applied:
                op = client.op
                if op is not None and op.op_id.encode() == rid:
                    client.complete(op.op_id, node.kv.data.get(op.key))
            else:
                still.append((index, rid, client))
        node.waiting_reads = still

    def _maybe_snapshot(self, node: SimNode, raw: RawNode) -> None:
        storage = node.storage
        applied = raw.applied
        if applied - storage.snapshot().meta.index < self.cfg.snapshot_every:
            return
        storage.create_snapshot(applied, raw.conf_state, node.kv.snapshot())
        storage.compact(max(applied - self.cfg.snapshot_keep, 1))

    # -- one tick ---------------------------------------------------------------------------------
    def _deliver(self) -> None:
        nodes = self.nodes
        rng = self.rng
        for _ in range(MAX_ROUNDS_PER_TICK):
            due = self.network.due(self.now)
            if not due:
                return
            self.stats.messages += len(due)
            touched: dict[int, SimNode] = {}
            for m in due:
                node = nodes.get(m.to)
                if node is None or node.raw is None:
                    continue
                node.raw.step(m)
                self._after_step(node)
                touched[node.id] = node
                p = self.profile.crash_before_persist
                if p and self.faulty and rng.random() < p:
                    self._crash(node)  # whatever this message changed was never persisted
            for node in touched.values():
                self._process_ready(node)

    def _admin(self) -> None:
        """An operator: membership changes one server at a time, and leadership transfers."""
        if not (self.cfg.membership or self.cfg.transfers):
            return
        if self.faulty and self.rng.random() >= self.profile.admin:
            return
        if not self.faulty and self.now % 5:
            return
        leader = self.current_leader()
        if leader is None or leader.raw is None:
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
        self._process_ready(leader)

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
        for node in self.nodes.values():
            if node.raw is not None:
                node.raw.tick()
                self._after_step(node)
        for node in self.nodes.values():
            self._process_ready(node)
        self._deliver()
        end = cfg.ticks + cfg.liveness_ticks
        may_start = self.now < end - cfg.client_timeout - 5
        for client in self.clients:
            client.act(self.now, may_start)
        for node in self.nodes.values():
            self._process_ready(node)
        self._admin()
        self._deliver()
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
