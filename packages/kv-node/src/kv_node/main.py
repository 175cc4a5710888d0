"""The ``kv-node`` command: flags in, a serving node out, or one line and exit code 2."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from kv_node.config import ConfigError, NodeConfig, config_flags
from kv_node.data_dir import open_store
from kv_node.server import check_bindable, serve
from kv_node.store import StoreError

EXIT_CONFIG = 2


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


def undo_for_fresh(data_dir: Path | None) -> Callable[[], None]:
    """What removes the files a failed start created, when the data directory was fresh.

    A directory that was absent or empty before this start holds only what this start
    made, so removing it leaves the disk as the operator had it. A used one is never
    touched.
    """
    if data_dir is None:
        return lambda: None
    if data_dir.exists():
        if not data_dir.is_dir() or any(data_dir.iterdir()):
            return lambda: None

        def empty_again() -> None:
            for entry in data_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

        return empty_again
    top = data_dir
    while not top.parent.exists():
        top = top.parent
    return lambda: shutil.rmtree(top, ignore_errors=True)


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
    undo = undo_for_fresh(config.data_dir)
    try:
        store = open_store(
            config.engine, config.data_dir, config.node_id, map_size=config.lmdb_map_size
        )
        asyncio.run(serve(config, store))
    except (ConfigError, StoreError) as exc:
        undo()
        print(f"kv-node: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
