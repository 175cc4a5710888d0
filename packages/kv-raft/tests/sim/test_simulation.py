"""The simulator itself: its parts, determinism, failure reports, and a short run for CI."""

from __future__ import annotations

import random

import pytest

from kv_raft.node import RawNode
from kv_raft.sim.__main__ import main
from kv_raft.sim.checker import InvariantViolation, SafetyChecker
from kv_raft.sim.kvstore import Command, KVStateMachine
from kv_raft.sim.lockstep import LockstepCluster
from kv_raft.sim.network import Network
from kv_raft.sim.simulation import SimConfig, Simulation, run_seed
from kv_raft.types import Entry, Message, MessageType

# The short simulation of the unit-test session: seeds x sizes, mixed and stormy profiles.
SHORT_SEEDS = range(1, 11)


def test_command_round_trip_and_cas() -> None:
    cmd = Command("c1.1", "cas", "k0", "new", None)
    assert Command.decode(cmd.encode()) == cmd
    sm = KVStateMachine()
    assert sm.apply(cmd) is True
    assert sm.apply(Command("c1.2", "cas", "k0", "x", "old")) is False
    assert sm.apply(Command("c1.3", "get", "k0", None, None)) == "new"
    assert KVStateMachine.restore(sm.snapshot()).data == {"k0": "new"}


def test_network_partitions_are_directional() -> None:
    net = Network(random.Random(0))
    net.faults.delay_prob = net.faults.lan_delay = 0  # every message arrives at once
    net.isolate([{1}, {2, 3}], one_way=True)
    for frm, to in ((1, 2), (2, 1), (3, 1)):
        net.send(Message(MessageType.HEARTBEAT, to=to, frm=frm, term=1), now=0)
    assert sorted((m.frm, m.to) for m in net.due(0)) == [(2, 1), (3, 1)]
    net.heal()
    net.send(Message(MessageType.HEARTBEAT, to=2, frm=1, term=1), now=0)
    assert len(net.due(0)) == 1


def test_checker_catches_two_leaders_in_one_term() -> None:
    c = LockstepCluster(3)
    checker = SafetyChecker()
    checker.on_leader(c.elect(1))
    impostor: RawNode = c.nodes[2]
    impostor.raft.term = c.nodes[1].term
    with pytest.raises(InvariantViolation, match="election safety"):
        checker.on_leader(impostor)


def test_checker_catches_divergent_applies_and_logs_and_commit_regression() -> None:
    checker = SafetyChecker()
    checker.on_apply(1, Entry(term=1, index=5, data=b"a"))
    with pytest.raises(InvariantViolation, match="state machine safety"):
        checker.on_apply(2, Entry(term=2, index=5, data=b"b"))
    checker.on_persist(1, (Entry(term=2, index=7, data=b"x"),), prev_term=1)
    with pytest.raises(InvariantViolation, match="log matching"):
        checker.on_persist(2, (Entry(term=2, index=7, data=b"y"),), prev_term=1)
    with pytest.raises(InvariantViolation, match="log matching"):
        checker.on_persist(3, (Entry(term=2, index=7, data=b"x"),), prev_term=2)
    checker.on_commit(1, 10)
    with pytest.raises(InvariantViolation, match="commit monotonic"):
        checker.on_commit(1, 9)


@pytest.mark.parametrize("nodes", [3, 5])
@pytest.mark.parametrize("storm", [False, True])
def test_short_simulation_is_safe_and_live(nodes: int, storm: bool) -> None:
    for seed in SHORT_SEEDS:
        result = run_seed(SimConfig(seed=seed, nodes=nodes, ticks=600, storm=storm))
        assert result.ok, result.report()
        assert result.stats.committed > 50


def test_same_seed_same_run() -> None:
    a = run_seed(SimConfig(seed=7, nodes=5, ticks=400))
    b = run_seed(SimConfig(seed=7, nodes=5, ticks=400))
    assert a.history == b.history
    assert (a.stats.messages, a.stats.committed) == (b.stats.messages, b.stats.committed)


def test_liveness_failure_is_reported_with_replay_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RawNode, "tick", lambda self: None)  # nobody ever starts an election
    result = run_seed(SimConfig(seed=3, nodes=3, ticks=50, liveness_ticks=100))
    assert not result.ok
    assert result.failure is not None and result.failure.startswith("liveness")
    assert "python -m kv_raft.sim --seed 3 --nodes 3 --ticks 50" in result.report()


def test_cli_runs_and_replays(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "2", "--nodes", "3", "--ticks", "200"]) == 0
    assert main(["--seed", "5", "--nodes", "5", "--ticks", "200"]) == 0
    out = capsys.readouterr().out
    assert "seed 5: ok" in out
    assert "ticks/s" in out


def test_simulation_exercises_the_interesting_paths() -> None:
    """Guard against a simulator that silently stops injecting what the invariants need."""
    totals: dict[str, int] = {}
    for seed in range(1, 9):
        sim = Simulation(SimConfig(seed=seed, nodes=3, ticks=800))
        result = sim.run()
        assert result.ok, result.report()
        s = result.stats
        for name, value in (
            ("crashes", s.crashes),
            ("partitions", s.partitions),
            ("snapshots", s.snapshots_sent),
            ("conf", s.conf_changes),
            ("unknown", s.ops_unknown),
            ("elections", s.elections),
            ("fsync failures", s.fsync_failures),
            ("torn crashes", s.torn_crashes),
            ("lost unsynced", s.lost_unsynced),
            ("pauses", s.pauses),
            ("apply lag", s.max_apply_lag),
        ):
            totals[name] = totals.get(name, 0) + value
    assert all(v > 0 for v in totals.values()), totals


def test_cli_exits_1_on_a_failing_seed_and_prints_its_replay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The exit code is how `nox -s sim` (and CI) learns that a seed failed."""
    argv = ["--seed", "1", "--nodes", "3", "--storm", "--ticks", "400"]
    assert main([*argv, "--bug", "SKIP_LOG_MATCH_CHECK"]) == 1
    out = capsys.readouterr().out
    assert "seed 1: FAILED: invariant violated" in out
    assert "replay: PYTHONPATH=packages/kv-raft/src python -m kv_raft.sim --seed 1 --nodes 3" in out
    assert main(argv) == 0  # the same run without the planted bug passes
