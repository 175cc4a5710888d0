"""The multi-group driver on a seeded in-memory network: elections, sleep, wake, failover, faults.

Each node is a ``MultiRaft`` plus a tiny runtime (``Cluster._run_cycle``) that does what the real
one will: persist every Ready, apply committed entries, send the outbox, advance. The network
can lose and delay messages, and nodes can be killed (their messages stop; the others' transport
reports them dead), paused and resumed, or restarted from what they persisted.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from kv_node.replication.multiraft import (
    FOLLOWER_SLEEP_MARGIN,
    LEADER_QUIET_TICKS,
    QUORUM_GRACE_TICKS,
    Cycle,
    GroupMessage,
    MultiRaft,
)
from kv_raft import (
    NO_NODE,
    ConfState,
    Entry,
    MemoryStorage,
    Message,
    MessageType,
    NotLeader,
    ProposalDropped,
    RawNode,
    ReadState,
    Role,
)

ELECTION_TICK = 10
# Settling: a leader heartbeats LEADER_QUIET_TICKS more ticks, its followers then stay awake
# until they have been silent for the follower threshold; a few ticks of slack on top.
SLEEP_BOUND = LEADER_QUIET_TICKS + ELECTION_TICK - FOLLOWER_SLEEP_MARGIN + 4
# A woken follower campaigns at its randomized timeout (< 2 election ticks) minus the silent
# ticks it slept after; pre-vote and vote complete within the tick (no delays in these tests).
FAILOVER_BOUND = 2 * ELECTION_TICK
MAX_ROUNDS_PER_TICK = 50


def voters_of(group: int, n_nodes: int, rf: int) -> frozenset[int]:
    first = group % n_nodes
    return frozenset(1 + (first + i) % n_nodes for i in range(rf))


class Cluster:
    """Several drivers on one seeded network; every invariant is checked as it runs."""

    def __init__(
        self,
        *,
        nodes: int = 3,
        groups: int = 24,
        rf: int = 3,
        seed: int = 0,
        loss: float = 0.0,
        max_delay: int = 0,
        preferred: bool = False,
    ) -> None:
        self.ids = list(range(1, nodes + 1))
        self.voters = {g: voters_of(g, nodes, rf) for g in range(groups)}
        self.seed = seed
        self.rng = random.Random(seed)
        self.loss = loss
        self.max_delay = max_delay
        self.storages: dict[tuple[int, int], MemoryStorage] = {}
        self.applied: dict[tuple[int, int], list[Entry]] = {}
        self.read_states: dict[tuple[int, int], list[ReadState]] = {}
        for node in self.ids:
            for g, voters in self.voters.items():
                if node in voters:
                    self.storages[node, g] = MemoryStorage(ConfState(voters))
                    self.applied[node, g] = []
                    self.read_states[node, g] = []
        self.down: set[int] = set()
        self.cut: set[frozenset[int]] = set()
        self.drop: Callable[[int, int, GroupMessage], bool] = lambda src, dst, gm: False
        """Loses the messages it picks (in addition to ``cut`` and ``loss``)."""
        self.now = 0
        self.sent = 0
        self.in_flight: list[tuple[int, int, int, GroupMessage]] = []
        self.leader_of_term: dict[tuple[int, int], int] = {}
        self.proposals: list[tuple[int, int, int, bytes]] = []  # node, group, index, data
        self.drivers = {node: self._start(node) for node in self.ids}
        if preferred:
            for driver in self.drivers.values():
                driver.campaign_preferred()

    def _start(self, node: int) -> MultiRaft:
        hosted = {g: v for g, v in self.voters.items() if node in v}
        applied = {g: log[-1].index for g in hosted if (log := self.applied[node, g])}
        return MultiRaft(
            node,
            hosted,
            {g: self.storages[node, g] for g in hosted},
            seed=self.seed,
            election_tick=ELECTION_TICK,
            applied=applied,
        )

    # -- the runtime and the network ---------------------------------------------------------
    def live(self) -> list[int]:
        return [n for n in self.ids if n not in self.down]

    def _run_cycle(self, node: int) -> bool:
        driver = self.drivers[node]
        cycle = driver.collect()
        if cycle.is_empty:
            return False
        for item in cycle.readies:
            g, rd = item.group, item.ready
            storage = self.storages[node, g]
            if rd.snapshot is not None:
                storage.apply_snapshot(rd.snapshot)
            storage.append(rd.entries)
            if rd.hard_state is not None:
                storage.set_hard_state(rd.hard_state)
            log = self.applied[node, g]
            for entry in rd.committed_entries:
                expected = log[-1].index + 1 if log else 2
                assert entry.index == expected, (self.seed, node, g, entry, expected)
                log.append(entry)
            self.read_states[node, g].extend(rd.read_states)
            if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
                key = (g, driver.term(g))
                first = self.leader_of_term.setdefault(key, node)
                assert first == node, f"seed {self.seed}: group {g} term {key[1]}: two leaders"
        boxes = (cycle.early, cycle.outbox)
        regrouped = sorted(
            (gm.group, gm.message.to, id(gm.message))
            for box in boxes
            for ms in box.values()
            for gm in ms
        )
        assert regrouped == sorted(
            (item.group, m.to, id(m)) for item in cycle.readies for m in item.ready.messages
        )
        writing = {item.group for item in cycle.readies if item.writes}
        for box in boxes:
            for dst, messages in box.items():
                for gm in messages:
                    assert gm.message.to == dst
                    # Only a Ready that writes nothing may send before the cycle's write.
                    assert (gm.group in writing) == (box is cycle.outbox)
                    self._send(node, dst, gm)
        driver.advance(cycle)
        return True

    def _blocked(self, a: int, b: int) -> bool:
        return a in self.down or b in self.down or frozenset((a, b)) in self.cut

    def _send(self, src: int, dst: int, gm: GroupMessage) -> None:
        self.sent += 1
        if self._blocked(src, dst) or (self.loss and self.rng.random() < self.loss):
            return
        if self.drop(src, dst, gm):
            return
        delay = self.rng.randint(0, self.max_delay) if self.max_delay else 0
        self.in_flight.append((self.now + delay, src, dst, gm))

    def _deliver(self) -> bool:
        due = [m for m in self.in_flight if m[0] <= self.now]
        if not due:
            return False
        self.in_flight = [m for m in self.in_flight if m[0] > self.now]
        for _, src, dst, gm in due:
            if not self._blocked(src, dst):
                self.drivers[dst].step(gm.group, gm.message)
        return True

    def settle(self) -> None:
        for _ in range(MAX_ROUNDS_PER_TICK):
            worked = False
            for node in self.live():
                worked |= self._run_cycle(node)
            worked |= self._deliver()
            if not worked:
                return
        raise AssertionError("the cluster did not settle within one tick")

    def tick(self) -> None:
        self.now += 1
        for node in self.live():
            self.drivers[node].tick()
        self.settle()

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def run_until(self, done: Callable[[], bool], max_ticks: int) -> int:
        """Tick until ``done``; returns the ticks it took (fails beyond ``max_ticks``)."""
        for ticks in range(max_ticks + 1):
            if done():
                return ticks
            self.tick()
        raise AssertionError(f"seed {self.seed}: not done after {max_ticks} ticks")

    # -- faults ------------------------------------------------------------------------------
    def kill(self, node: int) -> None:
        """Stop the node (crash or SIGSTOP); the others' transport reports it dead."""
        self.down.add(node)
        for other in self.live():
            self.drivers[other].peer_alive(node, False)

    def revive(self, node: int, *, restart: bool) -> None:
        """Restart the node from what it persisted, or resume it as it was (SIGCONT)."""
        self.down.discard(node)
        if restart:
            self.drivers[node] = self._start(node)
        for other in self.live():
            if other != node and frozenset((node, other)) not in self.cut:
                self.drivers[other].peer_alive(node, True)
                self.drivers[node].peer_alive(other, True)

    def partition(self, a: int, b: int) -> None:
        self.cut.add(frozenset((a, b)))
        self.drivers[a].peer_alive(b, False)
        self.drivers[b].peer_alive(a, False)

    def heal(self, a: int, b: int) -> None:
        self.cut.discard(frozenset((a, b)))
        if a not in self.down and b not in self.down:
            self.drivers[a].peer_alive(b, True)
            self.drivers[b].peer_alive(a, True)

    # -- what the tests look at --------------------------------------------------------------
    def leader(self, g: int) -> int | None:
        """The live leader of ``g`` that every live replica follows, if there is one."""
        replicas = [n for n in self.live() if n in self.voters[g]]
        leaders = {n for n in replicas if self.drivers[n].role(g) is Role.LEADER}
        if len(leaders) != 1:
            return None
        (leader,) = leaders
        if all(self.drivers[n].leader(g) == leader for n in replicas):
            return leader
        return None

    def all_led(self) -> bool:
        return all(self.leader(g) is not None for g in self.voters)

    def all_asleep(self) -> bool:
        return all(self.drivers[n].awake_count == 0 for n in self.live())

    def propose(self, g: int, data: bytes) -> int:
        """Propose through ``g``'s leader; returns the leader."""
        leader = self.leader(g)
        assert leader is not None, f"group {g} has no leader"
        index = self.drivers[leader].propose(g, data)
        self.proposals.append((leader, g, index, data))
        return leader

    def acknowledged(self) -> list[tuple[int, int, bytes]]:
        """Proposals the proposer applied at the index it was given: what a client saw succeed."""
        acked = []
        for node, g, index, data in self.proposals:
            log = self.applied[node, g]
            if any(e.index == index and e.data == data for e in log):
                acked.append((g, index, data))
        return acked

    def check_prefixes_agree(self) -> None:
        for g, voters in self.voters.items():
            logs = [self.applied[n, g] for n in sorted(voters)]
            for a in logs:
                for b in logs:
                    n = min(len(a), len(b))
                    assert a[:n] == b[:n], f"seed {self.seed}: group {g} replicas diverge"

    def check_acknowledged_everywhere(self) -> None:
        for g, index, data in self.acknowledged():
            for n in self.voters[g] - self.down:
                log = self.applied[n, g]
                assert log[index - 2].data == data, f"seed {self.seed}: lost {g}@{index}"


