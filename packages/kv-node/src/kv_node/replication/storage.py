"""The replica store: every Raft group's log, hard state and partition data in one LMDB file.

Why one environment: a runtime cycle gathers the Readies of every group with work, and all of
it (new log entries, hard states, installed snapshots) must be durable before any message
leaves, while the committed entries must be applied with their applied index in the same
atomic step, so that a restart never applies an entry twice nor skips one. One LMDB write
transaction does all of that for every group at once, and at most one flush makes it durable
(``ReplicaStore.commit``). The core reads the log back through ``GroupLog``, which implements
``kv_raft.Storage`` with ``MemoryStorage``'s semantics.

Layout (integers big-endian, so keys sort by group, then by index):

* ``replica-meta``: the layout number and the store id.
* ``raft-groups``: group (u32) -> the group's state: hard state, applied index, the log's
  offset (the compacted-up-to index and its term, ``MemoryStorage``'s dummy entry) and the
  ConfState as of the applied index.
* ``raft-log``: group (u32) ‖ index (u64) -> term (u64) ‖ type (u8) ‖ data.
* ``partition-data``: group (u32) ‖ key -> version (u64) ‖ value. A partition's keys are
  contiguous, so a snapshot is one range scan and installing one is a range delete and a load.
  Keys too long for LMDB with the prefix are stored as ``lmdb_keys`` describes, with an inline
  limit shortened by the prefix (``INLINE_KEY_BYTES``); the record is then an ``lmdb_keys``
  bucket.

Versions: a key's version is the Raft index of the entry that wrote it, so it is the same on
every replica and survives leader changes. Every op of one entry gets that entry's index.

Durability: LMDB's own synced commit (``DURABLE_FLAGS``): every commit flushes the data pages,
then writes and flushes the meta page that points at them, so whatever crashes (the process, the
kernel, the power) the file holds the last committed cycle whole. py-lmdb offers no
per-transaction way to skip the flush, so a cycle whose Readies all say ``must_sync=False``
(only a commit index moved) is flushed too; skipping it by flushing explicitly after an unsynced
commit would give up the ordering above, and a power loss could then leave a meta page pointing
at pages never written: a damaged file, not merely an older one (decided in the review of this
module: an extra fsync is cheaper than that risk).

Snapshots: ``GroupLog.snapshot`` reads the group's state and its whole partition in one read
transaction and returns them as one ``Snapshot`` (``encode_snapshot_data``). A later change
streams it in chunks by the same means: keep one read transaction open (LMDB's MVCC keeps that
view fixed while writes go on), walk the partition's range with a cursor and cut the records
into chunks of bounded size, each naming the last key it holds; the receiver loads chunks into
a staging range and swaps it in with the log reset in the one transaction that installs the
snapshot's meta. The price is that the open read transaction pins old pages, so the file grows
while a large snapshot is sent.
"""

from __future__ import annotations

import bisect
import functools
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, cast

import lmdb

from kv_node.replication.command import CommandError, decode_command
from kv_node.store import DeleteOp, GetOp, Op, Outcome, ReadResult, StoreError, decide
from kv_node.store.lmdb_file import DATA_FILE, check_data_file
from kv_node.store.lmdb_keys import (
    DIGEST_BYTES,
    LMDB_MAX_KEY_BYTES,
    Digest,
    long_key_digest,
    pack_bucket,
    unpack_bucket,
)
from kv_node.store.lmdb_store import DURABLE_FLAGS, _lock_exclusively, check_paths
from kv_raft import (
    CompactedError,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Ready,
    Snapshot,
    SnapshotMeta,
    UnavailableError,
)
from kv_raft.storage import limit_size
from kv_raft.tracker import ProgressTracker
from kv_raft.types import entry_size

LAYOUT = 1
"""The replica layout described above; a store with another number is refused."""
ENV_FLAGS = DURABLE_FLAGS
"""LMDB flushes data, then meta pages, at every commit of a store opened with ``sync``."""
_UNSYNCED_FLAGS = {**DURABLE_FLAGS, "sync": False, "metasync": False}
"""Tests and benchmarks that need no durability: LMDB never flushes."""
ENTRY_CACHE_ENTRIES = 256
ENTRY_CACHE_BYTES = 1024 * 1024
"""Per group, the newest log entries kept in memory (both bounds hold), so that the core's
reads of what was just appended (sending it on, applying it once committed) skip LMDB."""

_MAX_READERS = 256
"""Concurrent read transactions LMDB makes room for: the loop, plus snapshot senders later."""

