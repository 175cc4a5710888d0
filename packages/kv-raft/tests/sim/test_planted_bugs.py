"""Proof that the simulator has teeth: each known bug, planted alone, is caught within a budget.

Each case names the check expected to catch its bug. Seeds run from 1 until that check fails;
an earlier seed may fail another check first (a bug often breaks several things). Every seed up
to the catch is then re-run on the correct core, so each failure is the bug's doing and not a
false alarm of the simulator.
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
    bug: Bug
    caught_by: str  # the check expected to fail, as it appears in the failure message
    sim: SimConfig


def case(
    bug: Bug,
    caught_by: str,
    nodes: int,
    ticks: int,
    *,
    storm: bool = False,
    skew: float | None = None,
    pre_vote: bool | None = None,
    operator: float | None = None,
) -> PlantedBug:
    sim = SimConfig(
        seed=0,
        nodes=nodes,
        ticks=ticks,
        bug=bug.name,
        storm=storm,
        skew=skew,
        pre_vote=pre_vote,
        operator=operator,
    )
    return PlantedBug(bug, caught_by, sim)


CASES = [
    # The original five.
    case(Bug.COUNT_STALE_VOTES, "election safety", 5, 400, storm=True),
    case(Bug.COMMIT_PREVIOUS_TERM, "leader completeness", 5, 400, storm=True),
    case(Bug.FORGET_VOTE_PERSIST, "election safety", 5, 1200, storm=True),
    case(Bug.READ_INDEX_NO_CONFIRM, "stale read", 3, 1200),
    case(Bug.SKIP_LOG_MATCH_CHECK, "log matching", 3, 400, storm=True),
    # One of each new kind: durability, read path, membership, follower commit, time.
    case(Bug.VOTE_WITHOUT_SYNC, "one vote per term", 5, 400, storm=True),
    case(Bug.READ_BEFORE_TERM_COMMIT, "stale read", 3, 400, storm=True),
    case(Bug.CONF_CHANGE_WHILE_PENDING, "state machine safety", 3, 1200, storm=True, operator=0.3),
    case(Bug.HEARTBEAT_COMMIT_UNCAPPED, "follower commit", 5, 400, storm=True),
    case(Bug.SNAPSHOT_NEVER_RETRIED, "liveness", 3, 1200),
]


def first_catch(base: SimConfig, caught_by: str) -> tuple[RunResult | None, int]:
    """The first run whose failure names ``caught_by``, and the last seed tried."""
    for seed in range(1, SEED_BUDGET + 1):
        result = run_seed(replace(base, seed=seed))
        if result.failure is not None and caught_by in result.failure:
            return result, seed
    return None, SEED_BUDGET


@pytest.mark.parametrize("planted", CASES, ids=[c.bug.name for c in CASES])
def test_simulator_catches_planted_bug(planted: PlantedBug) -> None:
    caught, last = first_catch(planted.sim, planted.caught_by)
    assert caught is not None, f"{planted.bug.name} survived {SEED_BUDGET} seeds"
    assert f"--bug {planted.bug.name}" in caught.report()  # the replay command plants it again
    for seed in range(1, last + 1):
        clean = run_seed(replace(planted.sim, seed=seed, bug=None))
        assert clean.ok, clean.report()


def test_every_bug_has_a_case() -> None:
    assert {c.bug for c in CASES} == set(Bug)


def test_bugs_are_configuration_not_globals() -> None:
    assert Config(id=1, rng=random.Random(0)).bugs == frozenset()
    assert parse_bug("COUNT_STALE_VOTES") is Bug.COUNT_STALE_VOTES
    with pytest.raises(ValueError, match="unknown bug"):
        parse_bug("NO_SUCH_BUG")
