"""A fault-free cluster driven step by step, for unit tests and examples of the Ready contract.

Unlike ``simulation``, nothing here is random except the election jitter: messages are delivered
when the test says so (``stabilize``), links can be cut explicitly, and every Ready is persisted,
sent and applied in the documented order.
"""

from __future__ import annotations

import random
from collections import deque

from kv_raft.node import RawNode
from kv_raft.storage import MemoryStorage
from kv_raft.types import Config, ConfState, Entry, Message, ReadState, Role

# Bound on delivery rounds in ``stabilize``, so a livelock fails a test instead of hanging it.
MAX_STABILIZE_ROUNDS = 10_000


class LockstepCluster:
    def __init__(self, size: int, *, seed: int = 0, **config: int | bool) -> None:
        self.ids = list(range(1, size + 1))
        conf = ConfState(voters=frozenset(self.ids))
        self.config = config
        self.seed = seed
        self.storages = {i: MemoryStorage(conf) for i in self.ids}
        self.nodes: dict[int, RawNode] = {}
        self.applied: dict[int, list[Entry]] = {i: [] for i in self.ids}
        self.read_states: dict[int, list[ReadState]] = {i: [] for i in self.ids}
        self.queue: deque[Message] = deque()
        self.cut: set[tuple[int, int]] = set()
        self.sent: list[Message] = []
        for i in self.ids:
            self.start(i)

    def start(self, node_id: int) -> RawNode:
        """(Re)start a node from what it persisted."""
        storage = self.storages.setdefault(node_id, MemoryStorage())
        cfg = Config(
            id=node_id,
            rng=random.Random(self.seed * 1000 + node_id),
            applied=storage.snapshot().meta.index,
            **self.config,  # type: ignore[arg-type]
        )
        node = RawNode(cfg, storage)
        self.nodes[node_id] = node
        self.applied.setdefault(node_id, [])
        self.read_states.setdefault(node_id, [])
        return node

    def add_node(self, node_id: int) -> RawNode:
        """A brand-new, empty node that will join as a learner (it knows no configuration)."""
        self.ids.append(node_id)
        return self.start(node_id)

    def isolate(self, node_id: int) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def heal(self) -> None:
        self.cut.clear()

    def process_ready(self, node_id: int) -> None:
        node = self.nodes[node_id]
        storage = self.storages[node_id]
        while node.has_ready():
            rd = node.ready()
            if rd.snapshot is not None:
                storage.apply_snapshot(rd.snapshot)
            storage.append(rd.entries)
            if rd.hard_state is not None:
                storage.set_hard_state(rd.hard_state)
            for m in rd.messages:
                self.sent.append(m)
                if (m.frm, m.to) not in self.cut:
                    self.queue.append(m)
            self.applied[node_id].extend(rd.committed_entries)
            self.read_states[node_id].extend(rd.read_states)
            node.advance(rd)

    def stabilize(self) -> None:
        """Deliver messages until none are left."""
        for node_id in self.ids:
            self.process_ready(node_id)
        for _ in range(MAX_STABILIZE_ROUNDS):
            if not self.queue:
                return
            m = self.queue.popleft()
            if m.to in self.nodes:
                self.nodes[m.to].step(m)
                self.process_ready(m.to)
        raise AssertionError("cluster did not stabilize")

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            for node_id in self.ids:
                self.nodes[node_id].tick()
            self.stabilize()

    def elect(self, node_id: int) -> RawNode:
        node = self.nodes[node_id]
        node.campaign()
        self.stabilize()
        if node.role != Role.LEADER:
            raise AssertionError(f"node {node_id} did not win: {node.role}")
        return node

    def leaders(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.role == Role.LEADER]

    def data_applied(self, node_id: int) -> list[bytes]:
        return [e.data for e in self.applied[node_id] if e.data]
