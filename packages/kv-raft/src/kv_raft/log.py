"""The Raft log as the core sees it: durable entries in Storage plus an unstable tail.

The unstable tail holds what the core has accepted but the runtime has not yet confirmed durable
(through ``advance``). A crash loses exactly the unstable part, which is why nothing derived from it
may leave the node before the Ready carrying it has been persisted.
"""

from __future__ import annotations

from kv_raft.storage import CompactedError, Storage, StorageError, limit_size
from kv_raft.types import Entry, Snapshot


class LogInvariantError(AssertionError):
    """The core was asked to do something that would corrupt its log: always a bug."""


class Unstable:
    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.entries: list[Entry] = []
        self.snapshot: Snapshot | None = None

    def maybe_first_index(self) -> int | None:
        return self.snapshot.meta.index + 1 if self.snapshot is not None else None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        return self.snapshot.meta.index if self.snapshot is not None else None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == index:
                return self.snapshot.meta.term
            return None
        pos = index - self.offset
        return self.entries[pos].term if pos < len(self.entries) else None

    def stable_to(self, index: int, term: int) -> None:
        # The term check protects entries replaced by a new leader after the Ready was taken.
        if index < self.offset or self.maybe_term(index) != term:
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.meta.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        after = entries[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif after <= self.offset:
            self.offset = after
            self.entries = list(entries)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(entries)


class RaftLog:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.unstable = Unstable(storage.last_index() + 1)
        first = storage.first_index()
        # Everything up to the snapshot is committed and applied by definition. ``applying`` is
        # how far committed entries have been handed to the runtime, which may apply them later.
        self.committed = first - 1
        self.applying = first - 1
        self.applied = first - 1

    # -- reading --------------------------------------------------------------------------------
    def first_index(self) -> int:
        first = self.unstable.maybe_first_index()
        return first if first is not None else self.storage.first_index()

    def last_index(self) -> int:
        last = self.unstable.maybe_last_index()
        return last if last is not None else self.storage.last_index()

    def term(self, index: int) -> int | None:
        """Term at ``index``, or None when it is compacted away or beyond the end."""
        if index < self.first_index() - 1 or index > self.last_index():
            return None
        term = self.unstable.maybe_term(index)
        if term is not None:
            return term
        try:
            return self.storage.term(index)
        except StorageError:
            return None

    def last_term(self) -> int:
        term = self.term(self.last_index())
        if term is None:
            raise LogInvariantError("last entry has no term")
        return term

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Raft's election restriction (§5.4.1): is a candidate's log at least as new as ours?"""
        my_term = self.last_term()
        return term > my_term or (term == my_term and last_index >= self.last_index())

    def slice(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries [lo, hi); raises CompactedError when ``lo`` is no longer in the log."""
        if lo >= hi:
            return []
        if lo < self.first_index():
            raise CompactedError(lo)
        if hi > self.last_index() + 1:
            raise LogInvariantError(f"slice [{lo}, {hi}) beyond last index {self.last_index()}")
        ents: list[Entry] = []
        offset = self.unstable.offset
        if lo < offset:
            ents = self.storage.entries(lo, min(hi, offset), max_size)
            if len(ents) < min(hi, offset) - lo:
                return ents  # size limit hit inside storage
        if hi > offset:
            start = max(lo, offset) - offset
            ents = ents + self.unstable.entries[start : hi - offset]
        return limit_size(ents, max_size)

    def entries_from(self, lo: int, max_size: int | None = None) -> list[Entry]:
        if lo > self.last_index():
            return []
        return self.slice(lo, self.last_index() + 1, max_size)

    def unstable_entries(self) -> list[Entry]:
        return self.unstable.entries

    def next_committed_entries(self) -> list[Entry]:
        lo = max(self.applying + 1, self.first_index())
        return self.slice(lo, self.committed + 1)

    def has_next_committed_entries(self) -> bool:
        # committed > max(applying, first_index() - 1), asking storage only when it matters.
        committed = self.committed
        return committed > self.applying and committed >= self.first_index()

    # -- changing -------------------------------------------------------------------------------
    def find_conflict(self, entries: tuple[Entry, ...] | list[Entry]) -> int:
        """Index of the first entry whose term disagrees with ours (0 if none)."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest index <= ``index`` whose term is <= ``term``, with that term (fast back-off)."""
        while index > 0:
            my_term = self.term(index)
            if my_term is None:
                return index, 0
            if my_term <= term:
                return index, my_term
            index -= 1
        return 0, 0

    def maybe_append(
        self,
        index: int,
        log_term: int,
        committed: int,
        entries: tuple[Entry, ...],
    ) -> int | None:
        """Follower side of AppendEntries: None if (index, log_term) does not match our log.

        The commit index may only rise to the last entry this APPEND verified: anything beyond
        may be a stale tail from an older term.
        """
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            if conflict <= self.committed:
                raise LogInvariantError(f"conflict at {conflict} <= committed {self.committed}")
            self.append(entries[conflict - index - 1 :])
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, entries: tuple[Entry, ...] | list[Entry]) -> int:
        if entries:
            if entries[0].index - 1 < self.committed:
                raise LogInvariantError("appending would overwrite committed entries")
            self.unstable.truncate_and_append(entries)
        return self.last_index()

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise LogInvariantError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int, *, any_term: bool = False) -> bool:
        """Advance commit to ``index`` only if it carries ``term`` (Raft §5.4.2)."""
        if index > self.committed and (any_term or self.term(index) == term):
            self.commit_to(index)
            return True
        return False

    def applying_to(self, index: int) -> None:
        if index > self.applying:
            if index > self.committed:
                raise LogInvariantError(f"applying {index} beyond committed {self.committed}")
            self.applying = index

    def applied_to(self, index: int) -> None:
        if index > self.applied:
            if index > self.applying:
                raise LogInvariantError(f"applied {index} beyond handed out {self.applying}")
            self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        self.unstable.stable_snap_to(index)

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.meta.index
        self.unstable.restore(snapshot)

    def pending_snapshot(self) -> Snapshot | None:
        return self.unstable.snapshot
