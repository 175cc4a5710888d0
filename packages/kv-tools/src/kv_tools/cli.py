"""The ``kv`` command line.

Talking to a cluster must start fast, so the benchmark (and its extra libraries) is imported
only by ``kv bench``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kv_client import Client, KvError
from kv_common.cluster_map import ClusterMap
from kv_tools import cluster_control, node_view
from kv_tools.cluster_dir import LocalClusterError, read_state, require_layout
from kv_tools.local_cluster import describe_exit
from kv_tools.local_cluster import run as run_local_cluster

DEFAULT_ADDRESSES = "127.0.0.1:7001"
ADDRESSES_ENV = "KV_ADDRESSES"
BENCH_EXTRA = "kv-tools[bench]"
STATUS_TIMEOUT = 2.0  # per node, so that one stopped node does not stall the table


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

    locate = sub.add_parser(
        "locate", help="show the partition and node that own a key (replicated: and its leader)"
    )
    locate.add_argument("key")

    cluster = sub.add_parser("cluster", help="cluster commands").add_subparsers(
        dest="cluster_command", required=True
    )
    status = cluster.add_parser(
        "status",
        help="members, partitions and keys per node, health (replicated: leaders, partitions "
        "without a leader or a quorum); exit 1 if any is down",
    )
    status.add_argument(
        "--data", type=Path, help="a kv cluster up directory: its addresses and processes"
    )
    up = cluster.add_parser("up", help="run a local cluster of real node processes")
    up.add_argument("--nodes", type=int, default=0, help="node count (default 3 for a new --data)")
    up.add_argument("--data", type=Path, required=True, help="directory for the cluster's data")
    up.add_argument("--engine", choices=("lmdb", "memory"), default="lmdb")
    up.add_argument(
        "--replication-factor",
        type=int,
        default=0,
        help="copies of each partition, capped at --nodes (default 3 for a new --data; "
        "1 for the memory engine)",
    )
    for action, text in (
        ("stop", "SIGTERM one node of a running kv cluster up (it drains, then exits)"),
        ("kill", "kill -9 one node of a running kv cluster up"),
        ("start", "start a down node again on its address and data"),
        ("restart", "stop, then start, one node"),
    ):
        one = cluster.add_parser(action, help=text)
        one.add_argument("node_id", metavar="ID", help="node id, e.g. n2")
        one.add_argument("--data", type=Path, required=True, help="the kv cluster up directory")
    # Its options belong to kv_tools.bench.cli, parsed only when kv bench runs.
    sub.add_parser(
        "bench",
        help=f"closed-loop load against a running cluster (needs {BENCH_EXTRA})",
        add_help=False,
    )
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
    cluster_map = client.cluster_map()
    if cluster_map.replication_factor > 1:
        print(f"replicas:  {', '.join(location.replicas)}")
        # Only the partition's replicas host its group, so only they can know its leader.
        addresses = [cluster_map.address_of(node_id) for node_id in location.replicas]
        leader, seen_by = node_view.leader_of(
            location.partition, addresses, min(args.timeout, STATUS_TIMEOUT)
        )
        if leader is None:
            print("leader:    unknown (no replica knows one)")
        else:
            print(f"leader:    {leader} at {cluster_map.address_of(leader)} (seen by {seen_by})")
    return 0


def _processes(data: Path | None) -> dict[str, str]:
    """Per node id, what ``kv cluster up`` in ``data`` knows of its process."""
    if data is None:
        return {}
    state = read_state(data)
    if not state.supervised():
        return {node_id: "no kv cluster up running" for node_id in state.nodes}
    described = {}
    for node_id, entry in state.nodes.items():
        if entry.running() and entry.process is not None:
            described[node_id] = f"{entry.state}, pid {entry.process.pid}"
        elif entry.exit_code is not None:
            described[node_id] = f"exited with {describe_exit(entry.exit_code)}"
        else:
            described[node_id] = "down"
    return described


def _status(client: Client, args: argparse.Namespace) -> int:
    processes = _processes(args.data)
    cluster_map = client.cluster_map()
    print(
        f"epoch {cluster_map.epoch}, {len(cluster_map.members)} members, "
        f"{cluster_map.partitions} partitions, replication factor {cluster_map.replication_factor}"
    )
    if cluster_map.replication_factor > 1:
        return _replicated_status(cluster_map, processes, args.timeout)
    by_node = cluster_map.placement.partitions_by_node()
    header = f"{'node':<12} {'address':<22} {'health':<8} {'partitions':>10} {'keys':>10}"
    print(header + f" {'served':>10} {'forwarded':>10}")
    down = 0
    for member in cluster_map.members:
        partitions = len(by_node.get(member.node_id, []))
        try:
            status = client.node_status(member.address, timeout=min(args.timeout, STATUS_TIMEOUT))
        except KvError:
            down += 1
            process = processes.get(member.node_id)
            note = f"{'':>33}{process}" if process else ""
            print(f"{member.node_id:<12} {member.address:<22} {'DOWN':<8} {partitions:>10}{note}")
            continue
        print(
            f"{member.node_id:<12} {member.address:<22} {'up':<8} {partitions:>10} "
            f"{status.keys_stored:>10} {status.requests_served:>10} {status.requests_forwarded:>10}"
        )
    return 1 if down else 0


def _replicated_status(cluster_map: ClusterMap, processes: dict[str, str], timeout: float) -> int:
    """Per node, its own view of its groups: how many it leads, how many it knows no leader
    of, how many of its followers lack committed entries; then the partitions led in all
    and those that cannot elect a leader because too few of their replicas are up."""
    by_node = cluster_map.placement.partitions_by_node()
    header = f"{'node':<12} {'address':<22} {'health':<8} {'partitions':>10} {'keys':>10}"
    print(
        header + f" {'served':>10} {'forwarded':>10} {'leaders':>8} {'no leader':>9} {'behind':>7}"
    )
    up: set[str] = set()
    led = 0
    for member in cluster_map.members:
        partitions = len(by_node.get(member.node_id, []))
        status = node_view.node_status(member.address, min(timeout, STATUS_TIMEOUT))
        if status is None:
            process = processes.get(member.node_id)
            note = f"{'':>33}{process}" if process else ""
            print(f"{member.node_id:<12} {member.address:<22} {'DOWN':<8} {partitions:>10}{note}")
            continue
        up.add(member.node_id)
        led += status.partitions_led
        print(
            f"{member.node_id:<12} {member.address:<22} {'up':<8} {partitions:>10} "
            f"{status.keys_stored:>10} {status.requests_served:>10} "
            f"{status.requests_forwarded:>10} {status.partitions_led:>8} "
            f"{status.partitions_without_leader:>9} {status.replicas_behind:>7}"
        )
    no_quorum = node_view.without_quorum(cluster_map, up)
    print(
        f"leaders: {min(led, cluster_map.partitions)} of {cluster_map.partitions} partitions "
        f"led; {no_quorum} without a quorum of replicas up"
    )
    return 1 if len(up) < len(cluster_map.members) else 0


def _bench(args: argparse.Namespace, bench_argv: list[str]) -> int:
    try:
        from kv_tools.bench import cli as bench_cli
    except ImportError as exc:
        print(
            f"kv bench: needs the benchmark's extra libraries ({exc.name} is missing): "
            f"pip install '{BENCH_EXTRA}'",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog="kv bench", description="Load a running kv cluster.")
    bench_cli.add_arguments(parser)
    bench_args = parser.parse_args(bench_argv)
    bench_args.addr = args.addr
    return bench_cli.run_from_args(bench_args)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(argv)
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "cluster" and args.cluster_command == "up":
            return run_local_cluster(args.data, args.nodes, args.engine, args.replication_factor)
        if args.command == "cluster" and args.cluster_command in cluster_control.ACTIONS:
            print(cluster_control.ACTIONS[args.cluster_command](args.data, args.node_id))
            return 0
        if args.command == "cluster" and args.data is not None:
            args.addr = ",".join(require_layout(args.data).addresses.values())
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