_GROUP = struct.Struct(">I")
_LOG_KEY = struct.Struct(">IQ")
_ENTRY_HEAD = struct.Struct(">QB")
_STATE = struct.Struct(">QQQQQQ")  # term, vote, commit, applied, offset, offset_term
_COUNT = struct.Struct(">H")
_NODE = struct.Struct(">Q")
_VERSION = struct.Struct(">Q")
_RECORD_HEAD = struct.Struct(">IQI")  # key length, version, value length
_SNAPSHOT_FORMAT = 1
_CONF_CHANGE = EntryType.CONF_CHANGE
_TYPE_CODES = {kind: kind.value for kind in EntryType}
_ENTRY_TYPES = {kind.value: kind for kind in EntryType}

INLINE_KEY_BYTES = LMDB_MAX_KEY_BYTES - _GROUP.size - DIGEST_BYTES
"""Longest user key stored as itself after the group prefix; longer ones are digested."""
_BUCKET_KEY_BYTES = LMDB_MAX_KEY_BYTES

_META_DB = b"replica-meta"
_GROUPS_DB = b"raft-groups"
_LOG_DB = b"raft-log"
_DATA_DB = b"partition-data"
_OUR_DBS = frozenset({_META_DB, _GROUPS_DB, _LOG_DB, _DATA_DB})
_SINGLE_COPY_DBS = frozenset({b"data", b"meta"})
"""Named databases of ``LmdbStore``, the single-copy engine."""
_LAYOUT_KEY = b"layout"
_STORE_ID_KEY = b"store-id"


class ApplyGapError(ValueError):
    """Committed entries that do not follow the applied index: the runtime lost an entry."""


class SnapshotDataError(ValueError):
    """Snapshot data that is not what ``encode_snapshot_data`` writes."""


@dataclass(frozen=True, slots=True)
class AppliedEntry:
    """What applying one committed entry produced, for the proposer waiting on it.

    The proposer checks ``term``: a different entry may have been committed at its index.
    ``error`` is set (and ``outcomes`` empty) when the entry's command did not decode; every
    replica reaches the same error from the same bytes.
    """

    index: int
    term: int
    outcomes: tuple[Outcome, ...] = ()
    error: str | None = None


class GroupWrite(NamedTuple):
    """One group's share of a runtime cycle, in the order the Ready contract sets."""

    group: int
    hard_state: HardState | None = None
    entries: Sequence[Entry] = ()
    snapshot: Snapshot | None = None
    committed: Sequence[Entry] = ()

    @classmethod
    def from_ready(cls, group: int, ready: Ready) -> GroupWrite:
        return cls(group, ready.hard_state, ready.entries, ready.snapshot, ready.committed_entries)


CommitResult = dict[int, list[AppliedEntry]]
"""Per group, the entries this commit applied, in index order (skipped ones are absent)."""


