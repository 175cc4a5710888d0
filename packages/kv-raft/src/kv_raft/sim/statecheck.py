"""Checks on what clients and snapshots see, as it happens rather than after the run.

The reference state machine replays the entries everyone agreed were applied, in index order,
and remembers the state after each index: a snapshot taken or installed at index ``i`` must hold
exactly that state. For reads, each key remembers the log index of the latest write a client has
seen take effect (a write acknowledged, or a value some read returned); a read that starts after
that moment must return that write or a later one. This finds a stale read at once, with no need
for a racing write to make the history non-linearizable (the final linearizability check still
runs).
"""

from __future__ import annotations

from kv_raft.sim.checker import InvariantViolation
from kv_raft.sim.kvstore import Command, KVStateMachine
from kv_raft.types import Entry, EntryType


class StateChecker:
    def __init__(self) -> None:
        self._reference = KVStateMachine()
        self._index = 1  # the founding snapshot (index 1) holds the empty state
        self._states: dict[int, dict[str, str]] = {1: {}}
        self._pending: dict[int, Entry] = {}
        # key -> log index of the latest write a client saw take effect.
        self.acked_index: dict[str, int] = {}
        # value -> log index of the write that stored it (values are unique per operation).
        self._written_at: dict[str, int] = {}

    # -- the reference state machine ---------------------------------------------------------
    def on_apply(self, entry: Entry) -> None:
        """A node applied ``entry`` (state machine safety is the other checker's job)."""
        if entry.index <= self._index or entry.index in self._pending:
            return
        self._pending[entry.index] = entry
        reference = self._reference
        while (following := self._pending.pop(self._index + 1, None)) is not None:
            self._index += 1
            if following.type == EntryType.NORMAL and following.data:
                cmd = Command.decode(following.data)
                before = reference.data.get(cmd.key)
                reference.apply(cmd)
                after = reference.data.get(cmd.key)
                if after is not None and after != before:
                    self._written_at[after] = self._index
            self._states[self._index] = dict(reference.data)

    def on_snapshot(self, node_id: int, index: int, data: bytes, how: str) -> None:
        expected = self._states.get(index)
        if expected is None:
            return  # not yet applied by anyone in order: nothing to compare with
        got = KVStateMachine.restore(data).data
        if got != expected:
            raise InvariantViolation(
                "snapshot contents",
                f"node {node_id} {how} a snapshot at index {index} holding {got}, but the state "
                f"machine at {index} is {expected}",
            )

    # -- real-time stale reads ---------------------------------------------------------------
    def on_write_acked(self, key: str, index: int) -> None:
        if index > self.acked_index.get(key, 0):
            self.acked_index[key] = index

    def read_floor(self, key: str) -> int:
        """The index a read starting now must see at least."""
        return self.acked_index.get(key, 0)

    def on_read(self, node_id: int, key: str, value: str | None, floor: int) -> None:
        written = 0 if value is None else self._written_at.get(value, 0)
        if written < floor:
            raise InvariantViolation(
                "stale read",
                f"node {node_id} served {key}={value!r} (written at index {written}) to a read "
                f"that started after a client saw the write at index {floor}",
            )
        self.on_write_acked(key, written)  # seen now: later reads must not go back before it
