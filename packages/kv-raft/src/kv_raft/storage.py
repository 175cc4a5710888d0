"""The read interface the core uses to see what is durable, and an in-memory implementation.

The core never writes here: the runtime writes what a Ready asks it to persist, then tells the core
with ``advance``. Keeping the interface read-only is what lets the runtime batch and fsync as it
likes (group commit across Raft groups) without the core knowing.
"""

from __future__ import annotations

from typing import Protocol

from kv_raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta, entry_size


class StorageError(Exception):
    pass


class CompactedError(StorageError):
    """The requested index is at or below the last snapshot: only the snapshot has it now."""


class UnavailableError(StorageError):
    """The requested index is beyond the last durable entry."""


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi); at least one if any is in range, then up to ``max_size`` bytes."""
        ...

    def term(self, index: int) -> int:
        """Term of ``index``; valid for first_index()-1 (the snapshot) through last_index()."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


def limit_size(entries: list[Entry], max_size: int | None) -> list[Entry]:
    if max_size is None or not entries:
        return entries
    total = entry_size(entries[0])
    for i in range(1, len(entries)):
        total += entry_size(entries[i])
        if total > max_size:
            return entries[:i]
    return entries


class MemoryStorage:
    """Storage in a list; ``_ents[0]`` is a dummy standing for the snapshot's (index, term)."""

    def __init__(self, conf_state: ConfState | None = None) -> None:
        """Empty storage for a node that will join an existing group (it learns the membership
        from the snapshot its leader sends), or, given ``conf_state``, a founding member.

        The founding configuration is a snapshot at (index 1, term 1) rather than a bare
        setting, so that a node added later, whose log is empty, is necessarily sent a
        snapshot and so learns the membership it joined.
        """
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        self._ents: list[Entry] = [Entry(term=0, index=0)]
        if conf_state is not None:
            self._hard_state = HardState(term=1, commit=1)
            self._snapshot = Snapshot(SnapshotMeta(index=1, term=1, conf_state=conf_state))
            self._ents = [Entry(term=1, index=1)]

    # -- read interface -------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.meta.conf_state

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError(index)
        if index - offset >= len(self._ents):
            raise UnavailableError(index)
        return self._ents[index - offset].term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise UnavailableError(hi)
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def copy(self) -> MemoryStorage:
        """An independent copy (entries are immutable, so sharing them is safe)."""
        other = MemoryStorage()
        other._hard_state = self._hard_state
        other._snapshot = self._snapshot
        other._ents = list(self._ents)
        return other

    # -- write side, used by the runtime --------------------------------------------------------
    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace everything with ``snapshot`` (a follower installing one from its leader)."""
        if snapshot.meta.index <= self._snapshot.meta.index:
            return
        self._snapshot = snapshot
        self._ents = [Entry(term=snapshot.meta.term, index=snapshot.meta.index)]

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the application's state as of applied ``index``; does not compact."""
        if index <= self._snapshot.meta.index:
            return self._snapshot
        if index > self.last_index():
            raise UnavailableError(index)
        meta = SnapshotMeta(index=index, term=self.term(index), conf_state=conf_state)
        self._snapshot = Snapshot(meta, data)
        return self._snapshot

    def compact(self, index: int) -> None:
        """Discard entries before ``index`` (which becomes the new dummy)."""
        offset = self._ents[0].index
        if index <= offset:
            return
        if index > self.last_index():
            raise UnavailableError(index)
        dummy = self._ents[index - offset]
        self._ents = [Entry(term=dummy.term, index=dummy.index), *self._ents[index - offset + 1 :]]

    def append(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Append, replacing any conflicting suffix (entries must be contiguous)."""
        if not entries:
            return
        first = self.first_index()
        last = entries[-1].index
        if last < first:
            return
        if first > entries[0].index:
            entries = list(entries)[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise UnavailableError(entries[0].index)
        del self._ents[offset:]
        self._ents.extend(entries)