@dataclass(slots=True)
class _GroupMemory:
    """What ``GroupLog`` answers from without LMDB; replaced only after a commit succeeds."""

    hard_state: HardState = field(default_factory=HardState)
    conf_state: ConfState = field(default_factory=ConfState)
    applied: int = 0
    offset: int = 0
    offset_term: int = 0
    last: int = 0
    run_starts: list[int] = field(default_factory=list)
    """Terms of offset+1..last as runs: run i covers run_starts[i] up to the next start."""
    run_terms: list[int] = field(default_factory=list)
    cache: list[Entry] = field(default_factory=list)
    """The newest entries, contiguous and ending at ``last`` (or empty)."""
    cache_bytes: int = 0

    def copy(self) -> _GroupMemory:
        return _GroupMemory(
            self.hard_state,
            self.conf_state,
            self.applied,
            self.offset,
            self.offset_term,
            self.last,
            list(self.run_starts),
            list(self.run_terms),
            list(self.cache),
            self.cache_bytes,
        )

    def term(self, index: int) -> int:
        if index < self.offset:
            raise CompactedError(index)
        if index > self.last:
            raise UnavailableError(index)
        if index == self.offset:
            return self.offset_term
        starts = self.run_starts
        if index >= starts[-1]:
            return self.run_terms[-1]
        return self.run_terms[bisect.bisect_right(starts, index) - 1]

    def truncate_from(self, index: int) -> None:
        """Forget entries at and after ``index`` (> offset)."""
        cut = bisect.bisect_left(self.run_starts, index)
        del self.run_starts[cut:], self.run_terms[cut:]
        if self.cache and self.cache[0].index < index:
            kept = self.cache[: index - self.cache[0].index]
            self.cache_bytes -= sum(entry_size(e) for e in self.cache[len(kept) :])
            self.cache = kept
        else:
            self.cache, self.cache_bytes = [], 0
        self.last = index - 1

    def extend(self, entries: Sequence[Entry]) -> None:
        """Add entries that follow ``last`` directly."""
        for entry in entries:
            if not self.run_terms or self.run_terms[-1] != entry.term:
                self.run_starts.append(entry.index)
                self.run_terms.append(entry.term)
        self.last = entries[-1].index
        self.cache.extend(entries)
        self.cache_bytes += sum(entry_size(e) for e in entries)
        drop = 0
        excess = len(self.cache) - ENTRY_CACHE_ENTRIES
        while drop < len(self.cache) - 1 and (
            drop < excess or self.cache_bytes > ENTRY_CACHE_BYTES
        ):
            self.cache_bytes -= entry_size(self.cache[drop])
            drop += 1
        if drop:
            del self.cache[:drop]

    def compact_to(self, index: int, term: int) -> None:
        """Make ``index`` (offset < index <= last) the new offset."""
        keep = bisect.bisect_right(self.run_starts, index + 1) - 1
        del self.run_starts[: max(keep, 0)], self.run_terms[: max(keep, 0)]
        if index == self.last:
            self.run_starts, self.run_terms = [], []
        else:
            self.run_starts[0] = index + 1
        self.offset, self.offset_term = index, term
        stale = [e for e in self.cache if e.index <= index]
        if stale:
            self.cache_bytes -= sum(entry_size(e) for e in stale)
            self.cache = self.cache[len(stale) :]

    def reset(self, meta: SnapshotMeta) -> None:
        """Everything up to ``meta`` is the snapshot now: an empty log after it."""
        self.offset, self.offset_term, self.last = meta.index, meta.term, meta.index
        self.run_starts, self.run_terms, self.cache, self.cache_bytes = [], [], [], 0
        self.applied = meta.index
        self.conf_state = meta.conf_state
        if self.hard_state.commit < meta.index:
            # What a snapshot holds is committed by definition; a commit index behind the
            # applied index would make the core refuse to restart.
            self.hard_state = HardState(self.hard_state.term, self.hard_state.vote, meta.index)


