"""The durable engine, on LMDB (see docs/decisions/0002-storage-engine.md).

LMDB is a copy-on-write B+tree: a transaction commit writes new pages, fsyncs,
then flips the meta page, so a crash at any moment leaves the last committed
transaction intact. With ``sync=True`` and ``metasync=True`` a commit returns
only after both flushes, which is what lets the node acknowledge a write once
``apply`` returns (``DURABLE_FLAGS``; tests check the live environment).

Layout: database ``data`` maps stored key -> 8-byte big-endian version + value
(long keys: see ``lmdb_keys``); database ``meta`` holds the store revision, the
store id (which ties the file to its data directory's identity) and the key
layout. ``inspect`` reads all of that without writing a byte, so a data
directory can be checked before anything in it is touched.
"""

from __future__ import annotations

import fcntl
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, cast

import lmdb

from kv_node.store import (
    DeleteOp,
    GetOp,
    Op,
    Outcome,
    ReadResult,
    StoreError,
    WriteOp,
    WriteResult,
    decide,
)
from kv_node.store.lmdb_file import DATA_FILE, LOCK_FILE, check_data_file
from kv_node.store.lmdb_keys import (
    INLINE_KEY_BYTES,
    LAYOUT,
    LMDB_MAX_KEY_BYTES,
    Digest,
    is_bucket,
    long_key_digest,
    pack_bucket,
    stored_key,
    unpack_bucket,
)

DEFAULT_MAP_SIZE = 64 * 1024**3
"""Address space reserved for the data file. The file is sparse; this is a ceiling, not a cost."""
DURABLE_FLAGS = {"sync": True, "metasync": True, "map_async": False}
"""Environment flags under which a commit is on disk when it returns."""

_VERSION = struct.Struct(">Q")
_REVISION_KEY = b"revision"
_STORE_ID_KEY = b"store-id"
_LAYOUT_KEY = b"key-layout"
_COLLISIONS_KEY = b"collisions"
"""Keys that share a bucket with an earlier key: ``count`` adds them to LMDB's record count."""
_MAX_DBS = 2


def _read(txn: lmdb.Transaction, key: bytes, db: lmdb._Database) -> bytes | None:
    """``txn.get`` for environments opened without ``buffers``, which always return bytes."""
    return cast("bytes | None", txn.get(key, db=db))


class StoreInfo(NamedTuple):
    store_id: str | None
    """None for a store written before store ids existed."""
    revision: int


