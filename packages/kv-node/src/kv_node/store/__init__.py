"""Storage engines behind one small interface.

Every engine stores key -> (value, version) where a version is the store-wide
revision of the write that produced the value. Revisions only grow, so a key
that is deleted and written again never reuses a version, and compare-and-swap
on versions has no ABA problem.

Operations and results are NamedTuples: immutable like frozen dataclasses, but
several times cheaper to create, and the batch path creates millions.

Writes arrive in batches (``Store.apply``) that the engine applies in order
and atomically and, for a durable engine, makes durable before returning. A
batch may mix reads (``GetOp``) with writes: a read sees exactly the batch's
writes before it, which is what lets a client Batch of put, get, put, get on
one key answer each get with the value written just before it. The node's
group committer gathers concurrent callers' batches into one, so one fsync
serves many.

Every engine stores every key the API accepts (1..MAX_KEY_BYTES); an engine
with a smaller native key limit maps long keys internally (see the LMDB
engine and docs/decisions/0003-long-keys.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class PutOp(NamedTuple):
    key: bytes
    value: bytes
    if_version: int | None = None
    """Write only if the current version equals this; 0 means the key must be absent."""


class DeleteOp(NamedTuple):
    key: bytes
    if_version: int | None = None


class GetOp(NamedTuple):
    """A read placed among writes: it sees the writes before it in the same batch."""

    key: bytes


WriteOp = PutOp | DeleteOp
Op = PutOp | DeleteOp | GetOp


class WriteResult(NamedTuple):
    succeeded: bool
    """False only when the op's condition did not hold."""
    found: bool
    """Whether the key existed before the op."""
    version: int
    """The revision written (puts, and deletes of a present key) or the current version."""


class ReadResult(NamedTuple):
    value: bytes | None
    """None when the key is absent at that point of the batch."""
    version: int
    """The key's version, 0 when absent."""


Outcome = WriteResult | ReadResult
"""What one op produced: a WriteResult for PutOp and DeleteOp, a ReadResult for GetOp."""


class StoreError(Exception):
    """The engine cannot open or use its data; the message is meant for an operator."""


class Store(Protocol):
    engine: str
    durable: bool

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        """The value and version of ``key``, or None when absent."""
        ...

    def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply ops in order as one atomic (and, if durable, synced) transaction."""
        ...

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Like ``write``, with reads among the writes; one outcome per op, in order.

        If it raises, nothing of ``ops`` was applied.
        """
        ...

    def count(self) -> int: ...

    @property
    def revision(self) -> int: ...

    def close(self) -> None: ...


def decide(op: WriteOp, current_version: int | None, next_revision: int) -> WriteResult:
    """The outcome of one write given the key's current version (None = absent).

    Shared by every engine so that conditional-write semantics exist once.
    """
    found = current_version is not None
    current = current_version or 0
    if op.if_version is not None and op.if_version != current:
        return WriteResult(succeeded=False, found=found, version=current)
    if isinstance(op, DeleteOp) and not found:
        return WriteResult(succeeded=True, found=False, version=0)
    return WriteResult(succeeded=True, found=found, version=next_revision)
