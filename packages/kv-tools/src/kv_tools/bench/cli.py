"""``kv bench``: load an already running kv cluster from the command line.

The ``kv`` command wires it as a subcommand::

    bench = sub.add_parser("bench", help="closed-loop load against a running cluster")
    kv_tools.bench.cli.add_arguments(bench)
    ...
    if args.command == "bench":
        return kv_tools.bench.cli.run_from_args(args)

It prints a Markdown table (one row per concurrency level, medians over ``--rounds``) and
exits non-zero when any operation failed. ``kv bench --suite NAME`` instead runs one of the
suites of ``python -m kv_tools.bench``, which start their own servers (``replication``: kv at
RF=3 against a 3-member etcd).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from kv_tools.bench.drivers import Driver, DriverError, SdkDriver, StubDriver
from kv_tools.bench.keys import DISTRIBUTIONS
from kv_tools.bench.loadgen import LoadSpec, preload, run_load
from kv_tools.bench.report import results_table
from kv_tools.bench.suite import Aggregate, Config
from kv_tools.bench.workload import WORKLOADS, WorkloadSpec

DEFAULT_ADDRESSES = "127.0.0.1:7001"
DEFAULT_DURATION = 10.0
DEFAULT_WARMUP = 1.0
DEFAULT_ROUNDS = 1
DEFAULT_KEYSPACE = 100_000
DEFAULT_LEVELS = [16]
SUITE_NAMES = ("smoke", "full", "replication")
"""The suites of ``python -m kv_tools.bench`` (kept here so that ``kv bench --help`` does not
import them)."""


def parse_levels(text: str) -> list[int]:
    """A comma-separated list of positive integers (concurrency levels)."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``kv bench``'s options to ``parser`` (a subparser of ``kv``)."""
    parser.add_argument(
        "--addr",
        dest="bench_addr",
        help="node addresses, comma-separated (default: kv's own --addr)",
    )
    parser.add_argument(
        "--workload", choices=WORKLOADS, default="write", help="write or YCSB A/B/C"
    )
    parser.add_argument(
        "--concurrency",
        type=parse_levels,
        default=DEFAULT_LEVELS,
        help="workers (closed loop); a comma-separated list runs each level",
    )
    parser.add_argument(
        "--duration", type=float, help=f"measured seconds per round (default {DEFAULT_DURATION:g})"
    )
    parser.add_argument(
        "--warmup", type=float, help=f"unmeasured seconds first (default {DEFAULT_WARMUP:g})"
    )
    parser.add_argument(
        "--rounds", type=int, help=f"repeat and report medians (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument("--batch", type=int, default=1, help="operations per request (1 = unary)")
    parser.add_argument(
        "--keyspace", type=int, help=f"distinct keys (default {DEFAULT_KEYSPACE:,})"
    )
    parser.add_argument("--distribution", choices=DISTRIBUTIONS, default="uniform")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value")
    parser.add_argument(
        "--via",
        choices=("sdk", "node"),
        default="sdk",
        help="sdk: route each key to its owner; node: send everything to the first address",
    )
    parser.add_argument(
        "--no-preload",
        dest="preload",
        action="store_false",
        help="do not write the keyspace before a read workload",
    )
    parser.add_argument("--max-ops", type=int, default=50_000_000, help="stop after this many ops")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--suite",
        choices=SUITE_NAMES,
        help="instead of loading a running cluster, start every target here and run this "
        "suite (python -m kv_tools.bench); --duration, --warmup, --rounds, --keyspace, "
        "--concurrency and --seed are passed on when given, the rest is the suite's",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="with --suite: results directory"
    )


def suite_argv(args: argparse.Namespace, given_concurrency: bool) -> list[str]:
    """The ``python -m kv_tools.bench`` arguments for ``kv bench --suite``."""
    argv = ["--suite", args.suite, "--out", str(args.out), "--seed", str(args.seed)]
    for option in ("duration", "warmup", "rounds", "keyspace"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option}", str(value)]
    if given_concurrency:
        argv += ["--concurrency", ",".join(str(level) for level in args.concurrency)]
    return argv


def _driver(via: str, addresses: str) -> Driver:
    if via == "sdk":
        return SdkDriver(addresses)
    return StubDriver(addresses.split(",")[0].strip())


async def _run(args: argparse.Namespace, addresses: str) -> list[Aggregate]:
    aggregates = []
    if args.workload != "write" and args.preload:
        driver = _driver(args.via, addresses)
        await driver.setup()
        try:
            failed = await preload(driver, args.keyspace, args.value_size)
        finally:
            await driver.close()
        if failed:
            raise DriverError(f"{failed} preload puts failed")
    for level in args.concurrency:
        config = Config(
            "cluster",
            args.via,
            args.workload,
            batch=args.batch,
            concurrency=level,
            distribution=args.distribution,
        )
        aggregate = Aggregate(config)
        for round_number in range(args.rounds):
            spec = LoadSpec(
                workload=WorkloadSpec(
                    args.workload,
                    keyspace=args.keyspace,
                    distribution=args.distribution,
                    value_size=args.value_size,
                    batch=args.batch,
                    seed=args.seed + round_number,
                ),
                concurrency=level,
                duration=args.duration,
                warmup=args.warmup,
                max_ops=args.max_ops,
            )
            driver = _driver(args.via, addresses)
            await driver.setup()
            try:
                result = await run_load(driver, spec)
            finally:
                await driver.close()
            aggregate.rounds.append(result)
            print(
                f"{config.label}: round {round_number + 1}: {result.ops_per_sec:,.0f} ops/s, "
                f"{result.errors} errors",
                file=sys.stderr,
            )
        aggregates.append(aggregate)
    return aggregates


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``kv bench``; returns the exit code (0 ok, 1 operations failed, 2 cannot run)."""
    if args.suite is not None:
        from kv_tools.bench import __main__ as suites

        return suites.main(suite_argv(args, args.concurrency is not DEFAULT_LEVELS))
    args.duration = DEFAULT_DURATION if args.duration is None else args.duration
    args.warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    args.rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    args.keyspace = DEFAULT_KEYSPACE if args.keyspace is None else args.keyspace
    addresses = args.bench_addr or getattr(args, "addr", None) or DEFAULT_ADDRESSES
    if args.batch < 1 or args.rounds < 1 or args.duration <= 0 or args.keyspace < 1:
        print(
            "kv bench: --batch, --rounds, --duration and --keyspace must be positive",
            file=sys.stderr,
        )
        return 2
    try:
        aggregates = asyncio.run(_run(args, addresses))
    except DriverError as exc:
        print(f"kv bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(results_table(aggregates))
    if args.json is not None:
        args.json.write_text(json.dumps([a.to_dict() for a in aggregates], indent=1) + "\n")
    return 1 if any(a.errors for a in aggregates) else 0


def main() -> int:
    """Standalone use: ``python -m kv_tools.bench.cli --addr HOST:PORT ...``."""
    parser = argparse.ArgumentParser(prog="kv bench", description="Load a running kv cluster.")
    add_arguments(parser)
    return run_from_args(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