class ReplicaStore:
    """One per node; single-threaded: the runtime's loop is the only caller."""

    def __init__(
        self, path: Path, env: lmdb.Environment, lock_fd: int, *, sync: bool, digest: Digest
    ) -> None:
        """Use ``open``; this only wires an environment whose layout was checked."""
        self._path = path
        self._env = env
        self._lock_fd = lock_fd
        self._sync = sync
        self._digest = digest
        self._meta = env.open_db(_META_DB)
        self._groups = env.open_db(_GROUPS_DB)
        self._log = env.open_db(_LOG_DB)
        self._data = env.open_db(_DATA_DB)
        self._logs: dict[int, GroupLog] = {}
        with env.begin(db=self._meta) as txn:
            self.store_id: str = cast(bytes, txn.get(_STORE_ID_KEY)).decode()
        self.flushes = 0
        """Flushes done by ``commit`` and ``bootstrap``: what the fsync budget is spent on."""
        self.snapshots_installed = 0
        """Snapshots from a leader that replaced a group's log and data (older ones ignored)."""
        self.on_commit: Callable[[float], None] | None = None
        """Told how many seconds each ``commit`` took, flush included (the node's metrics); it
        runs in the committing thread, so it must be thread-safe."""

    @classmethod
    def open(
        cls, path: Path, *, map_size: int, sync: bool = True, digest: Digest = long_key_digest
    ) -> ReplicaStore:
        """Open or create the store in ``path``; ``sync=False`` never flushes (tests, benches).

        Refuses, with one line for an operator, a path that holds the single-copy store or
        any layout but this one. ``digest`` is replaceable so tests can force collisions.
        """
        check_paths(path)
        if (path / DATA_FILE).exists():
            check_data_file(path / DATA_FILE)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
        lock_fd = _lock_exclusively(path)
        try:
            env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=len(_OUR_DBS),
                readahead=False,
                max_readers=_MAX_READERS,
                **(ENV_FLAGS if sync else _UNSYNCED_FLAGS),
            )
        except (lmdb.Error, OSError, OverflowError, ValueError) as exc:
            os.close(lock_fd)
            raise StoreError(f"cannot open the replica store in {path}: {exc}") from exc
        try:
            _prepare_layout(path, env)
            return cls(path, env, lock_fd, sync=sync, digest=digest)
        except BaseException as exc:
            env.close()
            os.close(lock_fd)
            if isinstance(exc, lmdb.Error):
                raise StoreError(f"cannot open the replica store in {path}: {exc}") from exc
            raise

    def close(self) -> None:
        self._env.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def flags(self) -> dict[str, bool]:
        """The live environment's flags: tests check ``ENV_FLAGS`` against them."""
        return {name: bool(value) for name, value in self._env.flags().items()}

    # -- groups ---------------------------------------------------------------------------------
    def bootstrap(self, groups: Mapping[int, ConfState]) -> None:
        """Found every group in ``groups`` that has no state yet, as ``MemoryStorage`` does.

        Snapshot (index 1, term 1) with the founding ConfState, hard state (term 1, commit 1),
        applied 1: every founding replica starts identical and log entries begin at index 2.
        Groups that exist are left alone, so calling this at every start is harmless.
        """
        founded: dict[int, _GroupMemory] = {}
        with self._env.begin(write=True) as txn:
            for group, conf_state in groups.items():
                if txn.get(_GROUP.pack(group), db=self._groups) is not None:
                    continue
                memory = _GroupMemory(hard_state=HardState(term=1, commit=1))
                memory.reset(SnapshotMeta(index=1, term=1, conf_state=conf_state))
                txn.put(_GROUP.pack(group), _pack_state(memory), db=self._groups)
                founded[group] = memory
        if founded and self._sync:
            self.flushes += 1  # LMDB flushed as the transaction committed
        for group, memory in founded.items():
            self._log_of(group)._memory = memory

    def groups(self) -> list[int]:
        """Every group with state in this store, ascending: what a restart has to bring back."""
        with self._env.begin(db=self._groups) as txn:
            keys = txn.cursor().iternext(keys=True, values=False)
            return [_GROUP.unpack(key)[0] for key in keys]

    def count(self) -> int:
        """Records in every partition this node holds (long keys sharing a bucket count once)."""
        with self._env.begin() as txn:
            return int(txn.stat(self._data)["entries"])

    def group(self, group: int) -> GroupLog:
        """The group's log as the core reads it; a group with no state reads as empty storage
        (``MemoryStorage()``), ready to receive a snapshot from its leader."""
        return self._log_of(group)

    def hard_state(self, group: int) -> HardState:
        return self._log_of(group)._memory.hard_state

    def applied(self, group: int) -> int:
        return self._log_of(group)._memory.applied

    def get(self, group: int, key: bytes) -> tuple[bytes, int] | None:
        """The value and version of ``key`` in the group's partition, as last applied."""
        with self._env.begin(db=self._data) as txn:
            record = self._record(txn, group, key)
        if record is None:
            return None
        return record[_VERSION.size :], _VERSION.unpack_from(record)[0]

    def get_many(self, group: int, keys: Sequence[bytes]) -> list[ReadResult]:
        """``GetOp`` outcomes for ``keys``, all as of one applied state (one read transaction),
        as the log gives the gets of one entry."""
        with self._env.begin(db=self._data) as txn:
            records = [self._record(txn, group, key) for key in keys]
        return [
            ReadResult(None, 0)
            if record is None
            else ReadResult(record[_VERSION.size :], _VERSION.unpack_from(record)[0])
            for record in records
        ]

    # -- the cycle ------------------------------------------------------------------------------
    def commit(
        self,
        writes: Sequence[GroupWrite],
        on_applied: Callable[[CommitResult], None] | None = None,
    ) -> CommitResult:
        """Persist and apply a whole cycle in one write transaction, flushed once at its end.

        Per write, in the Ready contract's order: install the snapshot, append the entries
        (replacing any conflicting suffix), set the hard state, apply the committed entries.
        Entries at or below the applied index are skipped, so a replay after a crash applies
        nothing twice. If anything raises (a gap in the committed entries, entries that do not
        connect to the log), the transaction is aborted: nothing of the cycle is written and
        the in-memory view is unchanged.

        ``on_applied`` is given the outcomes once every write is in the transaction, before
        the flush (in this thread). The entries applied are committed, that is durable in a
        quorum's logs, and applying is deterministic, so their outcomes may be told before
        this node's copy of the data is durable: a crash now only replays them at restart.
        Nothing else may be served from them early: ``get`` and ``applied`` show the cycle
        only once the transaction has committed.
        """
        started = time.perf_counter()
        staged: dict[int, _GroupMemory] = {}
        results: CommitResult = {}
        installed = 0
        with self._env.begin(write=True) as txn:
            for write in writes:
                group = write.group
                memory = staged.get(group)
                if memory is None:
                    memory = self._log_of(group, txn)._memory.copy()
                    staged[group] = memory
                if write.snapshot is not None:
                    installed += self._install(txn, group, memory, write.snapshot)
                if write.entries:
                    self._append(txn, group, memory, write.entries)
                if write.hard_state is not None:
                    memory.hard_state = write.hard_state
                applied = self._apply(txn, group, memory, write.committed)
                if applied:
                    results.setdefault(group, []).extend(applied)
                txn.put(_GROUP.pack(group), _pack_state(memory), db=self._groups)
            if on_applied is not None and results:
                on_applied(results)
        if self._sync:
            self.flushes += 1  # LMDB flushed as the transaction committed
        self.snapshots_installed += installed
        for group, memory in staged.items():
            self._logs[group]._memory = memory
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        return results

    def compact(self, group: int, index: int) -> None:
        """Drop the log up to ``index``, which becomes the offset (``MemoryStorage.compact``).

        Only applied entries can go: the snapshot that replaces them is taken at the applied
        index. Not flushed: losing a compaction loses nothing.
        """
        log = self._log_of(group)
        memory = log._memory
        if index <= memory.offset:
            return
        if index > memory.last:
            raise UnavailableError(index)
        if index > memory.applied:
            raise ValueError(f"cannot compact group {group} to {index}: applied {memory.applied}")
        compacted = memory.copy()
        compacted.compact_to(index, memory.term(index))
        with self._env.begin(write=True) as txn:
            _delete_range(txn, self._log, _LOG_KEY.pack(group, 0), _LOG_KEY.pack(group, index + 1))
            txn.put(_GROUP.pack(group), _pack_state(compacted), db=self._groups)
        log._memory = compacted

    # -- internals ------------------------------------------------------------------------------
    def _log_of(self, group: int, txn: lmdb.Transaction | None = None) -> GroupLog:
        log = self._logs.get(group)
        if log is None:
            if txn is None:
                with self._env.begin() as read:
                    memory = self._load(read, group)
            else:
                memory = self._load(txn, group)
            log = self._logs[group] = GroupLog(self, group, memory)
        return log

    def _load(self, txn: lmdb.Transaction, group: int) -> _GroupMemory:
        raw_group = _GROUP.pack(group)
        raw = cast("bytes | None", txn.get(raw_group, db=self._groups))
        if raw is None:
            return _GroupMemory()
        memory = _unpack_state(raw)
        cursor = txn.cursor(db=self._log)
        found = cursor.set_range(_LOG_KEY.pack(group + 1, 0))
        if (cursor.prev() if found else cursor.last()) and cursor.key()[: _GROUP.size] == raw_group:
            memory.last = max(memory.offset, _LOG_KEY.unpack(cursor.key())[1])

        def term_at(index: int) -> int:
            entry = txn.get(_LOG_KEY.pack(group, index), db=self._log)
            if entry is None:
                raise StoreError(f"group {group}: log entry {index} is missing")
            return int(_VERSION.unpack_from(entry)[0])

        # Terms never decrease along a log (``_append`` enforces it), so each run's end is
        # found by bisection: the load reads O(runs x log entries) records, not every entry.
        start = memory.offset + 1
        while start <= memory.last:
            term = term_at(start)
            lo, hi = start, memory.last
            while lo < hi:
                middle = (lo + hi + 1) // 2
                if term_at(middle) == term:
                    lo = middle
                else:
                    hi = middle - 1
            memory.run_starts.append(start)
            memory.run_terms.append(term)
            start = lo + 1
        return memory

    def _append(
        self, txn: lmdb.Transaction, group: int, memory: _GroupMemory, entries: Sequence[Entry]
    ) -> None:
        """``MemoryStorage.append``: replace any conflicting suffix; entries must connect."""
        first = memory.offset + 1
        if entries[-1].index < first:
            return
        if entries[-1].index - entries[0].index + 1 != len(entries):
            raise ValueError(f"entries for group {group} are not contiguous")
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        start = entries[0].index
        if start > memory.last + 1:
            raise UnavailableError(start)
        previous = memory.term(start - 1)
        for entry in entries:
            if entry.term < previous:
                raise ValueError(f"entries for group {group}: term falls at index {entry.index}")
            previous = entry.term
        # Raft never replaces a committed entry; doing so would leave applied data that no log
        # entry explains and a snapshot index whose term is gone.
        if start <= memory.applied and (
            entries[-1].index < memory.applied
            or any(
                entry.term != memory.term(entry.index)
                for entry in entries[: memory.applied - start + 1]
            )
        ):
            raise ValueError(f"entries for group {group} would replace applied entries")
        if start <= memory.last:
            _delete_range(
                txn, self._log, _LOG_KEY.pack(group, start), _LOG_KEY.pack(group, memory.last + 1)
            )
            memory.truncate_from(start)
        for entry in entries:
            txn.put(
                _LOG_KEY.pack(group, entry.index),
                _ENTRY_HEAD.pack(entry.term, _TYPE_CODES[entry.type]) + entry.data,
                db=self._log,
            )
        memory.extend(entries)

    def _install(
        self, txn: lmdb.Transaction, group: int, memory: _GroupMemory, snapshot: Snapshot
    ) -> bool:
        """Replace the group's log and partition with ``snapshot``; older snapshots are ignored
        (False)."""
        if snapshot.meta.index <= memory.applied:
            return False
        records = list(decode_snapshot_data(snapshot.data))
        prefix = _GROUP.pack(group)
        _delete_range(txn, self._log, _LOG_KEY.pack(group, 0), _LOG_KEY.pack(group + 1, 0))
        _delete_range(txn, self._data, prefix, _GROUP.pack(group + 1))
        for key, value, version in records:
            self._put_record(txn, group, key, _VERSION.pack(version) + value)
        memory.reset(snapshot.meta)
        return True

    def _apply(
        self, txn: lmdb.Transaction, group: int, memory: _GroupMemory, committed: Sequence[Entry]
    ) -> list[AppliedEntry]:
        applied: list[AppliedEntry] = []
        for entry in committed:
            index = entry.index
            if index <= memory.applied:
                continue
            if index != memory.applied + 1:
                raise ApplyGapError(
                    f"group {group}: entry {index} committed after applied {memory.applied}"
                )
            if index > memory.last:
                raise ApplyGapError(f"group {group}: entry {index} is not in the log")
            if entry.type is _CONF_CHANGE:
                memory.conf_state = _changed(memory.conf_state, entry.data)
                applied.append(AppliedEntry(index, entry.term))
            elif not entry.data:
                applied.append(AppliedEntry(index, entry.term))
            else:
                try:
                    command = decode_command(entry.data)
                except CommandError as exc:
                    applied.append(AppliedEntry(index, entry.term, error=str(exc)))
                else:
                    outcomes = self._apply_ops(txn, group, command.ops, index)
                    applied.append(AppliedEntry(index, entry.term, outcomes))
            memory.applied = index
        return applied

    def _apply_ops(
        self, txn: lmdb.Transaction, group: int, ops: Sequence[Op], version: int
    ) -> tuple[Outcome, ...]:
        outcomes: list[Outcome] = []
        for op in ops:
            record = self._record(txn, group, op.key)
            current = None if record is None else _VERSION.unpack_from(record)[0]
            if isinstance(op, GetOp):
                outcomes.append(
                    ReadResult(None, 0)
                    if record is None or current is None
                    else ReadResult(record[_VERSION.size :], current)
                )
                continue
            result = decide(op, current, version)
            if result.succeeded and result.version:
                if isinstance(op, DeleteOp):
                    self._delete_record(txn, group, op.key)
                else:
                    self._put_record(txn, group, op.key, _VERSION.pack(version) + op.value)
            outcomes.append(result)
        return tuple(outcomes)

    def _data_key(self, group: int, key: bytes) -> bytes:
        if len(key) <= INLINE_KEY_BYTES:
            return _GROUP.pack(group) + key
        return _GROUP.pack(group) + key[:INLINE_KEY_BYTES] + self._digest(key)

    def _record(self, txn: lmdb.Transaction, group: int, key: bytes) -> bytes | None:
        """``version ‖ value`` of ``key`` in the group's partition as ``txn`` sees it, or None."""
        stored = self._data_key(group, key)
        raw = cast("bytes | None", txn.get(stored, db=self._data))
        if raw is None or len(stored) != _BUCKET_KEY_BYTES:
            return raw
        return unpack_bucket(raw).get(key)

    def _put_record(self, txn: lmdb.Transaction, group: int, key: bytes, record: bytes) -> None:
        stored = self._data_key(group, key)
        if len(stored) != _BUCKET_KEY_BYTES:
            txn.put(stored, record, db=self._data)
            return
        raw = cast("bytes | None", txn.get(stored, db=self._data))
        bucket = {} if raw is None else unpack_bucket(raw)
        bucket[key] = record
        txn.put(stored, pack_bucket(bucket), db=self._data)

    def _delete_record(self, txn: lmdb.Transaction, group: int, key: bytes) -> None:
        stored = self._data_key(group, key)
        if len(stored) != _BUCKET_KEY_BYTES:
            txn.delete(stored, db=self._data)
            return
        bucket = unpack_bucket(cast(bytes, txn.get(stored, db=self._data)))
        del bucket[key]
        if bucket:
            txn.put(stored, pack_bucket(bucket), db=self._data)
        else:
            txn.delete(stored, db=self._data)

    def _partition(self, txn: lmdb.Transaction, group: int) -> Iterator[tuple[bytes, bytes, int]]:
        """Every (key, value, version) of the group's partition, in stored-key order."""
        prefix = _GROUP.pack(group)
        cursor = txn.cursor(db=self._data)
        if not cursor.set_range(prefix):
            return
        for stored, raw in cast("Iterator[tuple[bytes, bytes]]", cursor):
            if not stored.startswith(prefix):
                return
            if len(stored) == _BUCKET_KEY_BYTES:
                for key, record in unpack_bucket(raw).items():
                    yield key, record[_VERSION.size :], _VERSION.unpack_from(record)[0]
            else:
                yield stored[_GROUP.size :], raw[_VERSION.size :], _VERSION.unpack_from(raw)[0]

    def _snapshot(self, group: int) -> Snapshot:
        with self._env.begin() as txn:
            raw = txn.get(_GROUP.pack(group), db=self._groups)
            if raw is None:
                return Snapshot()
            state = _unpack_state(raw)
            if state.applied == state.offset:
                term = state.offset_term
            else:
                entry = txn.get(_LOG_KEY.pack(group, state.applied), db=self._log)
                if entry is None:
                    raise StoreError(f"group {group}: applied entry {state.applied} is missing")
                (term,) = _VERSION.unpack_from(entry)
            data = encode_snapshot_data(self._partition(txn, group))
        return Snapshot(SnapshotMeta(state.applied, term, state.conf_state), data)


