"""The runner never skips silently: scenarios the node cannot run are named, with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos import run

pytestmark = pytest.mark.chaos

OLD_NODE_HELP = "usage: kv-node [-h] --id ID [--cluster ID=HOST:PORT,...]"


@pytest.fixture
def old_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "node_flags", lambda: OLD_NODE_HELP)


@pytest.mark.usefixtures("old_node")
def test_scenarios_needing_missing_flags_are_listed_as_not_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--scenario", "rf3-isolate-reset-3n", "--scenario", "rf3-kill9-leader-5n"]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "NOT RUN (2 scenario(s)" in out
    assert (
        "rf3-isolate-reset-3n: kv-node has no --replication-factor, --raft-tick-ms, --peer-via"
        in out
    )
    assert (
        "rf3-kill9-leader-5n: kv-node has no --replication-factor, --raft-tick-ms (checked" in out
    )
    assert "0 passed, 0 failed, 2 not run" in out


@pytest.mark.usefixtures("old_node")
def test_require_all_turns_not_run_into_a_failure() -> None:
    assert run.main(["--scenario", "rf3-rolling-restart-3n", "--require-all"]) == 1


def test_every_replicated_scenario_needs_the_replication_flag() -> None:
    replicated = [s for s in run.SCENARIOS if s.replication_factor > 1]
    assert {s.nodes for s in replicated} == {3, 5}
    assert all(run.REPLICATION_FLAG in s.needs for s in replicated)
    assert all(run.PEER_VIA_FLAG in s.needs for s in replicated if s.peer_links)


def test_replay_command_carries_every_setting_that_changes_the_run() -> None:
    scenario = run.SCENARIOS[0]
    args = run.build_parser().parse_args(["--long", "--seconds", "9", "--engine", "memory"])
    assert run.replay_command(scenario, 17, args) == (
        f"python tests/chaos/run.py --scenario {scenario.name} --seed 17 --long "
        "--seconds 9.0 --engine memory"
    )


def test_a_node_that_forgets_on_kill_9_fails_the_run(tmp_path: Path) -> None:
    """The whole pipeline on real processes can fail: the volatile engine loses every write
    on kill -9, and the load sees it (a read of absent, a refused or an accepted conditional
    write that contradicts an acknowledged write)."""
    scenario = next(s for s in run.SCENARIOS if s.name == "rf1-kill9")
    outcome = run.run_scenario(
        scenario, 7, run.Budget(seconds=8.0, max_ops=20_000), keep=False, engine="memory",
        stand_in=False, workdir=tmp_path,
    )  # fmt: skip
    assert len(outcome.table.splitlines()) > 3  # at least one fault row
    assert not outcome.ok
    assert outcome.verdict.linearizable is False, outcome.verdict.describe()


def test_the_behind_compaction_scenario_lowers_the_bound_and_needs_the_flag() -> None:
    behind = [s for s in run.SCENARIOS if s.schedule is run.kill9_behind_compaction]
    assert {s.nodes for s in behind} == {3, 5}
    assert "rf3-behind-compaction-3n" in run.QUICK_SET
    for scenario in behind:
        assert run.COMPACT_FLAG in scenario.needs
        args = scenario.node_args(stand_in=False)
        assert args[args.index(run.COMPACT_FLAG) + 1] == str(run.RAFT_COMPACT_AFTER)
        assert run.COMPACT_FLAG not in scenario.node_args(stand_in=True)
