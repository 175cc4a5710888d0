"""How keys longer than LMDB's key limit are stored (docs/decisions/0003-long-keys.md).

LMDB keys are at most 511 bytes; the API accepts keys up to 4096. A key of up
to ``INLINE_KEY_BYTES`` is stored as itself, with the record ``version ‖ value``.
A longer key is stored under ``its first INLINE_KEY_BYTES ‖ a 16-byte digest``
(exactly ``STORED_KEY_BYTES``), and its record is a *bucket*: every full key
that maps to that stored key, each with its own ``version ‖ value``. A bucket
normally holds one key; it holds more only on a digest collision, which then
costs a longer record rather than a wrong answer.

The two forms cannot be confused: an inline key is shorter than
``STORED_KEY_BYTES`` and a digested one is exactly that long. Order is kept
except among long keys that share their first ``INLINE_KEY_BYTES`` bytes,
which sort by digest; a future Scan sorts such runs by full key.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

LMDB_MAX_KEY_BYTES = 511
"""LMDB's compiled-in key limit (MDB_MAXKEYSIZE); the layout depends on it, so it is fixed here."""
DIGEST_BYTES = 16
INLINE_KEY_BYTES = LMDB_MAX_KEY_BYTES - DIGEST_BYTES
STORED_KEY_BYTES = LMDB_MAX_KEY_BYTES
LAYOUT = 1
"""Recorded in the store's meta database; bump when the mapping above changes."""

Digest = Callable[[bytes], bytes]
_LENGTH = struct.Struct(">I")


def long_key_digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=DIGEST_BYTES).digest()


def stored_key(key: bytes, digest: Digest = long_key_digest) -> bytes:
    if len(key) <= INLINE_KEY_BYTES:
        return key
    return key[:INLINE_KEY_BYTES] + digest(key)


def is_bucket(stored: bytes) -> bool:
    return len(stored) > INLINE_KEY_BYTES


def unpack_bucket(raw: bytes) -> dict[bytes, bytes]:
    """Full key -> ``version ‖ value`` for every key in a bucket record."""
    entries: dict[bytes, bytes] = {}
    view = memoryview(raw)
    offset = 0
    while offset < len(view):
        (key_length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        key = bytes(view[offset : offset + key_length])
        offset += key_length
        (record_length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        entries[key] = bytes(view[offset : offset + record_length])
        offset += record_length
    return entries


def pack_bucket(entries: dict[bytes, bytes]) -> bytes:
    parts: list[bytes] = []
    for key, record in entries.items():
        parts += (_LENGTH.pack(len(key)), key, _LENGTH.pack(len(record)), record)
    return b"".join(parts)
