"""The ``kv-node`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from kv_common.limits import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_OPS, DEFAULT_MAX_VALUE_BYTES
from kv_common.placement import DEFAULT_PARTITIONS, DEFAULT_VNODES
from kv_node.config import (
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_FORWARD_TIMEOUT,
    ConfigError,
    NodeConfig,
    build_config,
)
from kv_node.data_dir import ENGINES, discard_if_not_started, open_store
from kv_node.server import serve
from kv_node.store import StoreError
from kv_node.store.lmdb_store import DEFAULT_MAP_SIZE

EXIT_CONFIG = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kv-node",
        description="Run one node of a kv cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--id", required=True, help="this node's id, unique in the cluster")
    p.add_argument("--listen", help="host:port to bind (default: the advertised address)")
    p.add_argument(
        "--advertise", help="host:port others dial (default: this node's --cluster entry)"
    )
    p.add_argument(
        "--cluster",
        help="every member as id=host:port,id=host:port (default: a cluster of this node only)",
    )
    p.add_argument("--data-dir", type=Path, help="where the store and the node identity live")
    p.add_argument("--engine", default="lmdb", help=f"storage engine: {' or '.join(ENGINES)}")
    p.add_argument("--metrics-listen", help="host:port for Prometheus /metrics (default: off)")
    p.add_argument("--max-value-bytes", type=int, default=DEFAULT_MAX_VALUE_BYTES)
    p.add_argument("--max-batch-ops", type=int, default=DEFAULT_MAX_BATCH_OPS)
    p.add_argument("--max-batch-bytes", type=int, default=DEFAULT_MAX_BATCH_BYTES)
    p.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        help="partition count; must be the same on every node",
    )
    p.add_argument(
        "--vnodes",
        type=int,
        default=DEFAULT_VNODES,
        help="ring points per node; must be the same on every node",
    )
    p.add_argument(
        "--forward-timeout",
        type=float,
        default=DEFAULT_FORWARD_TIMEOUT,
        help="seconds a forwarded request may take when the caller set no deadline",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULT_DRAIN_SECONDS,
        help="on SIGTERM, how long in-flight requests may take to finish",
    )
    p.add_argument(
        "--lmdb-map-size", type=int, default=DEFAULT_MAP_SIZE, help="LMDB size ceiling in bytes"
    )
    return p


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    return build_config(
        node_id=args.id,
        listen=args.listen,
        advertise=args.advertise,
        cluster=args.cluster,
        engine=args.engine,
        data_dir=args.data_dir,
        metrics_listen=args.metrics_listen,
        max_value_bytes=args.max_value_bytes,
        max_batch_ops=args.max_batch_ops,
        max_batch_bytes=args.max_batch_bytes,
        partitions=args.partitions,
        vnodes=args.vnodes,
        forward_timeout=args.forward_timeout,
        drain_seconds=args.drain_seconds,
        lmdb_map_size=args.lmdb_map_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
        with discard_if_not_started(config.data_dir) as started:
            store = open_store(
                config.engine, config.data_dir, config.node_id, map_size=config.lmdb_map_size
            )
            asyncio.run(serve(config, store, ready=started))
    except (ConfigError, StoreError) as exc:
        print(f"kv-node: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
