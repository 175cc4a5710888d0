"""What one NORMAL Raft log entry carries: an ordered list of ops and an optional request id.

Every replica decodes the same bytes and applies the same ops, so the encoding is fixed,
versioned and strict: anything that is not exactly a command of a known version (truncated,
trailing bytes, an unknown op tag, a length that runs past the end, a key outside the API's
limits) is a ``CommandError``, never another exception. The store turns that error into the
same failure outcome on every replica instead of letting it escape an apply.

Layout (big-endian)::

    u8 FORMAT_VERSION | u8 flags | [u16 len, request_id if flags & HAS_REQUEST_ID] | u32 op count
    then per op: u8 tag (kind | HAS_IF_VERSION) | [u64 if_version] | u16 key len | key
                 | [u32 value len | value, puts only]

``request_id`` is opaque and unused today; the next issue applies retried writes at most once
with it, which is why it travels in the entry rather than beside it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from kv_common.limits import MAX_KEY_BYTES
from kv_node.store import DeleteOp, GetOp, Op, PutOp

FORMAT_VERSION = 1
"""Bump when the layout changes; a replica refuses versions it does not know."""
MAX_REQUEST_ID_BYTES = 0xFFFF
"""A request id is a client-chosen token, not data; its length field is 16 bits."""

_HAS_REQUEST_ID = 0x01
_KNOWN_FLAGS = _HAS_REQUEST_ID
_PUT, _DELETE, _GET = 1, 2, 3
_HAS_IF_VERSION = 0x80
_KIND_MASK = 0x7F
_MAX_VERSION = 2**64 - 1

_HEADER = struct.Struct(">BB")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_MIN_OP_BYTES = 1 + _U16.size + 1
"""The smallest op (a get of a one-byte key): bounds the op count a buffer can hold."""


class CommandError(ValueError):
    """Bytes that are not a command this build can apply, or a command that cannot be encoded."""


class Command(NamedTuple):
    ops: tuple[Op, ...]
    request_id: bytes | None = None


def encode_command(ops: Sequence[Op], request_id: bytes | None = None) -> bytes:
    """The entry payload for ``ops``; raises CommandError for what decode would refuse."""
    parts: list[bytes] = []
    if request_id is None:
        parts.append(_HEADER.pack(FORMAT_VERSION, 0))
    else:
        if len(request_id) > MAX_REQUEST_ID_BYTES:
            raise CommandError(f"request id of {len(request_id)} bytes")
        parts += (_HEADER.pack(FORMAT_VERSION, _HAS_REQUEST_ID), _U16.pack(len(request_id)))
        parts.append(request_id)
    parts.append(_U32.pack(len(ops)))
    for op in ops:
        key = op.key
        if not 1 <= len(key) <= MAX_KEY_BYTES:
            raise CommandError(f"key of {len(key)} bytes")
        if isinstance(op, GetOp):
            parts += (bytes((_GET,)), _U16.pack(len(key)), key)
            continue
        kind = _PUT if isinstance(op, PutOp) else _DELETE
        if op.if_version is None:
            parts.append(bytes((kind,)))
        elif 0 <= op.if_version <= _MAX_VERSION:
            parts += (bytes((kind | _HAS_IF_VERSION,)), _U64.pack(op.if_version))
        else:
            raise CommandError(f"if_version {op.if_version} is out of range")
        parts += (_U16.pack(len(key)), key)
        if isinstance(op, PutOp):
            parts += (_U32.pack(len(op.value)), op.value)
    return b"".join(parts)


def decode_command(data: bytes) -> Command:
    """The command in ``data``; CommandError unless ``data`` is exactly one valid command."""
    reader = _Reader(data)
    version, flags = reader.unpack(_HEADER)
    if version != FORMAT_VERSION:
        raise CommandError(f"command format {version}; this build reads {FORMAT_VERSION}")
    if flags & ~_KNOWN_FLAGS:
        raise CommandError(f"unknown command flags {flags:#04x}")
    request_id = reader.take(reader.unpack(_U16)[0]) if flags & _HAS_REQUEST_ID else None
    (count,) = reader.unpack(_U32)
    if count > reader.remaining // _MIN_OP_BYTES:
        raise CommandError(f"{count} ops cannot fit in {reader.remaining} bytes")
    ops: list[Op] = []
    for _ in range(count):
        (tag,) = reader.unpack(_U8)
        kind = tag & _KIND_MASK
        if kind not in (_PUT, _DELETE, _GET) or (kind == _GET and tag & _HAS_IF_VERSION):
            raise CommandError(f"unknown op tag {tag:#04x}")
        if_version = reader.unpack(_U64)[0] if tag & _HAS_IF_VERSION else None
        key = reader.take(reader.unpack(_U16)[0])
        if not 1 <= len(key) <= MAX_KEY_BYTES:
            raise CommandError(f"key of {len(key)} bytes")
        if kind == _PUT:
            ops.append(PutOp(key, reader.take(reader.unpack(_U32)[0]), if_version))
        elif kind == _DELETE:
            ops.append(DeleteOp(key, if_version))
        else:
            ops.append(GetOp(key))
    if reader.remaining:
        raise CommandError(f"{reader.remaining} bytes after the last op")
    return Command(tuple(ops), request_id)


class _Reader:
    """A cursor over the payload whose every read is bounds-checked into a CommandError."""

    __slots__ = ("_data", "_offset")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        if self.remaining < layout.size:
            raise CommandError(f"command truncated at byte {self._offset}")
        values = layout.unpack_from(self._data, self._offset)
        self._offset += layout.size
        return values

    def take(self, length: int) -> bytes:
        if self.remaining < length:
            raise CommandError(f"command truncated: {length} bytes needed at byte {self._offset}")
        chunk = self._data[self._offset : self._offset + length]
        self._offset += length
        return bytes(chunk)
