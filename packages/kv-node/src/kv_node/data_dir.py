"""A data directory knows which node it belongs to.

Starting node B on node A's directory would serve A's keys under B's name and
corrupt placement silently, so the first start writes an identity file and
every later start checks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kv_node.store import Store, StoreError
from kv_node.store.lmdb_store import DEFAULT_MAP_SIZE, LmdbStore
from kv_node.store.memory import MemoryStore

IDENTITY_FILE = "kv-node.json"
ENGINES = ("lmdb", "memory")
"""The storage engines; the name is checked here, where the engine is opened."""


def claim(data_dir: Path, node_id: str) -> None:
    """Create ``data_dir`` for ``node_id``, or check that it already belongs to it."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        identity = data_dir / IDENTITY_FILE
        if identity.exists():
            owner = json.loads(identity.read_text()).get("node_id")
            if owner != node_id:
                raise StoreError(
                    f"data directory {data_dir} belongs to node {owner!r}, not {node_id!r}"
                )
            return
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise StoreError(f"data directory {data_dir} is not writable")
        tmp = data_dir / (IDENTITY_FILE + ".tmp")
        with tmp.open("w") as f:
            json.dump({"node_id": node_id, "format": 1}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(identity)
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot use data directory {data_dir}: {exc}") from exc


def open_store(
    engine: str, data_dir: Path | None, node_id: str, *, map_size: int = DEFAULT_MAP_SIZE
) -> Store:
    if engine not in ENGINES:
        raise StoreError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if data_dir is not None:
        claim(data_dir, node_id)
    if engine == "memory":
        return MemoryStore()
    if data_dir is None:
        raise StoreError("the lmdb engine needs --data-dir")
    return LmdbStore(data_dir / "lmdb", map_size=map_size)
