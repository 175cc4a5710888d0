"""Chaos runs on real kv-node processes: load, faults, a checked history, a table per fault.

    python tests/chaos/run.py                        # the quick set (CI; `nox -s chaos`)
    python tests/chaos/run.py --all                  # every scenario, short
    python tests/chaos/run.py --long                 # every scenario, a soak
    python tests/chaos/run.py --scenario rf1-kill9 --seed 1234   # replay one run
    python tests/chaos/run.py --list

A scenario is a cluster (size, replication factor), a load (a few SDK clients on a few keys
per node, so operations collide) and a fault schedule, bounded in seconds and operations.
Every choice — keys, operations, which node, when — comes from the seed; the processes' own
timing does not, so a replay repeats the schedule, not the interleaving.

Scenarios that need node flags the node does not have (``--replication-factor``,
``--raft-tick-ms``, ``--peer-via``; read from ``kv-node --help``) are listed as NOT RUN with
the reason, never skipped silently; ``--require-all`` makes that an error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chaos.check import Verdict, judge
from chaos.faults import Faults, PeerLinks
from chaos.history import History, RecordingClient
from chaos.leaders import leader_of
from chaos.load import Load, LoadConfig
from chaos.proxy import CutMode
from chaos.report import fault_rows, render

from harness import Cluster, run_node_command
from kv_client import Client, KvError

REPLICATION_FLAG = "--replication-factor"
PEER_VIA_FLAG = "--peer-via"
TICK_FLAG = "--raft-tick-ms"
RAFT_TICK_MS = 50
"""Elections take 10-20 ticks: 0.5-1 s, so a fault's recovery fits a short run."""
ELECTION_TIMEOUT_MAX = 20 * RAFT_TICK_MS / 1000
REPLICATED_PARTITIONS = 16
"""Few partitions: the load's keys cover several, and start-up stays fast on 2 cores."""
KEYS_PER_NODE = 3  # few keys, so that operations collide; every node owns some
CLIENTS = 4
FINAL_CLIENT = 1_000  # client id of the reads after the faults (above every load client)
FINAL_READ_TIMEOUT = 60.0
WARMUP_ACKS = 100  # writes acknowledged before the first fault
GAP_ACKS = 150  # writes acknowledged between faults (the cluster recovered)
GAP_MAX = 15.0  # ...or this many seconds, whichever first (a run that never recovers goes on)
DOWN_OPS = 200  # ops the load completes while a killed node is down
DOWN_MAX = 3.0
PAUSE_SECONDS = 3.0
"""SIGSTOP length: well above the longest election timeout (ELECTION_TIMEOUT_MAX)."""
ISOLATE_SECONDS = 3.0
COMPACT_FLAG = "--raft-compact-after"
RAFT_COMPACT_AFTER = 10
"""For the behind-compaction scenario: logs compact every 20 entries (keeping 10), so a node
down for a few hundred writes is past every loaded group's log; the default (10,000 per
group) would take minutes of load here."""
BEHIND_ACKED_WRITES = 400
"""Writes acknowledged while the node is down: about 60 per key, 3-6 compactions of every
loaded group (the keys spread over most of the REPLICATED_PARTITIONS)."""
BEHIND_MAX_DOWN = 10.0
CATCH_UP_TIMEOUT = 15.0
"""From the restarted node serving until its metrics must show a snapshot installed."""
BULK_BYTES = 17 * 1024 * 1024
"""Written into one partition the dead node hosts (and the load does not touch) while it is
down, so that its catch-up includes a snapshot above the transport's 16 MiB message limit:
only chunking can carry it."""
BULK_VALUE_BYTES = 512 * 1024
BULK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Budget:
    seconds: float
    max_ops: int


SHORT = Budget(seconds=10.0, max_ops=20_000)
LONG = Budget(seconds=300.0, max_ops=400_000)


