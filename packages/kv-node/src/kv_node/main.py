"""The ``kv-node`` command: flags in, a serving node out, or one line and exit code 2."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from kv_node.config import ConfigError, NodeConfig, config_flags
from kv_node.data_dir import (
    describe_placement,
    discard_if_not_started,
    hosted_partitions,
    open_replica_store,
    open_store,
)
from kv_node.replication.replica import Replication, ReplicationConfig
from kv_node.server import ReplicationFailed, check_bindable, serve
from kv_node.store import StoreError

EXIT_CONFIG = 2
EXIT_FAILED = 1
"""The node stopped because it could not go on safely (see ``ReplicationFailed``)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, like every other refusal to start (argparse adds the usage text)."""
        self.exit(EXIT_CONFIG, f"{self.prog}: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kv-node",
        description="Run one node of a kv cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag in config_flags():
        p.add_argument(
            flag.name,
            dest=flag.dest,
            type=flag.parse,
            default=flag.default,
            required=flag.required,
            help=flag.help,
            metavar=flag.metavar,
        )
    return p


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    return NodeConfig(**vars(args))


def replication_opener(config: NodeConfig) -> Callable[[], Replication]:
    """What opens a replicated node's data: the replica store, then the Raft groups."""
    data_dir = config.data_dir
    assert data_dir is not None, "NodeConfig requires --data-dir for the lmdb engine"

    def open_replication() -> Replication:
        store = open_replica_store(
            data_dir,
            config.node_id,
            map_size=config.lmdb_map_size,
            placement=describe_placement(config.cluster_map),
            hosted=hosted_partitions(config.cluster_map, config.node_id),
        )
        try:
            return Replication(
                config.node_id,
                config.cluster_map,
                store,
                dataclasses.replace(
                    ReplicationConfig.for_tick(config.raft_tick_ms / 1000, dial=config.peer_dial),
                    compact_after=config.raft_compact_after,
                    keep_after_compact=config.raft_keep_after_compact,
                ),
            )
        except BaseException:
            store.close()
            raise

    return open_replication


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
        # Every port is checked before the data directory is touched.
        check_bindable(config.listen or "", what="listen on")
        if config.metrics_listen is not None:
            check_bindable(config.metrics_listen, what="serve metrics on")
    except ConfigError as exc:
        print(f"kv-node: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with discard_if_not_started(config.data_dir) as started:
            if config.replicated:
                asyncio.run(serve(config, replication_opener(config), ready=started))
            else:
                store = open_store(
                    config.engine,
                    config.data_dir,
                    config.node_id,
                    map_size=config.lmdb_map_size,
                    placement=describe_placement(config.cluster_map),
                )
                asyncio.run(serve(config, store, ready=started))
    except (ConfigError, StoreError) as exc:
        print(f"kv-node: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ReplicationFailed as exc:
        print(f"kv-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
