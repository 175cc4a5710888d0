"""The durable engine, on LMDB (see docs/decisions/0002-storage-engine.md).

LMDB is a copy-on-write B+tree: a transaction commit writes new pages, fsyncs,
then flips the meta page, so a crash at any moment leaves the last committed
transaction intact. With ``sync=True`` a commit returns only after the fsync,
which is what lets the node acknowledge a write once ``write`` returns.

Layout: database ``data`` maps key -> 8-byte big-endian version + value;
database ``meta`` holds the store revision.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import lmdb

from kv_node.store import DeleteOp, StoreError, WriteOp, WriteResult, decide

DEFAULT_MAP_SIZE = 64 * 1024**3
"""Address space reserved for the data file. The file is sparse; this is a ceiling, not a cost."""

_VERSION = struct.Struct(">Q")
_REVISION_KEY = b"revision"


class LmdbStore:
    engine = "lmdb"
    durable = True

    def __init__(self, path: Path, *, map_size: int = DEFAULT_MAP_SIZE) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=2,
                sync=True,
                metasync=True,
                readahead=False,
                max_readers=256,
            )
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open LMDB store in {path}: {exc}") from exc
        self._data = self._env.open_db(b"data")
        self._meta = self._env.open_db(b"meta")
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_REVISION_KEY)
        self._revision = 0 if raw is None else _VERSION.unpack(raw)[0]

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        with self._env.begin(db=self._data) as txn:
            raw = txn.get(key)
        if raw is None:
            return None
        return raw[8:], _VERSION.unpack_from(raw)[0]

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results = []
        revision = self._revision
        with self._env.begin(write=True, db=self._data) as txn:
            for op in ops:
                raw = txn.get(op.key)
                current = None if raw is None else _VERSION.unpack_from(raw)[0]
                result = decide(op, current, revision + 1)
                if result.succeeded and result.version > revision:
                    revision = result.version
                    if isinstance(op, DeleteOp):
                        txn.delete(op.key)
                    else:
                        txn.put(op.key, _VERSION.pack(revision) + op.value)
                results.append(result)
            if revision != self._revision:
                txn.put(_REVISION_KEY, _VERSION.pack(revision), db=self._meta)
        self._revision = revision
        return results

    def count(self) -> int:
        with self._env.begin() as txn:
            entries: int = txn.stat(self._data)["entries"]
        return entries

    @property
    def revision(self) -> int:
        return self._revision

    def close(self) -> None:
        self._env.close()
