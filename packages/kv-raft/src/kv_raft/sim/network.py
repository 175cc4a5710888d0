"""A simulated network: delays (hence reordering), drops, duplicates and partitions.

Partitions are a set of blocked directed links, so one-way partitions are the general case and a
symmetric one is two one-way blocks. A link is checked at delivery, so messages already in flight
when a partition starts are lost too, as they would be on a real cut.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from kv_raft.types import Message


@dataclass
class NetworkFaults:
    drop: float = 0.0
    duplicate: float = 0.0
    # Delays are in the caller's time unit (the simulator's sub-ticks). Most messages arrive within
    # ``lan_delay``; some take up to ``max_delay``; a few are very late.
    lan_delay: int = 1
    delay_prob: float = 0.1
    max_delay: int = 3
    late_prob: float = 0.0
    max_late: int = 30


class Network:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._queue: list[tuple[int, float, int, Message]] = []
        self._seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.faults = NetworkFaults()
        self.sent = 0
        self.delivered = 0

    def _delay(self) -> int:
        f = self.faults
        r = self._rng.random()
        if r < f.late_prob:
            return self._rng.randint(f.max_delay, max(f.max_delay, f.max_late))
        if r < f.late_prob + f.delay_prob:
            return self._rng.randint(1, f.max_delay)
        return self._rng.randint(0, f.lan_delay)

    def send(self, msg: Message, now: int) -> None:
        self.sent += 1
        rng = self._rng
        f = self.faults
        if f.drop and rng.random() < f.drop:
            return
        copies = 2 if f.duplicate and rng.random() < f.duplicate else 1
        for _ in range(copies):
            self._seq += 1
            # The random tiebreak reorders messages that arrive in the same tick.
            heapq.heappush(self._queue, (now + self._delay(), rng.random(), self._seq, msg))

    def due(self, now: int) -> list[Message]:
        queue = self._queue
        out: list[Message] = []
        while queue and queue[0][0] <= now:
            msg = heapq.heappop(queue)[3]
            if (msg.frm, msg.to) not in self.blocked:
                out.append(msg)
        self.delivered += len(out)
        return out

    def heal(self) -> None:
        self.blocked.clear()

    def isolate(self, groups: list[set[int]], one_way: bool) -> None:
        """Block every link from one group to another (only from groups[0] outward if one-way)."""
        for i, src in enumerate(groups):
            if one_way and i > 0:
                break
            for j, dst in enumerate(groups):
                if i != j:
                    for a in src:
                        for b in dst:
                            self.blocked.add((a, b))

    def __len__(self) -> int:
        return len(self._queue)