class GroupLog:
    """``kv_raft.Storage`` for one group, answered from memory except for old entries.

    ``term`` never touches LMDB; ``entries`` does only for entries older than the cache.
    """

    __slots__ = ("_group", "_memory", "_store")

    def __init__(self, store: ReplicaStore, group: int, memory: _GroupMemory) -> None:
        self._store = store
        self._group = group
        self._memory = memory

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._memory.hard_state, self._memory.conf_state

    def first_index(self) -> int:
        return self._memory.offset + 1

    def last_index(self) -> int:
        return self._memory.last

    def term(self, index: int) -> int:
        return self._memory.term(index)

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        memory = self._memory
        if lo <= memory.offset:
            raise CompactedError(lo)
        if hi > memory.last + 1:
            raise UnavailableError(hi)
        if lo >= hi:
            return []
        cache = memory.cache
        if cache and lo >= cache[0].index:
            start = cache[0].index
            return limit_size(cache[lo - start : hi - start], max_size)
        return self._read_entries(lo, hi, max_size)

    def _read_entries(self, lo: int, hi: int, max_size: int | None) -> list[Entry]:
        store = self._store
        found: list[Entry] = []
        total = 0
        with store._env.begin(db=store._log) as txn:
            cursor = txn.cursor()
            cursor.set_key(_LOG_KEY.pack(self._group, lo))
            for index in range(lo, hi):
                raw = cursor.value()
                term, kind = _ENTRY_HEAD.unpack_from(raw)
                entry = Entry(term, index, _ENTRY_TYPES[kind], raw[_ENTRY_HEAD.size :])
                total += entry_size(entry)
                if found and max_size is not None and total > max_size:
                    break
                found.append(entry)
                cursor.next()
        return found

    def snapshot(self) -> Snapshot:
        """The partition at its applied index, read in one transaction (see the module doc)."""
        return self._store._snapshot(self._group)


