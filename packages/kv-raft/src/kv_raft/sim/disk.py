"""A simulated disk that keeps only what was fsynced, as a real one does after a power cut.

A write is visible at once (through the page cache, the core reads it back), but only an fsync
makes it durable. At a crash the writes since the last fsync survive whole, as a prefix (some
whole writes, then the first entries of the next append) or not at all, as the seed decides.
An fsync can also fail; the runtime must then stop the node (as etcd does), because the state of
the unsynced writes is unknown.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from kv_raft.storage import MemoryStorage
from kv_raft.types import ConfState, Entry, HardState, Snapshot


class Fate(enum.Enum):
    """What became of the unsynced writes at a crash."""

    NOTHING_PENDING = 0
    LOST = 1
    PREFIX = 2
    KEPT = 3


@dataclass(frozen=True, slots=True)
class _Write:
    """One write since the last fsync; exactly one field is set."""

    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    hard_state: HardState | None = None
    app_snapshot: tuple[int, ConfState, bytes, int] | None = None  # index, conf, data, compact

    @property
    def units(self) -> int:
        """Pieces a torn write can stop between (each entry of an append is one)."""
        return len(self.entries) or 1


def _replay(storage: MemoryStorage, write: _Write) -> None:
    if write.snapshot is not None:
        storage.apply_snapshot(write.snapshot)
    elif write.entries:
        storage.append(write.entries)
    elif write.hard_state is not None:
        storage.set_hard_state(write.hard_state)
    elif write.app_snapshot is not None:
        index, conf_state, data, compact_to = write.app_snapshot
        storage.create_snapshot(index, conf_state, data)
        storage.compact(compact_to)


class SimDisk:
    def __init__(self, storage: MemoryStorage) -> None:
        self.live = storage
        """What the node has written: the core reads it as its ``Storage``."""
        self.synced = storage.copy()
        """What survives a crash for certain."""
        self._pending: list[_Write] = []

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def _write(self, write: _Write) -> None:
        _replay(self.live, write)
        self._pending.append(write)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        self._write(_Write(snapshot=snapshot))

    def append(self, entries: tuple[Entry, ...]) -> None:
        self._write(_Write(entries=entries))

    def set_hard_state(self, hard_state: HardState) -> None:
        self._write(_Write(hard_state=hard_state))

    def save_app_snapshot(
        self, index: int, conf_state: ConfState, data: bytes, compact_to: int
    ) -> None:
        """The state machine's snapshot, then log compaction up to ``compact_to``."""
        self._write(_Write(app_snapshot=(index, conf_state, data, compact_to)))

    def sync(self) -> None:
        for write in self._pending:
            _replay(self.synced, write)
        self._pending.clear()

    def crash(self, rng: random.Random) -> Fate:
        """Power cut: keep the unsynced writes whole, as a prefix, or not at all."""
        pending = self._pending
        if not pending:
            fate = Fate.NOTHING_PENDING
        else:
            fate = rng.choice((Fate.LOST, Fate.PREFIX, Fate.KEPT))
        if fate == Fate.KEPT:
            self.sync()
        elif fate == Fate.PREFIX:
            cut = rng.randrange(sum(w.units for w in pending))
            for write in pending:
                if cut >= write.units:
                    _replay(self.synced, write)
                    cut -= write.units
                    continue
                if write.entries and cut:
                    _replay(self.synced, _Write(entries=write.entries[:cut]))
                break
        self._pending = []
        self.live = self.synced.copy()
        return fate