@dataclass
class Context:
    """What a fault schedule works with."""

    faults: Faults
    history: History
    rng: random.Random
    node_ids: list[str]
    addresses: list[str]
    keys: list[str]
    replicated: bool
    node_addresses: dict[str, str]
    deadline: float
    load: Load
    problems: list[str]
    """What the run must fail for besides the verdict (a fault that did not do its job)."""

    def over(self) -> bool:
        return time.monotonic() >= self.deadline or self.history.full or not self.load.running

    def gap(self) -> None:
        self.history.wait_for(acked_writes=GAP_ACKS, timeout=GAP_MAX)

    def load_free_partitions(self) -> list[tuple[int, tuple[str, ...]]]:
        """The partitions no load key is in, with their replicas."""
        with Client(self.addresses) as kv:
            used = {kv.locate(key).partition for key in self.keys}
            placement = kv.cluster_map().placement
            partitions = range(kv.cluster_map().partitions)
            return [(p, placement.replicas(p)) for p in partitions if p not in used]

    def fill(self, partition: int) -> None:
        """Write ``BULK_BYTES`` into ``partition`` under keys of its own (not recorded: the
        load never reads them). Puts of the same value are retried until they succeed."""
        value = self.rng.randbytes(BULK_VALUE_BYTES)
        deadline = time.monotonic() + BULK_TIMEOUT
        with Client(self.addresses) as kv:
            wanted = -(-BULK_BYTES // BULK_VALUE_BYTES)
            chosen: list[str] = []
            for i in itertools.count():
                if kv.locate(f"bulk{i}").partition == partition:
                    chosen.append(f"bulk{i}")
                    if len(chosen) == wanted:
                        break
            for key in chosen:
                while True:
                    try:
                        kv.put(key, value)
                        break
                    except KvError:
                        if time.monotonic() > deadline:
                            raise
        print(f"   wrote {BULK_BYTES} bytes into partition {partition}", flush=True)

    def random_node(self) -> str:
        return self.rng.choice(self.node_ids)

    def busiest_node(self) -> str:
        """The node leading the most of the load's partitions now (ties: the seed picks).

        Asked afresh before every fault: of the nodes themselves when replicated (see
        ``chaos.leaders``), else the owners in the cluster map.
        """
        counts = dict.fromkeys(self.node_ids, 0)
        if self.replicated:
            for key in self.keys:
                leader = leader_of(key, self.node_addresses)
                if leader is not None:
                    counts[leader] += 1
        else:
            with Client(self.addresses) as kv:
                for key in self.keys:
                    counts[kv.locate(key).node_id] += 1
        top = max(counts.values())
        return self.rng.choice(sorted(n for n, c in counts.items() if c == top))


Schedule = Callable[[Context], None]


def kill9_random(ctx: Context) -> None:
    while not ctx.over():
        ctx.faults.kill9(ctx.random_node(), down_ops=DOWN_OPS, max_down=DOWN_MAX)
        ctx.gap()


def kill9_busiest(ctx: Context) -> None:
    while not ctx.over():
        ctx.faults.kill9(ctx.busiest_node(), down_ops=DOWN_OPS, max_down=DOWN_MAX)
        ctx.gap()


def pause_random(ctx: Context) -> None:
    while not ctx.over():
        ctx.faults.pause(ctx.random_node(), PAUSE_SECONDS)
        ctx.gap()


def pause_busiest(ctx: Context) -> None:
    while not ctx.over():
        ctx.faults.pause(ctx.busiest_node(), PAUSE_SECONDS)
        ctx.gap()


def rolling_restart(ctx: Context) -> None:
    while not ctx.over():
        ctx.faults.rolling_restart(ctx.rng.sample(ctx.node_ids, len(ctx.node_ids)))
        ctx.gap()


def kill9_behind_compaction(ctx: Context) -> None:
    bulk_partitions = ctx.load_free_partitions()
    while not ctx.over():
        node = ctx.random_node()
        hosted = [p for p, replicas in bulk_partitions if node in replicas]
        bulk = ctx.rng.choice(hosted) if hosted else None
        catch_up = ctx.faults.kill9_behind_compaction(
            node,
            acked_writes=BEHIND_ACKED_WRITES,
            max_down=BEHIND_MAX_DOWN,
            catch_up_timeout=CATCH_UP_TIMEOUT,
            while_down=(lambda: None) if bulk is None else partial(ctx.fill, bulk),
            min_bytes=0 if bulk is None else BULK_BYTES,
        )
        print(f"   {node} behind compaction: {catch_up.describe()}", flush=True)
        if not catch_up.by_snapshot(0 if bulk is None else BULK_BYTES):
            ctx.problems.append(
                f"{node} restarted after falling behind compaction but did not catch up by "
                f"snapshot within {CATCH_UP_TIMEOUT:g}s {catch_up.describe()}"
            )
        ctx.gap()


def isolate(mode: CutMode) -> Schedule:
    def schedule(ctx: Context) -> None:
        while not ctx.over():
            ctx.faults.isolate(ctx.random_node(), ISOLATE_SECONDS, mode)
            ctx.gap()

    return schedule


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: int
    replication_factor: int
    schedule: Schedule
    what: str
    needs: tuple[str, ...] = ()  # kv-node flags it depends on
    peer_links: bool = False
    extra: tuple[str, ...] = ()  # node flags of its own (replicated runs only)

    def node_args(self, stand_in: bool) -> list[str]:
        if self.replication_factor == 1 or stand_in:
            return []
        return [
            REPLICATION_FLAG,
            str(self.replication_factor),
            "--partitions",
            str(REPLICATED_PARTITIONS),
            TICK_FLAG,
            str(RAFT_TICK_MS),
            *self.extra,
        ]


def _replicated(nodes: int) -> list[Scenario]:
    rf = (REPLICATION_FLAG, TICK_FLAG)
    links = (*rf, PEER_VIA_FLAG)
    return [
        Scenario(f"rf3-kill9-leader-{nodes}n", nodes, 3, kill9_busiest,
                 "kill -9 the node leading most partitions, restart it", rf),
        Scenario(f"rf3-sigstop-leader-{nodes}n", nodes, 3, pause_busiest,
                 f"SIGSTOP the busiest leader {PAUSE_SECONDS:g}s (past election timeout)", rf),
        Scenario(f"rf3-isolate-reset-{nodes}n", nodes, 3, isolate(CutMode.RESET),
                 "cut one node's peer links (RST), heal", links, peer_links=True),
        Scenario(f"rf3-isolate-blackhole-{nodes}n", nodes, 3, isolate(CutMode.BLACKHOLE),
                 "blackhole one node's peer links, heal", links, peer_links=True),
        Scenario(f"rf3-rolling-restart-{nodes}n", nodes, 3, rolling_restart,
                 "SIGTERM + restart every node in turn", rf),
        Scenario(f"rf3-behind-compaction-{nodes}n", nodes, 3, kill9_behind_compaction,
                 "kill -9 a node until the others compact past it, restart: catch up by "
                 "snapshot", (*rf, COMPACT_FLAG),
                 extra=(COMPACT_FLAG, str(RAFT_COMPACT_AFTER))),
    ]  # fmt: skip


QUICK_SET = (
    "rf1-kill9",
    "rf3-kill9-leader-3n",
    "rf3-sigstop-leader-3n",
    "rf3-isolate-blackhole-5n",
    "rf3-rolling-restart-3n",
    "rf3-behind-compaction-3n",
)
"""What a bare run (CI) covers: every fault kind once, 3 and 5 nodes, in about 2 minutes.
``--all`` runs every scenario; ``--long`` runs every scenario for longer."""

SCENARIOS: list[Scenario] = [
    Scenario("rf1-kill9", 3, 1, kill9_random, "kill -9 a random node under load, restart it"),
    Scenario("rf1-sigstop", 3, 1, pause_random, f"SIGSTOP a random node {PAUSE_SECONDS:g}s"),
    Scenario("rf1-rolling-restart", 3, 1, rolling_restart, "SIGTERM + restart every node"),
    *_replicated(3),
    *_replicated(5),
]


@dataclass
class Outcome:
    scenario: Scenario
    verdict: Verdict
    table: str
    data_dir: Path
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict.ok and not self.problems


def node_flags() -> str:
    """``kv-node --help``: what this node build supports."""
    return run_node_command("--help").stdout


def pick_keys(addresses: list[str], node_ids: list[str]) -> dict[str, tuple[str, int]]:
    """KEYS_PER_NODE keys owned by each node: key -> (owner, partition)."""
    chosen: dict[str, tuple[str, int]] = {}
    per_node = dict.fromkeys(node_ids, 0)
    with Client(addresses) as kv:
        for i in range(10_000):
            key = f"k{i}"
            location = kv.locate(key)
            if per_node[location.node_id] < KEYS_PER_NODE:
                per_node[location.node_id] += 1
                chosen[key] = (location.node_id, location.partition)
            if all(count == KEYS_PER_NODE for count in per_node.values()):
                return chosen
    raise RuntimeError(f"could not find {KEYS_PER_NODE} keys per node: {per_node}")


async def final_reads(addresses: list[str], keys: Sequence[str], history: History) -> None:
    """Read every key once the faults are over (retrying until it answers): the history's
    last word on what survived."""
    client = RecordingClient(FINAL_CLIENT, addresses, history)
    history.max_ops += len(keys) * 1_000  # the final reads are never refused for space
    deadline = time.monotonic() + FINAL_READ_TIMEOUT
    try:
        for key in keys:
            while True:
                record = await client.get(key)
                if (record is not None and record.outcome == "ok") or (time.monotonic() > deadline):
                    break
    finally:
        await client.close()


def run_scenario(
    scenario: Scenario,
    seed: int,
    budget: Budget,
    *,
    keep: bool,
    engine: str,
    stand_in: bool,
    workdir: Path | None = None,
) -> Outcome:
    """One run: start, load, faults, final reads, stop everything, judge.

    ``stand_in`` runs a scenario whose node flags are missing on RF=1 nodes whose peer links
    are not routed through the proxies: it proves the schedule's mechanics, not replication.
    """
    started = time.monotonic()
    rng = random.Random(f"{seed}:{scenario.name}")
    root = Path(tempfile.mkdtemp(prefix=f"kv-chaos-{scenario.name}-", dir=workdir))
    node_ids = [f"n{i + 1}" for i in range(scenario.nodes)]
    history = History(max_ops=budget.max_ops)
    cluster = Cluster(root, node_ids, engine=engine, extra=scenario.node_args(stand_in))
    links: PeerLinks | None = None
    load: Load | None = None
    problems: list[str] = []
    try:
        if scenario.peer_links:
            links = PeerLinks(cluster)
            for node_id, node in cluster.nodes.items():
                node.extra += [] if stand_in else links.node_flags(node_id)
        cluster.start()
        placed = pick_keys(cluster.addresses, node_ids)
        keys = sorted(placed)
        load = Load(
            # The schedule ends the load; this deadline only bounds a schedule that hangs.
            LoadConfig(
                cluster.addresses,
                keys,
                CLIENTS,
                seed,
                time.monotonic() + 10 * GAP_MAX + budget.seconds,
            ),
            history,
        ).start()
        faults = Faults(cluster, history, links)
        if not history.wait_for(acked_writes=WARMUP_ACKS, timeout=GAP_MAX):
            problems.append(f"the load did not reach {WARMUP_ACKS} acknowledged writes")
        ctx = Context(
            faults,
            history,
            rng,
            node_ids,
            cluster.addresses,
            keys,
            scenario.replication_factor > 1 and not stand_in,
            {node_id: node.address for node_id, node in cluster.nodes.items()},
            time.monotonic() + budget.seconds,  # the schedule's time starts after the warmup
            load,
            problems,
        )
        try:
            scenario.schedule(ctx)
        finally:
            load.stop()
            if load.error is not None:
                problems.append(f"the load crashed: {load.error!r}")
            faults.everyone_up()
        if not history.faults:
            problems.append("no fault was injected (the budget ran out first)")
        asyncio.run(final_reads(cluster.addresses, keys, history))
    finally:
        try:
            if load is not None:
                load.stop()
        finally:
            cluster.stop()
            if links is not None:
                links.stop()
    checking = time.monotonic()
    verdict = judge(history.records, FINAL_CLIENT)
    problems += [] if verdict.ok else [f"see the verdict ({len(history.records)} ops recorded)"]
    print(f"   checked {len(history.records)} ops in {time.monotonic() - checking:.1f}s")
    partitions = {key: partition for key, (_, partition) in placed.items()}
    table = render(history, fault_rows(history, partitions, CLIENTS), CLIENTS)
    outcome = Outcome(scenario, verdict, table, root, time.monotonic() - started, problems)
    _save_history(root / "history.json", history)
    if outcome.ok and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return outcome


def _save_history(path: Path, history: History) -> None:
    """Every op and fault, for a post-mortem of a failing run (kept with the node logs)."""
    data = {
        "records": [asdict(r) for r in history.records],
        "faults": [asdict(f) for f in history.faults],
        "started": history.started,
    }
    path.write_text(json.dumps(data))


def replay_command(scenario: Scenario, seed: int, args: argparse.Namespace) -> str:
    command = ["python", "tests/chaos/run.py", "--scenario", scenario.name, "--seed", str(seed)]
    if args.long:
        command.append("--long")
    if args.seconds:
        command += ["--seconds", str(args.seconds)]
    if args.max_ops:
        command += ["--max-ops", str(args.max_ops)]
    if args.stand_in:
        command.append("--stand-in")
    if args.engine != "lmdb":
        command += ["--engine", args.engine]
    return shlex.join(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="default: a random seed, printed")
    parser.add_argument("--scenario", action="append", help="run only these (repeatable)")
    parser.add_argument(
        "--long", action="store_true", help="a soak: every scenario, longer, more faults"
    )
    parser.add_argument("--all", action="store_true", help="every scenario (default: a quick set)")
    parser.add_argument("--seconds", type=float, help="fault schedule length per scenario")
    parser.add_argument("--max-ops", type=int, help="bound on recorded ops per scenario")
    parser.add_argument("--keep", action="store_true", help="keep data dirs of passing runs")
    parser.add_argument(
        "--require-all", action="store_true", help="fail if a scenario cannot run here"
    )
    parser.add_argument(
        "--engine",
        default="lmdb",
        help="node storage engine; `memory` loses everything on kill -9: a run that must FAIL",
    )
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="run scenarios whose node flags are missing on RF=1 nodes, links not routed "
        "(checks the harness's own mechanics; proves nothing about replication)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.list:
        for s in SCENARIOS:
            quick = "quick" if s.name in QUICK_SET else ""
            print(f"{s.name:28} {quick:6}{s.nodes} nodes RF={s.replication_factor}  {s.what}")
        return 0
    if args.scenario:
        chosen = [s for s in SCENARIOS if s.name in args.scenario]
    elif args.all or args.long:
        chosen = list(SCENARIOS)
    else:
        chosen = [s for s in SCENARIOS if s.name in QUICK_SET]
    unknown = set(args.scenario or ()) - {s.name for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))} (see --list)")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    base = LONG if args.long else SHORT
    budget = Budget(args.seconds or base.seconds, args.max_ops or base.max_ops)
    print(f"chaos: seed {seed}, {budget.seconds:g}s and at most {budget.max_ops} ops per scenario")

    help_text = node_flags()
    runnable: list[Scenario] = []
    not_run: list[tuple[Scenario, str]] = []
    for s in chosen:
        missing = [flag for flag in s.needs if flag not in help_text]
        if missing and not args.stand_in:
            not_run.append((s, f"kv-node has no {', '.join(missing)} (checked `kv-node --help`)"))
        else:
            runnable.append(s)

    failed: list[str] = []
    for scenario in runnable:
        print(f"\n== {scenario.name}: {scenario.nodes} nodes, RF={scenario.replication_factor}, "
              f"{scenario.what}", flush=True)  # fmt: skip
        stand_in = any(flag not in help_text for flag in scenario.needs)
        if stand_in:
            print("   STAND-IN: RF=1 nodes, peer links not routed through the proxies")
        try:
            outcome = run_scenario(
                scenario, seed, budget, keep=args.keep, engine=args.engine, stand_in=stand_in
            )
        except Exception:  # the harness itself broke: still say how to replay
            traceback.print_exc()
            print(f"FAIL {scenario.name}: the run itself failed (above)")
        else:
            print(outcome.table)
            print(outcome.verdict.describe())
            for problem in outcome.problems:
                print(f"problem: {problem}")
            status = "PASS" if outcome.ok else "FAIL"
            print(f"{status} {scenario.name} in {outcome.seconds:.1f}s", flush=True)
            if outcome.ok:
                continue
            print(f"   node logs and history.json: {outcome.data_dir}")
        failed.append(scenario.name)
        print(f"   replay: {replay_command(scenario, seed, args)}", flush=True)

    if not_run:
        print(f"\nNOT RUN ({len(not_run)} scenario(s) need what this node does not have yet):")
        for s, reason in not_run:
            print(f"  {s.name}: {reason}")
    print(f"\nchaos: {len(runnable) - len(failed)} passed, {len(failed)} failed, "
          f"{len(not_run)} not run; seed {seed}")  # fmt: skip
    if failed:
        return 1
    if not_run and args.require_all:
        print("chaos: --require-all: scenarios that could not run count as failures")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
