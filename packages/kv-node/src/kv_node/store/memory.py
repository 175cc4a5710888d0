"""The in-memory engine: a locked dict. Fast, and forgets everything on exit.

Each value is stored as one bytes object, an 8-byte big-endian version followed
by the value (the LMDB layout), rather than a (value, version) tuple: that saves
a tuple and an int object per key, about 80 bytes, which is most of the
overhead over the raw key and value (see docs/benchmarks.md, memory).

Nothing in ``apply``'s loop can raise short of running out of memory, which
is how a batch stays all-or-nothing without staging its changes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import cast

from kv_node.store import DeleteOp, GetOp, Op, Outcome, ReadResult, WriteOp, WriteResult, decide


class MemoryStore:
    engine = "memory"
    durable = False

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._revision = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        packed = self._data.get(key)
        if packed is None:
            return None
        return packed[8:], int.from_bytes(packed[:8], "big")

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        return cast(list[WriteResult], self.apply(ops))

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        results: list[Outcome] = []
        with self._lock:
            for op in ops:
                packed = self._data.get(op.key)
                current = None if packed is None else int.from_bytes(packed[:8], "big")
                if isinstance(op, GetOp):
                    results.append(
                        ReadResult(None, 0)
                        if packed is None
                        else ReadResult(packed[8:], current or 0)
                    )
                    continue
                result = decide(op, current, self._revision + 1)
                if result.succeeded and result.version > self._revision:
                    self._revision = result.version
                    if isinstance(op, DeleteOp):
                        del self._data[op.key]
                    else:
                        self._data[op.key] = result.version.to_bytes(8, "big") + op.value
                results.append(result)
        return results

    def count(self) -> int:
        return len(self._data)

    @property
    def revision(self) -> int:
        return self._revision

    def close(self) -> None:
        self._data = {}
