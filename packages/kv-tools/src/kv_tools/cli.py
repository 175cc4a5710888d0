"""The ``kv`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kv_client.client import Client
from kv_client.errors import KvError
from kv_tools.bench import cli as bench_cli
from kv_tools.local_cluster import LocalClusterError
from kv_tools.local_cluster import run as run_local_cluster

DEFAULT_ADDRESSES = "127.0.0.1:7001"
ADDRESSES_ENV = "KV_ADDRESSES"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kv", description="Talk to a kv cluster.")
    p.add_argument(
        "--addr",
        default=os.environ.get(ADDRESSES_ENV, DEFAULT_ADDRESSES),
        help=f"node addresses to bootstrap from, comma-separated (env {ADDRESSES_ENV}; "
        f"default {DEFAULT_ADDRESSES})",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per command")
    sub = p.add_subparsers(dest="command", required=True)

    put = sub.add_parser("put", help="write a value; prints the new version")
    put.add_argument("key")
    put.add_argument("value")
    condition = put.add_mutually_exclusive_group()
    condition.add_argument("--if-version", type=int, help="only if the key is at this version")
    condition.add_argument("--if-absent", action="store_true", help="only if the key is absent")

    get = sub.add_parser("get", help="print a value (exit 1 when the key does not exist)")
    get.add_argument("key")
    get.add_argument("--version", action="store_true", help="also print the version")

    delete = sub.add_parser("delete", help="delete a key")
    delete.add_argument("key")
    delete.add_argument("--if-version", type=int, help="only if the key is at this version")

    locate = sub.add_parser("locate", help="show the partition and node that own a key")
    locate.add_argument("key")

    cluster = sub.add_parser("cluster", help="cluster commands").add_subparsers(
        dest="cluster_command", required=True
    )
    cluster.add_parser("status", help="members, partitions and keys per node, health")
    up = cluster.add_parser("up", help="run a local cluster of real node processes")
    up.add_argument("--nodes", type=int, default=0, help="node count (default 3 for a new --data)")
    up.add_argument("--data", type=Path, required=True, help="directory for the cluster's data")
    up.add_argument("--engine", choices=("lmdb", "memory"), default="lmdb")
    bench = sub.add_parser("bench", help="closed-loop load against a running cluster")
    bench_cli.add_arguments(bench)
    return p


def _put(client: Client, args: argparse.Namespace) -> int:
    if args.if_version is None and not args.if_absent:
        print(client.put(args.key, args.value))
        return 0
    if args.if_absent:
        result = client.put_if_absent(args.key, args.value)
    else:
        result = client.put_if_version(args.key, args.value, args.if_version)
    print(result.version)
    if not result.succeeded:
        print(f"condition failed: the key is at version {result.version}", file=sys.stderr)
        return 1
    return 0


def _get(client: Client, args: argparse.Namespace) -> int:
    found = client.get_versioned(args.key)
    if found is None:
        print(f"{args.key}: not found", file=sys.stderr)
        return 1
    if args.version:
        print(f"version {found.version}")
    sys.stdout.buffer.write(found.value + b"\n")
    return 0


def _delete(client: Client, args: argparse.Namespace) -> int:
    if args.if_version is None:
        existed = client.delete(args.key)
        print("deleted" if existed else "not found")
        return 0
    result = client.delete_if_version(args.key, args.if_version)
    if not result.succeeded:
        print(f"condition failed: the key is at version {result.version}", file=sys.stderr)
        return 1
    print("deleted")
    return 0


def _locate(client: Client, args: argparse.Namespace) -> int:
    location = client.locate(args.key)
    print(f"key:       {args.key}")
    print(f"partition: {location.partition}")
    print(f"owner:     {location.node_id} at {location.address}")
    return 0


def _status(client: Client, args: argparse.Namespace) -> int:
    cluster_map = client.cluster_map()
    by_node = cluster_map.placement.partitions_by_node()
    print(
        f"epoch {cluster_map.epoch}, {len(cluster_map.members)} members, "
        f"{cluster_map.partitions} partitions, replication factor {cluster_map.replication_factor}"
    )
    header = f"{'node':<12} {'address':<22} {'health':<8} {'partitions':>10} {'keys':>10}"
    print(header + f" {'served':>10} {'forwarded':>10}")
    down = 0
    for member in cluster_map.members:
        partitions = len(by_node.get(member.node_id, []))
        try:
            status = client.node_status(member.address, timeout=min(args.timeout, 2.0))
        except KvError:
            down += 1
            print(f"{member.node_id:<12} {member.address:<22} {'DOWN':<8} {partitions:>10}")
            continue
        print(
            f"{member.node_id:<12} {member.address:<22} {'up':<8} {partitions:>10} "
            f"{status.keys_stored:>10} {status.requests_served:>10} {status.requests_forwarded:>10}"
        )
    return 1 if down else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "bench":
        return bench_cli.run_from_args(args)
    try:
        if args.command == "cluster" and args.cluster_command == "up":
            return run_local_cluster(args.data, args.nodes, args.engine)
        with Client(args.addr, timeout=args.timeout) as client:
            if args.command == "cluster":
                return _status(client, args)
            handler = {"put": _put, "get": _get, "delete": _delete, "locate": _locate}
            return handler[args.command](client, args)
    except (KvError, LocalClusterError) as exc:
        print(f"kv: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