def encode_snapshot_data(records: Iterator[tuple[bytes, bytes, int]]) -> bytes:
    """``u8 format`` then per key ``u32 key len ‖ u64 version ‖ u32 value len ‖ key ‖ value``."""
    parts = [bytes((_SNAPSHOT_FORMAT,))]
    for key, value, version in records:
        parts += (_RECORD_HEAD.pack(len(key), version, len(value)), key, value)
    return b"".join(parts)


def decode_snapshot_data(data: bytes) -> Iterator[tuple[bytes, bytes, int]]:
    """The (key, value, version) records of ``data``; SnapshotDataError if it is damaged."""
    if not data or data[0] != _SNAPSHOT_FORMAT:
        raise SnapshotDataError("snapshot data of an unknown format")
    offset = 1
    while offset < len(data):
        if len(data) - offset < _RECORD_HEAD.size:
            raise SnapshotDataError(f"snapshot data truncated at byte {offset}")
        key_length, version, value_length = _RECORD_HEAD.unpack_from(data, offset)
        offset += _RECORD_HEAD.size
        end = offset + key_length + value_length
        if end > len(data) or key_length == 0:
            raise SnapshotDataError(f"snapshot data damaged at byte {offset}")
        yield data[offset : offset + key_length], data[offset + key_length : end], version
        offset = end


