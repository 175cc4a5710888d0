"""The small key-value state machine the simulated clients drive through Raft.

Commands are plain text so a failing run's log is readable; keys and values the simulator generates
never contain the separators.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

Kind = Literal["put", "get", "cas"]

_NONE = "~"  # stands for "absent" in an encoded command
_SEP = "|"


@dataclass(frozen=True, slots=True)
class Command:
    op_id: str
    kind: Kind
    key: str
    value: str | None
    expected: str | None

    def encode(self) -> bytes:
        fields = (self.op_id, self.kind, self.key, self.value, self.expected)
        return _SEP.join(_NONE if f is None else f for f in fields).encode()

    @classmethod
    def decode(cls, data: bytes) -> Command:
        op_id, kind, key, value, expected = data.decode().split(_SEP)
        if kind not in ("put", "get", "cas"):
            raise ValueError(f"bad command kind {kind!r}")
        return cls(
            op_id,
            kind,  # type: ignore[arg-type]  # checked just above
            key,
            None if value == _NONE else value,
            None if expected == _NONE else expected,
        )


class KVStateMachine:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def apply(self, cmd: Command) -> str | bool | None:
        """Apply a command; returns the client-visible output (see linearizability.Op.output)."""
        if cmd.kind == "put":
            assert cmd.value is not None
            self.data[cmd.key] = cmd.value
            return None
        if cmd.kind == "cas":
            assert cmd.value is not None
            if self.data.get(cmd.key) != cmd.expected:
                return False
            self.data[cmd.key] = cmd.value
            return True
        return self.data.get(cmd.key)

    def snapshot(self) -> bytes:
        return json.dumps(self.data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def restore(cls, data: bytes) -> KVStateMachine:
        sm = cls()
        if data:
            sm.data = dict(json.loads(data))
        return sm