def check_paths(path: Path) -> None:
    """Refuse wrong-type or unwritable paths before LMDB creates or maps anything."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    for name in (DATA_FILE, LOCK_FILE):
        file = path / name
        if os.path.lexists(file) and not file.is_file():
            raise StoreError(f"{file} is not a regular file")
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            raise StoreError(f"{file} is not readable and writable")
    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"{path} is not writable")


def inspect(path: Path) -> StoreInfo | None:
    """What the store in ``path`` holds, or None if there is none; writes nothing.

    Raises StoreError for anything LMDB would misread: wrong-type paths, an
    empty, truncated or foreign data file.
    """
    check_paths(path)
    data_file = path / DATA_FILE
    if not data_file.exists():
        return None
    check_data_file(data_file)
    try:
        # lock=False: no lock file is created or reset, so nothing is written.
        env = lmdb.open(str(path), readonly=True, lock=False, create=False, max_dbs=_MAX_DBS)
    except lmdb.Error as exc:
        raise StoreError(f"cannot read the LMDB store in {path}: {exc}") from exc
    try:
        with env.begin() as txn:
            if txn.get(b"meta") is None:
                return StoreInfo(None, 0)
            meta = env.open_db(b"meta", txn=txn, create=False)
            raw_id = txn.get(_STORE_ID_KEY, db=meta)
            raw_revision = txn.get(_REVISION_KEY, db=meta)
    except lmdb.Error as exc:
        raise StoreError(f"the LMDB store in {path} is damaged: {exc}") from exc
    finally:
        env.close()
    store_id = None if raw_id is None else raw_id.decode("ascii", "replace")
    revision = 0 if raw_revision is None else _VERSION.unpack(raw_revision)[0]
    return StoreInfo(store_id, revision)


class LmdbStore:
    engine = "lmdb"
    durable = True

    def __init__(
        self,
        path: Path,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        digest: Digest = long_key_digest,
    ) -> None:
        """Open (or create) the store in ``path``; ``digest`` is replaceable to force collisions."""
        check_paths(path)
        if (path / DATA_FILE).exists():
            check_data_file(path / DATA_FILE)
        self._digest = digest
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
        self._lock_fd = _lock_exclusively(path)
        try:
            self._env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=_MAX_DBS,
                readahead=False,
                max_readers=256,
                **DURABLE_FLAGS,
            )
        except (lmdb.Error, OSError, OverflowError, ValueError) as exc:
            # OverflowError: a map size LMDB's C API cannot take (negative, or over 64 bits).
            os.close(self._lock_fd)
            raise StoreError(f"cannot open LMDB store in {path}: {exc}") from exc
        try:
            self._prepare(path)
        except lmdb.Error as exc:
            # MDB_MAP_FULL here: a map too small for even the store's own bookkeeping.
            self.close()
            raise StoreError(f"cannot open LMDB store in {path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _prepare(self, path: Path) -> None:
        """Check the build and the layout; give a new store its id and layout mark."""
        if self._env.max_key_size() < LMDB_MAX_KEY_BYTES:
            raise StoreError(f"this LMDB build holds keys of {self._env.max_key_size()} bytes")
        self._data = self._env.open_db(b"data")
        self._meta = self._env.open_db(b"meta")
        with self._env.begin(write=True, db=self._meta) as txn:
            raw_layout = txn.get(_LAYOUT_KEY)
            if raw_layout is not None and _VERSION.unpack(raw_layout)[0] != LAYOUT:
                raise StoreError(f"{path} uses a key layout this build does not know")
            raw_revision = txn.get(_REVISION_KEY)
            raw_id = txn.get(_STORE_ID_KEY)
            if raw_id is None:
                raw_id = uuid.uuid4().hex.encode()
                txn.put(_STORE_ID_KEY, raw_id)
            if raw_layout is None:
                self._move_long_inline_keys(txn)
                txn.put(_LAYOUT_KEY, _VERSION.pack(LAYOUT))
        self.store_id: str = raw_id.decode()
        self._revision: int = 0 if raw_revision is None else _VERSION.unpack(raw_revision)[0]

    def _move_long_inline_keys(self, txn: lmdb.Transaction) -> None:
        """Re-store keys that stores from before the long-key layout held as themselves.

        Such stores could hold keys of INLINE_KEY_BYTES+1..511 bytes directly;
        the layout keeps those in buckets now.
        """
        cursor = txn.cursor(db=self._data)
        moved = [
            bytes(key)
            for key in cursor.iternext(keys=True, values=False)
            if len(key) > INLINE_KEY_BYTES
        ]
        for key in moved:
            record = _read(txn, key, self._data)
            txn.delete(key, db=self._data)
            if record is not None:
                self._put_record(txn, key, record)

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        # The read path of every Get: short keys skip the long-key machinery entirely.
        with self._env.begin(db=self._data) as txn:
            record = txn.get(key) if len(key) <= INLINE_KEY_BYTES else self._record(txn, key)
        if record is None:
            return None
        return record[8:], _VERSION.unpack_from(record)[0]

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        return cast(list[WriteResult], self.apply(ops))

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        results: list[Outcome] = []
        revision = self._revision
        with self._env.begin(write=True, db=self._data) as txn:
            for op in ops:
                key = op.key
                record = txn.get(key) if len(key) <= INLINE_KEY_BYTES else self._record(txn, key)
                current = None if record is None else _VERSION.unpack_from(record)[0]
                if isinstance(op, GetOp):
                    results.append(
                        ReadResult(None, 0)
                        if record is None or current is None
                        else ReadResult(record[8:], current)
                    )
                    continue
                result = decide(op, current, revision + 1)
                if result.succeeded and result.version > revision:
                    revision = result.version
                    if len(key) <= INLINE_KEY_BYTES:
                        if isinstance(op, DeleteOp):
                            txn.delete(key)
                        else:
                            txn.put(key, _VERSION.pack(revision) + op.value)
                    elif isinstance(op, DeleteOp):
                        self._delete_record(txn, key)
                    else:
                        self._put_record(txn, key, _VERSION.pack(revision) + op.value)
                results.append(result)
            if revision != self._revision:
                txn.put(_REVISION_KEY, _VERSION.pack(revision), db=self._meta)
        self._revision = revision
        return results

    def _record(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        """``version ‖ value`` of ``key`` as seen by ``txn``, or None."""
        stored = stored_key(key, self._digest)
        raw = _read(txn, stored, self._data)
        if raw is None or not is_bucket(stored):
            return raw
        return unpack_bucket(raw).get(key)

    def _put_record(self, txn: lmdb.Transaction, key: bytes, record: bytes) -> None:
        stored = stored_key(key, self._digest)
        if not is_bucket(stored):
            txn.put(stored, record, db=self._data)
            return
        raw = _read(txn, stored, self._data)
        bucket = {} if raw is None else unpack_bucket(raw)
        if bucket and key not in bucket:
            self._add_collisions(txn, 1)
        bucket[key] = record
        txn.put(stored, pack_bucket(bucket), db=self._data)

    def _delete_record(self, txn: lmdb.Transaction, key: bytes) -> None:
        stored = stored_key(key, self._digest)
        if not is_bucket(stored):
            txn.delete(stored, db=self._data)
            return
        bucket = unpack_bucket(_read(txn, stored, self._data) or b"")
        del bucket[key]
        if bucket:
            self._add_collisions(txn, -1)
            txn.put(stored, pack_bucket(bucket), db=self._data)
        else:
            txn.delete(stored, db=self._data)

    def _add_collisions(self, txn: lmdb.Transaction, delta: int) -> None:
        raw = txn.get(_COLLISIONS_KEY, db=self._meta)
        current = 0 if raw is None else _VERSION.unpack(raw)[0]
        txn.put(_COLLISIONS_KEY, _VERSION.pack(current + delta), db=self._meta)

    def count(self) -> int:
        with self._env.begin() as txn:
            entries: int = txn.stat(self._data)["entries"]
            raw = txn.get(_COLLISIONS_KEY, db=self._meta)
        return entries + (0 if raw is None else _VERSION.unpack(raw)[0])

    @property
    def revision(self) -> int:
        return self._revision

    def flags(self) -> dict[str, bool]:
        """The live environment's flags: tests check ``DURABLE_FLAGS`` against them."""
        return {name: bool(value) for name, value in self._env.flags().items()}

    def close(self) -> None:
        self._env.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _lock_exclusively(path: Path) -> int:
    """Hold an exclusive lock on the store's directory for as long as the store is open.

    LMDB lets several processes share an environment, but two nodes on one
    store would each count revisions on their own and hand out the same
    version twice. flock on the directory creates no file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"{path} is in use by another process") from exc
    return fd