def _prepare_layout(path: Path, env: lmdb.Environment) -> None:
    """Refuse any store but a replica store of this layout; give a new one its layout and id."""
    with env.begin(write=True) as txn:
        names = {bytes(key) for key in txn.cursor().iternext(keys=True, values=False)}
        if names & _SINGLE_COPY_DBS:
            raise StoreError(
                f"{path} holds a single-copy store (kv before replication); "
                "a replica store needs an empty directory"
            )
        if names - _OUR_DBS:
            raise StoreError(f"{path} holds an LMDB store that is not a kv replica store")
        meta = env.open_db(_META_DB, txn=txn)
        raw = txn.get(_LAYOUT_KEY, db=meta)
        if raw is None and names - {_META_DB}:
            raise StoreError(f"{path} holds a replica store without a layout mark")
        if raw is not None and _VERSION.unpack(raw)[0] != LAYOUT:
            raise StoreError(
                f"{path} holds replica layout {_VERSION.unpack(raw)[0]}; this build knows {LAYOUT}"
            )
        for name in _OUR_DBS:
            env.open_db(name, txn=txn)
        if raw is None:
            txn.put(_LAYOUT_KEY, _VERSION.pack(LAYOUT), db=meta)
            txn.put(_STORE_ID_KEY, uuid.uuid4().hex.encode(), db=meta)


