"""The in-memory engine: a locked dict. Fast, and forgets everything on exit."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kv_node.store import DeleteOp, WriteOp, WriteResult, decide


class MemoryStore:
    engine = "memory"
    durable = False

    def __init__(self) -> None:
        self._data: dict[bytes, tuple[bytes, int]] = {}
        self._revision = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        return self._data.get(key)

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results = []
        with self._lock:
            for op in ops:
                current = self._data.get(op.key)
                result = decide(op, None if current is None else current[1], self._revision + 1)
                if result.succeeded and result.version > self._revision:
                    self._revision = result.version
                    if isinstance(op, DeleteOp):
                        del self._data[op.key]
                    else:
                        self._data[op.key] = (op.value, result.version)
                results.append(result)
        return results

    def count(self) -> int:
        return len(self._data)

    @property
    def revision(self) -> int:
        return self._revision

    def close(self) -> None:
        self._data = {}
