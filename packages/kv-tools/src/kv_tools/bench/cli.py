"""``kv bench``: load an already running kv cluster from the command line.

The ``kv`` command wires it as a subcommand::

    bench = sub.add_parser("bench", help="closed-loop load against a running cluster")
    kv_tools.bench.cli.add_arguments(bench)
    ...
    if args.command == "bench":
        return kv_tools.bench.cli.run_from_args(args)

It prints a Markdown table (one row per concurrency level, medians over ``--rounds``) and
exits non-zero when any operation failed.
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
        default=[16],
        help="workers (closed loop); a comma-separated list runs each level",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat and report medians")
    parser.add_argument("--batch", type=int, default=1, help="operations per request (1 = unary)")
    parser.add_argument("--keyspace", type=int, default=100_000, help="distinct keys")
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