@pytest.fixture
def idle() -> Cluster:
    """Three nodes, 24 groups, every group led, written once, and asleep everywhere."""
    c = Cluster()
    c.run_until(c.all_led, max_ticks=3 * ELECTION_TICK)
    for g in c.voters:
        c.propose(g, f"first {g}".encode())
    c.run_until(c.all_asleep, max_ticks=SLEEP_BOUND)
    return c


@pytest.fixture
def raw_ticks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every RawNode.tick, however it is reached."""
    calls = [0]
    original = RawNode.tick

    def counting(self: RawNode) -> None:
        calls[0] += 1
        original(self)

    monkeypatch.setattr(RawNode, "tick", counting)
    return calls


def test_every_group_elects_a_leader_and_commits() -> None:
    c = Cluster()
    c.run_until(c.all_led, max_ticks=3 * ELECTION_TICK)
    for g in c.voters:
        c.propose(g, f"v{g}".encode())
    c.run(1)
    for g in c.voters:
        for n in c.ids:
            assert [e.data for e in c.applied[n, g] if e.data] == [f"v{g}".encode()]


def test_a_follower_refuses_proposals_and_reads_naming_the_leader() -> None:
    c = Cluster()
    c.run_until(c.all_led, max_ticks=3 * ELECTION_TICK)
    leader = c.leader(0)
    follower = next(n for n in c.voters[0] if n != leader)
    with pytest.raises(NotLeader) as refused:
        c.drivers[follower].propose(0, b"x")
    assert refused.value.leader == leader
    with pytest.raises(NotLeader):
        c.drivers[follower].read_index(0, b"r")


def test_a_busy_group_is_left_out_of_later_cycles_and_fed_nothing_until_advanced() -> None:
    c = Cluster()
    driver = c.drivers[1]
    driver.campaign(0)
    cycle = driver.collect()
    assert not cycle.is_empty and driver.busy(0)
    # A cycle collected while the first is out (its write being flushed) holds none of its
    # groups, and nothing may be fed to them.
    assert driver.collect().is_empty
    with pytest.raises(RuntimeError):
        driver.step(0, Message(MessageType.HEARTBEAT, to=1, frm=2, term=1))
    with pytest.raises(RuntimeError):
        driver.read_index(0, b"r")
    with pytest.raises(RuntimeError):
        driver.peer_alive(2, False)
    with pytest.raises(RuntimeError):
        driver.advance(Cycle(cycle.readies, {}))
    driver.advance(cycle)
    assert not driver.busy(0)
    with pytest.raises(RuntimeError):
        driver.advance(cycle)  # once
    assert driver.collect().is_empty


def test_the_same_seed_replays_the_same_run() -> None:
    def run(seed: int) -> tuple[object, ...]:
        c = Cluster(nodes=4, groups=12, seed=seed, loss=0.1, max_delay=2)
        c.run(3 * ELECTION_TICK)
        c.kill(2)
        c.run(2 * ELECTION_TICK)
        return (sorted(c.leader_of_term.items()), sorted(c.applied.items()), c.sent)

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_preferred_leaders_are_elected_at_once_and_spread() -> None:
    c = Cluster(preferred=True)
    c.settle()
    assert c.all_led()
    leaders = [c.leader(g) for g in c.voters]
    assert all(leaders.count(n) == len(c.voters) // len(c.ids) for n in c.ids)


def test_idle_groups_fall_asleep_and_then_a_tick_ticks_nothing(
    idle: Cluster, raw_ticks: list[int]
) -> None:
    assert all(d.asleep_count == len(d.groups) for d in idle.drivers.values())
    sent = idle.sent
    counted = {n: d.stats.raw_ticks for n, d in idle.drivers.items()}
    idle.run(10 * ELECTION_TICK)
    assert raw_ticks[0] == 0
    assert idle.sent == sent
    assert {n: d.stats.raw_ticks for n, d in idle.drivers.items()} == counted
    assert idle.all_led()


def test_groups_fall_asleep_and_stay_asleep_when_messages_are_late() -> None:
    c = Cluster(seed=3, max_delay=2)
    c.run_until(c.all_led, max_ticks=6 * ELECTION_TICK)
    for g in c.voters:
        c.propose(g, b"late")
    # Answers to a leader's last heartbeats may arrive after it fell asleep; they must not wake
    # it (each wake would mean more heartbeats, more late answers, and no sleep ever).
    c.run_until(lambda: c.all_asleep() and not c.in_flight, max_ticks=4 * SLEEP_BOUND)
    sent = c.sent
    c.run(5 * ELECTION_TICK)
    assert c.sent == sent
    assert c.all_asleep() and c.all_led()


def test_a_proposal_wakes_only_its_group_and_commits(idle: Cluster) -> None:
    terms = {g: idle.drivers[1].term(g) for g in idle.voters}
    idle.propose(5, b"wake up")
    assert all(d.awake_count <= 1 for d in idle.drivers.values())
    idle.run(1)
    for n in idle.ids:
        assert idle.applied[n, 5][-1].data == b"wake up"
        assert idle.drivers[n].awake_count <= 1
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)
    assert {g: idle.drivers[1].term(g) for g in idle.voters} == terms


def test_a_follower_that_lost_the_commit_learns_it_before_its_leader_sleeps(
    idle: Cluster,
) -> None:
    group = 5
    leader = idle.leader(group)
    assert leader is not None
    follower = min(idle.voters[group] - {leader})

    def commit_only(src: int, dst: int, gm: GroupMessage) -> bool:
        m = gm.message
        return dst == follower and m.type is MessageType.APPEND and not m.entries

    idle.drop = commit_only
    idle.propose(group, b"wake up")
    idle.run(1)
    last = idle.drivers[leader].raw_node(group).log.last_index()
    assert idle.drivers[follower].raw_node(group).log.last_index() == last
    assert idle.applied[follower, group][-1].data != b"wake up", "the commit was not lost"
    # The leader's quiet heartbeat, at the next tick, carries the commit index; nobody
    # campaigns for it.
    terms = {g: idle.drivers[leader].term(g) for g in idle.voters}
    idle.run(1)
    assert idle.applied[follower, group][-1].data == b"wake up"
    idle.drop = lambda src, dst, gm: False
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)
    assert {g: idle.drivers[leader].term(g) for g in idle.voters} == terms


def test_a_read_wakes_its_group_and_is_confirmed(idle: Cluster) -> None:
    leader = idle.leader(3)
    assert leader is not None
    idle.drivers[leader].read_index(3, b"r1")
    idle.run(1)
    (state,) = idle.read_states[leader, 3]
    assert state.request_id == b"r1" and state.index == idle.applied[leader, 3][-1].index
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)


def test_a_pending_read_keeps_its_leader_awake_until_confirmed(idle: Cluster) -> None:
    leader = idle.leader(3)
    assert leader is not None
    followers = idle.voters[3] - {leader}
    # Heartbeats are lost but the transport has not noticed: nobody is reported dead.
    idle.cut |= {frozenset((leader, f)) for f in followers}
    idle.drivers[leader].read_index(3, b"r1")
    idle.run(LEADER_QUIET_TICKS + 3)
    assert not idle.drivers[leader].is_asleep(3)
    assert idle.read_states[leader, 3] == []
    idle.cut.clear()
    idle.run(1)
    assert [s.request_id for s in idle.read_states[leader, 3]] == [b"r1"]
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)


def most_leading(c: Cluster) -> int:
    counts = {n: sum(1 for g in c.voters if c.leader(g) == n) for n in c.ids}
    return max(counts, key=lambda n: counts[n])


def test_groups_of_a_dead_leader_elect_survivors_within_bound(idle: Cluster) -> None:
    victim = most_leading(idle)
    orphaned = [g for g in idle.voters if idle.leader(g) == victim]
    assert orphaned
    idle.kill(victim)
    ticks = idle.run_until(idle.all_led, max_ticks=FAILOVER_BOUND)
    assert all(idle.leader(g) != victim for g in orphaned)
    # Every survivor was told at once: each group's successor wins within the next tick.
    assert ticks == 1
    for g in idle.voters:
        idle.propose(g, f"after {g}".encode())
    idle.run(1)
    idle.check_prefixes_agree()
    idle.check_acknowledged_everywhere()
    assert len(idle.acknowledged()) == 2 * len(idle.voters)
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "resumed"])
def test_a_revived_node_catches_up_and_the_cluster_sleeps_again(
    idle: Cluster, restart: bool
) -> None:
    victim = most_leading(idle)
    idle.kill(victim)
    idle.run_until(idle.all_led, max_ticks=FAILOVER_BOUND)
    for g in idle.voters:
        idle.propose(g, f"while {victim} was away".encode())
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)
    idle.revive(victim, restart=restart)
    idle.run_until(
        lambda: idle.all_led() and idle.all_asleep(), max_ticks=FAILOVER_BOUND + SLEEP_BOUND
    )
    for g in idle.voters:
        assert idle.applied[victim, g][-1].data == f"while {victim} was away".encode()
    idle.check_prefixes_agree()
    idle.check_acknowledged_everywhere()


def test_a_restarted_node_campaigning_at_start_does_not_depose_anyone() -> None:
    c = Cluster(preferred=True)
    c.settle()
    c.run_until(c.all_asleep, max_ticks=SLEEP_BOUND)
    # Node 1 loses its leaderships, then comes back and catches up with the new terms.
    c.kill(1)
    c.run_until(c.all_led, max_ticks=FAILOVER_BOUND)
    c.revive(1, restart=False)
    c.run_until(lambda: c.all_led() and c.all_asleep(), max_ticks=FAILOVER_BOUND + SLEEP_BOUND)
    terms = {g: c.drivers[2].term(g) for g in c.voters}
    leaders = {g: c.leader(g) for g in c.voters}
    assert 1 not in leaders.values()
    # Restarted, it campaigns for its preferred groups: as up to date as the leaders, but their
    # followers' leases refuse it.
    c.kill(1)
    c.revive(1, restart=True)
    c.drivers[1].campaign_preferred()
    c.run_until(lambda: c.all_led() and c.all_asleep(), max_ticks=FAILOVER_BOUND + SLEEP_BOUND)
    assert {g: c.drivers[2].term(g) for g in c.voters} == terms
    assert {g: c.leader(g) for g in c.voters} == leaders


def test_a_resumed_stale_leader_neither_commits_nor_reads(idle: Cluster) -> None:
    victim = most_leading(idle)
    stale = [g for g in idle.voters if idle.leader(g) == victim]
    idle.kill(victim)
    idle.run_until(idle.all_led, max_ticks=FAILOVER_BOUND)
    idle.revive(victim, restart=False)
    g = stale[0]
    assert idle.drivers[victim].role(g) is Role.LEADER  # it slept through its deposition
    idle.drivers[victim].propose(g, b"from the past")
    idle.drivers[victim].read_index(g, b"stale read")
    idle.run_until(idle.all_asleep, max_ticks=FAILOVER_BOUND + SLEEP_BOUND)
    assert idle.drivers[victim].role(g) is Role.FOLLOWER
    assert idle.read_states[victim, g] == []
    for n in idle.voters[g]:
        assert all(e.data != b"from the past" for e in idle.applied[n, g])
    idle.check_prefixes_agree()


def test_a_follower_cut_off_from_its_leader_alone_cannot_depose_it(idle: Cluster) -> None:
    a, b, other = 1, 2, 3
    led_by_a = [g for g in idle.voters if idle.leader(g) == a]
    terms = {g: idle.drivers[a].term(g) for g in led_by_a}
    idle.partition(a, b)
    idle.run(5 * ELECTION_TICK)
    # b tried: its groups led by a are awake and campaigning, and c's lease refuses them.
    assert all(idle.drivers[b].role(g) is Role.PRE_CANDIDATE for g in led_by_a)
    assert all(idle.drivers[n].role(g) is Role.LEADER for g in led_by_a for n in (a,))
    assert {g: idle.drivers[a].term(g) for g in led_by_a} == terms
    assert all(idle.drivers[other].leader(g) == a for g in led_by_a)
    for g in led_by_a:
        idle.drivers[a].propose(g, b"a and c only")
    idle.run(1)
    assert all(idle.applied[other, g][-1].data == b"a and c only" for g in led_by_a)
    idle.heal(a, b)
    idle.run_until(
        lambda: idle.all_led() and idle.all_asleep(), max_ticks=FAILOVER_BOUND + SLEEP_BOUND
    )
    assert all(idle.applied[b, g][-1].data == b"a and c only" for g in led_by_a)
    idle.check_prefixes_agree()


def test_a_leader_restarted_before_its_peers_noticed_is_not_refused_forever(
    idle: Cluster,
) -> None:
    victim = most_leading(idle)
    idle.drivers[victim] = idle._start(victim)  # no peer_alive flip anywhere
    ticks = idle.run_until(idle.all_led, max_ticks=3 * ELECTION_TICK)
    assert ticks > 0
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)
    idle.check_prefixes_agree()


def test_leaders_woken_by_a_revived_peer_keep_their_leadership(idle: Cluster) -> None:
    # Keep group g's leader busy for g ticks, so that the leaders fall asleep at every point
    # of their CheckQuorum window.
    for t in range(ELECTION_TICK):
        for g in idle.voters:
            if g >= t:
                idle.propose(g, f"busy {t}".encode())
        idle.tick()
    idle.run_until(idle.all_asleep, max_ticks=SLEEP_BOUND)
    terms = {(n, g): idle.drivers[n].term(g) for n in idle.ids for g in idle.voters}
    # Some leader fell asleep with its next quorum check due at its next tick: the case where
    # a stale check would depose it before a single heartbeat went out.
    elapsed = [
        idle.drivers[n].raw_node(g).election_elapsed
        for n in idle.ids
        for g in idle.voters
        if idle.drivers[n].role(g) is Role.LEADER
    ]
    assert ELECTION_TICK - 1 in elapsed
    for n in idle.ids:
        for other in idle.ids:
            if other != n:
                idle.drivers[n].peer_alive(other, False)
                idle.drivers[n].peer_alive(other, True)
    assert any(d.awake_count for d in idle.drivers.values())
    idle.run(3 * ELECTION_TICK)
    assert {(n, g): idle.drivers[n].term(g) for n in idle.ids for g in idle.voters} == terms
    assert idle.all_asleep()


def test_a_leader_that_lost_its_quorum_steps_down_within_one_election_timeout(
    idle: Cluster,
) -> None:
    leader = most_leading(idle)
    led = [g for g in idle.voters if idle.leader(g) == leader]
    for other in idle.ids:
        if other != leader:
            idle.kill(other)
    idle.run(ELECTION_TICK)
    assert all(idle.drivers[leader].role(g) is not Role.LEADER for g in led)


@pytest.mark.parametrize("seed", range(1, 11))
def test_random_faults_keep_one_leader_per_term_and_agreeing_logs(seed: int) -> None:
    c = Cluster(nodes=5, groups=30, seed=seed, loss=0.05, max_delay=2)
    rng = random.Random(seed * 7919)
    counter = 0
    for step in range(400):
        roll = rng.random()
        if roll < 0.02 and len(c.down) < 2:
            c.kill(rng.choice(c.live()))
        elif roll < 0.04 and c.down:
            c.revive(rng.choice(sorted(c.down)), restart=rng.random() < 0.5)
        elif roll < 0.06:
            a, b = rng.sample(c.ids, 2)
            c.partition(a, b)
        elif roll < 0.08 and c.cut:
            a, b = sorted(rng.choice(sorted(tuple(sorted(p)) for p in c.cut)))
            c.heal(a, b)
        for _ in range(rng.randint(0, 3)):
            g = rng.randrange(len(c.voters))
            leaders = [
                n for n in c.live() if n in c.voters[g] and c.drivers[n].role(g) is Role.LEADER
            ]
            if leaders:
                counter += 1
                node = rng.choice(leaders)
                index = c.drivers[node].propose(g, f"{seed}/{counter}".encode())
                c.proposals.append((node, g, index, f"{seed}/{counter}".encode()))
        c.tick()
        if step % 25 == 0:
            c.check_prefixes_agree()
    c.loss, c.max_delay = 0.0, 0
    for a, b in sorted(tuple(sorted(p)) for p in c.cut):
        c.heal(a, b)
    for node in sorted(c.down):
        c.revive(node, restart=True)
    c.run_until(lambda: c.all_led() and c.all_asleep(), max_ticks=FAILOVER_BOUND + 3 * SLEEP_BOUND)
    c.check_prefixes_agree()
    c.check_acknowledged_everywhere()
    assert len(c.acknowledged()) > counter // 2
    for g in c.voters:
        logs = {tuple(c.applied[n, g]) for n in c.voters[g]}
        assert len(logs) == 1, f"seed {seed}: group {g} replicas differ after healing"


def test_preferred_leaders_campaign_again_when_their_links_come_up() -> None:
    """At start the first campaigns are sent before any stream to a peer is up, and lost;
    each link coming up makes the preferred leaders of leaderless groups campaign again, so
    the cluster is led within a few ticks instead of an election timeout."""
    c = Cluster(groups=12)
    for a in c.ids:
        for b in c.ids:
            if a < b:
                c.partition(a, b)
    for driver in c.drivers.values():
        driver.campaign_preferred()
    c.settle()
    assert not any(c.leader(g) for g in c.voters), "the campaigns reached nobody"
    for a in c.ids:
        for b in c.ids:
            if a < b:
                c.heal(a, b)
    for node, driver in c.drivers.items():
        for peer in c.ids:
            if peer != node:
                driver.peer_connected(peer)
    took = c.run_until(c.all_led, max_ticks=ELECTION_TICK // 2)
    assert took < ELECTION_TICK // 2


def test_a_stopping_node_hands_every_leadership_off_without_waiting_for_a_timeout(
    idle: Cluster,
) -> None:
    """``hand_off`` moves each group led here to an up-to-date live voter by TimeoutNow: the
    groups have their new leaders on messages alone (no tick, so no election timeout), and
    meanwhile proposals are refused with the replica taking over named."""
    victim = most_leading(idle)
    driver = idle.drivers[victim]
    led = [g for g in idle.voters if idle.leader(g) == victim]
    assert led
    assert driver.hand_off() == len(led)
    for g in led:
        taking_over = driver.transferee(g)
        assert taking_over not in (NO_NODE, victim) and taking_over in idle.voters[g]
        with pytest.raises(ProposalDropped):
            driver.propose(g, b"during the hand-off")
    idle.settle()
    assert all(idle.leader(g) not in (None, victim) for g in led)
    assert driver.hand_off() == 0
    for g in idle.voters:
        idle.propose(g, f"after {g}".encode())
    idle.run(1)
    idle.check_prefixes_agree()
    idle.check_acknowledged_everywhere()
    assert len(idle.acknowledged()) == 2 * len(idle.voters)


def test_a_hand_off_goes_only_to_live_voters_and_ends_when_none_is_left(idle: Cluster) -> None:
    victim = most_leading(idle)
    led = [g for g in idle.voters if idle.leader(g) == victim]
    dead, alive = [n for n in idle.ids if n != victim]
    idle.kill(dead)
    driver = idle.drivers[victim]
    driver.hand_off()
    assert all(driver.transferee(g) == alive for g in led)
    idle.settle()
    assert all(idle.leader(g) == alive for g in led)


def test_a_leader_with_no_live_voter_left_has_nothing_to_hand_off(idle: Cluster) -> None:
    """Done at once (the stopping node does not wait its bound for what cannot move)."""
    victim = most_leading(idle)
    for other in idle.ids:
        if other != victim:
            idle.kill(other)
    driver = idle.drivers[victim]
    assert any(driver.role(g) is Role.LEADER for g in idle.voters)
    assert driver.hand_off() == 0
    assert all(
        driver.transferee(g) == NO_NODE for g in idle.voters if driver.role(g) is Role.LEADER
    )


@pytest.mark.parametrize("asleep", [True, False], ids=["asleep", "awake"])
def test_a_leader_told_its_quorum_is_dead_steps_down_within_the_grace(
    idle: Cluster, asleep: bool
) -> None:
    """The transport's verdict already spans an election timeout of silence: the leader
    asks CheckQuorum after a few ticks instead of at the end of its window (a cut-off leader
    refuses new calls sooner, so callers find the new leader on the other side sooner)."""
    leader = most_leading(idle)
    led = [g for g in idle.voters if idle.leader(g) == leader]
    driver = idle.drivers[leader]
    if not asleep:
        for g in led:
            idle.propose(g, b"keeps it awake")
        idle.settle()
        assert all(not driver.is_asleep(g) for g in led)
    for other in idle.ids:
        if other != leader:
            idle.kill(other)
    idle.run(QUORUM_GRACE_TICKS)
    assert all(driver.role(g) is not Role.LEADER for g in led)


@pytest.mark.parametrize("asleep", [True, False], ids=["asleep", "awake"])
def test_a_wrong_verdict_of_dead_peers_that_still_answer_deposes_no_leader(
    idle: Cluster, asleep: bool
) -> None:
    """This node's own loop stalled past ``dead_after``: it wrongly declares its peers dead,
    but they answer the heartbeats of the grace ticks, so CheckQuorum keeps the leader."""
    leader = most_leading(idle)
    led = [g for g in idle.voters if idle.leader(g) == leader]
    driver = idle.drivers[leader]
    if not asleep:
        for g in led:
            idle.propose(g, b"keeps it awake")
        idle.settle()
    for other in idle.ids:
        if other != leader:
            driver.peer_alive(other, False)  # the verdict only: messages still flow
    idle.run(QUORUM_GRACE_TICKS + 1)
    assert all(driver.role(g) is Role.LEADER for g in led)