def _delete_range(txn: lmdb.Transaction, db: lmdb._Database, lo: bytes, hi: bytes) -> None:
    """Delete every key in [lo, hi)."""
    cursor = txn.cursor(db=db)
    if not cursor.set_range(lo):
        return
    while cast(bytes, cursor.key()) < hi:
        if not cursor.delete():
            return


def _changed(conf_state: ConfState, data: bytes) -> ConfState:
    """The membership after one configuration change, by the core's own rules."""
    try:
        change = ConfChange.decode(data)
    except ValueError:
        return conf_state  # the core refuses such an entry itself; applying it changes nothing
    tracker = ProgressTracker(conf_state, 1, 1)
    tracker.change(change)
    return tracker.conf_state


def _pack_state(memory: _GroupMemory) -> bytes:
    hard = memory.hard_state
    return _STATE.pack(
        hard.term, hard.vote, hard.commit, memory.applied, memory.offset, memory.offset_term
    ) + _pack_conf_state(memory.conf_state)


@functools.lru_cache(maxsize=64)
def _pack_conf_state(conf: ConfState) -> bytes:
    """Memoised: every group's state is rewritten each cycle, and memberships are few."""
    parts: list[bytes] = []
    for members in (conf.voters, conf.learners):
        parts.append(_COUNT.pack(len(members)))
        parts += (_NODE.pack(node) for node in sorted(members))
    return b"".join(parts)


def _unpack_state(raw: bytes) -> _GroupMemory:
    term, vote, commit, applied, offset, offset_term = _STATE.unpack_from(raw)
    position = _STATE.size
    members: list[frozenset[int]] = []
    for _ in range(2):
        (count,) = _COUNT.unpack_from(raw, position)
        position += _COUNT.size
        nodes = struct.unpack_from(f">{count}Q", raw, position)
        position += count * _NODE.size
        members.append(frozenset(nodes))
    return _GroupMemory(
        hard_state=HardState(term, vote, commit),
        conf_state=ConfState(members[0], members[1]),
        applied=applied,
        offset=offset,
        offset_term=offset_term,
        last=offset,
    )
