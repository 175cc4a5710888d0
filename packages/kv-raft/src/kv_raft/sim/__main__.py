"""Command line: ``python -m kv_raft.sim --seeds 200 --nodes 3`` or ``--seed 1234`` to replay."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

from kv_raft.faults import Bug
from kv_raft.sim.simulation import RunResult, SimConfig, run_seed

# A soak is the CI run scaled up: the same seeds first, then many more (per cluster size).
SOAK_SEEDS = 10_000
# Long runs print a progress line this often, so one stopped early still says how far it got.
PROGRESS_EVERY = 200


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kv_raft.sim", description=__doc__)
    p.add_argument("--seed", type=int, help="run (replay) exactly this seed")
    p.add_argument("--seeds", type=int, default=50, help="number of seeds to run")
    p.add_argument("--first-seed", type=int, default=1, help="first seed of the range")
    p.add_argument(
        "--nodes",
        type=int,
        action="append",
        help="cluster size; repeat to run each size (default: 3 and 5)",
    )
    p.add_argument("--ticks", type=int, default=SimConfig.ticks, help="ticks with faults")
    p.add_argument("--liveness-ticks", type=int, default=SimConfig.liveness_ticks)
    p.add_argument("--soak", action="store_true", help=f"{SOAK_SEEDS} seeds unless --seeds given")
    p.add_argument("--bug", choices=[b.name for b in Bug], help="plant a known bug (test-only)")
    p.add_argument("--storm", action="store_true", help="stormy fault profile on every seed")
    p.add_argument("--skew", type=float, help="pin every node's clock skew bound (e.g. 0.4)")
    p.add_argument(
        "--pre-vote", action=argparse.BooleanOptionalAction, default=None, help="pin PreVote"
    )
    p.add_argument("--operator", type=float, help="pin the operator's rate of changes per tick")
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (seeds are independent)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    sizes = args.nodes or [3, 5]
    if args.seed is not None:
        seeds = [args.seed]
    else:
        count = SOAK_SEEDS if args.soak and "--seeds" not in (argv or sys.argv) else args.seeds
        seeds = list(range(args.first_seed, args.first_seed + count))
    wall = time.perf_counter()
    configs = [
        SimConfig(
            seed=seed,
            nodes=nodes,
            ticks=args.ticks,
            liveness_ticks=args.liveness_ticks,
            bug=args.bug,
            storm=args.storm,
            skew=args.skew,
            pre_vote=args.pre_vote,
            operator=args.operator,
        )
        for seed in seeds
        for nodes in sizes
    ]
    results: list[RunResult] = []
    failures = 0
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        runs = pool.map(run_seed, configs) if pool is not None else map(run_seed, configs)
        for result in runs:
            results.append(result)
            if args.verbose or not result.ok or len(configs) == 1:
                print(_line(result), flush=True)
            if len(configs) > PROGRESS_EVERY and len(results) % PROGRESS_EVERY == 0:
                _progress(results, len(configs), time.perf_counter() - wall)
            if not result.ok:
                failures += 1
                if not args.keep_going:
                    if pool is not None:
                        pool.shutdown(cancel_futures=True)
                    break
    _summary(results, time.perf_counter() - wall)
    return 1 if failures else 0


def _line(result: RunResult) -> str:
    s = result.stats
    return (
        f"{result.report()}  [nodes={result.config.nodes} ticks={s.ticks} "
        f"committed={s.committed} msgs={s.messages} terms={s.elections} crashes={s.crashes} "
        f"partitions={s.partitions} snapshots={s.snapshots_sent} conf={s.conf_changes} "
        f"ok_ops={s.ops_ok} unknown_ops={s.ops_unknown} fsync_failures={s.fsync_failures} "
        f"torn={s.torn_crashes} lost_unsynced={s.lost_unsynced} pauses={s.pauses} "
        f"max_apply_lag={s.max_apply_lag} cpu={s.cpu_seconds:.2f}s]"
    )


def _progress(results: list[RunResult], total: int, wall: float) -> None:
    failed = sum(1 for r in results if not r.ok)
    last = results[-1].config.seed
    print(
        f"progress: {len(results)}/{total} runs (through seed {last}), {failed} failed, "
        f"wall {wall:.0f}s",
        flush=True,
    )


def _summary(results: list[RunResult], wall: float) -> None:
    ticks = sum(r.stats.ticks for r in results)
    committed = sum(r.stats.committed for r in results)
    cpu = sum(r.stats.cpu_seconds for r in results) or 1e-9
    failed = [r for r in results if not r.ok]
    print(
        f"{len(results)} runs, {len(failed)} failed; {ticks} ticks, {committed} committed entries; "
        f"{ticks / cpu:,.0f} ticks/s and {committed / cpu:,.0f} entries/s of CPU; "
        f"wall {wall:.1f}s"
    )
    for r in failed:
        print(f"FAILED seed {r.config.seed} ({r.config.nodes} nodes): {r.failure}")
        print(f"  replay: {r.config.replay_command()}")


if __name__ == "__main__":
    sys.exit(main())
