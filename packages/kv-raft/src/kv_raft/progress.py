"""What a leader knows about each follower, and how fast it may send to it.

A follower is in one of three states (as in etcd): PROBE while the leader searches for where the
logs agree (one APPEND per heartbeat), REPLICATE once it knows (pipelined APPENDs bounded by the
in-flight window), SNAPSHOT while an InstallSnapshot is in flight (nothing else is sent).
"""

from __future__ import annotations

import enum
from collections import deque


class ProgressState(enum.Enum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """Sliding window of unacknowledged APPENDs: (last index carried, bytes carried)."""

    def __init__(self, max_msgs: int, max_bytes: int) -> None:
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        self._window: deque[tuple[int, int]] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._window)

    def add(self, last_index: int, size: int) -> None:
        self._window.append((last_index, size))
        self.bytes += size

    def free_le(self, index: int) -> None:
        window = self._window
        while window and window[0][0] <= index:
            self.bytes -= window.popleft()[1]

    def free_first_one(self) -> None:
        if self._window:
            self.bytes -= self._window.popleft()[1]

    def full(self) -> bool:
        return len(self._window) >= self.max_msgs or self.bytes >= self.max_bytes

    def reset(self) -> None:
        self._window.clear()
        self.bytes = 0


class Progress:
    __slots__ = (
        "inflights",
        "is_learner",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "snapshot_elapsed",
        "state",
    )

    def __init__(
        self, next_index: int, max_msgs: int, max_bytes: int, *, is_learner: bool = False
    ) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot_elapsed = 0
        # A follower counts as active until proven otherwise, so a fresh leader is not deposed by
        # CheckQuorum before it has had a chance to hear from anyone.
        self.recent_active = True
        self.is_learner = is_learner
        self.inflights = Inflights(max_msgs, max_bytes)

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match}, next={self.next}, state={self.state.name}, "
            f"inflight={len(self.inflights)})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.snapshot_elapsed = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, index: int) -> bool:
        """A follower acknowledged ``index``; False if that told us nothing new."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A follower rejected the APPEND after ``rejected``; False if the rejection is stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True
