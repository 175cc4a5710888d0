"""Proof that the simulator has teeth: each known bug, planted alone, is caught within a budget.

Every case also re-runs the same seeds on the correct core, so a failure is the bug's doing and
not a false alarm of the simulator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest

from kv_raft.faults import Bug, parse_bug
from kv_raft.sim.simulation import RunResult, SimConfig, run_seed
from kv_raft.types import Config

# The simulator must catch each bug within this many consecutive seeds.
SEED_BUDGET = 50


@dataclass(frozen=True)
class PlantedBug:
    name: str
    catches_with: str  # the invariant expected to break first
    nodes: int
    storm: bool
    ticks: int


CASES = [
    PlantedBug("COUNT_STALE_VOTES", "election safety", nodes=5, storm=True, ticks=400),
    PlantedBug("COMMIT_PREVIOUS_TERM", "leader completeness", nodes=5, storm=True, ticks=400),
    PlantedBug("FORGET_VOTE_PERSIST", "election safety", nodes=5, storm=True, ticks=400),
    PlantedBug("READ_INDEX_NO_CONFIRM", "linearizability", nodes=3, storm=False, ticks=1200),
    PlantedBug("SKIP_LOG_MATCH_CHECK", "log matching", nodes=3, storm=True, ticks=400),
]


def first_failure(base: SimConfig) -> RunResult | None:
    for seed in range(1, SEED_BUDGET + 1):
        result = run_seed(replace(base, seed=seed))
        if not result.ok:
            return result
    return None


@pytest.mark.parametrize("bug", CASES, ids=[c.name for c in CASES])
def test_simulator_catches_planted_bug(bug: PlantedBug) -> None:
    base = SimConfig(seed=0, nodes=bug.nodes, ticks=bug.ticks, storm=bug.storm, bug=bug.name)
    caught = first_failure(base)
    assert caught is not None, f"{bug.name} survived {SEED_BUDGET} seeds"
    assert caught.failure is not None and bug.catches_with in caught.failure, caught.report()
    assert f"--bug {bug.name}" in caught.report()  # the replay command plants it again
    for seed in range(1, caught.config.seed + 1):
        clean = run_seed(replace(base, seed=seed, bug=None))
        assert clean.ok, clean.report()


def test_bugs_are_configuration_not_globals() -> None:
    assert Config(id=1, rng=random.Random(0)).bugs == frozenset()
    assert parse_bug("COUNT_STALE_VOTES") is Bug.COUNT_STALE_VOTES
    with pytest.raises(ValueError, match="unknown bug"):
        parse_bug("NO_SUCH_BUG")
