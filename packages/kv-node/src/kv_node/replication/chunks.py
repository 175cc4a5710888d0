"""Snapshots cut into chunks for the peer stream, and put back together on the other side.

A Raft snapshot here is a whole partition (``storage.encode_snapshot_data``), which can be far
larger than one gRPC request may be (``transport.MAX_REQUEST_BYTES``), and even one that fits
would hold a peer's stream for as long as it takes to write, starving the heartbeats and
appends of every other group behind it. So the transport never puts a SNAPSHOT message in a
Batch: ``OutgoingSnapshot`` cuts it into ``kv.raft.v1.SnapshotChunk`` frames of at most
``DEFAULT_CHUNK_BYTES`` that the sender interleaves with ordinary frames, and ``Reassembler``
turns the chunks of one inbound stream back into one ``Message`` for the runtime. Neither the
runtime nor the Raft core knows that chunks exist.

The protocol, per group on one stream: a first chunk (offset 0) with the message's header
(the message without the snapshot's data) and the data's total size, then chunks at
consecutive offsets, the last one flagged and carrying the CRC-32 of the whole data. The
sender sends one snapshot at a time, so chunks of two snapshots never mix on a stream; the
receiver still keys its state by group, so that the rule "one snapshot in flight per peer and
group" is checked rather than assumed.

Bounds on the receiving side, because a peer (buggy or hostile) decides what it sends: the
first chunk's declared size is reserved, up front, from a per-peer ``ReassemblyBudget``
shared by that peer's streams, and refused if it does not fit; no chunk may go past the
declared size. Anything that breaks the protocol discards that snapshot (its bytes are
released at once) with a reason the transport logs and counts: a gap or overlap, a chunk
without a first one, a second first chunk while one is in flight, a size or checksum that does
not match, a header that is not a SNAPSHOT message. After a discard the group's later chunks
of the same snapshot are ignored without further noise until its next first chunk. A stream
that ends discards everything it was reassembling (``discard_all``). Raft needs nothing else:
a leader that hears nothing back from a follower in snapshot state sends it a new snapshot
after an election timeout (``kv_raft.progress``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NoReturn

from kv.raft.v1 import raft_pb2
from kv_node.replication.codec import (
    CodecError,
    decode_snapshot_message,
    encode_snapshot_header,
)
from kv_raft import Message

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_REASSEMBLY_BYTES",
    "OutgoingSnapshot",
    "Reassembler",
    "ReassemblyBudget",
    "SnapshotDiscarded",
]

DEFAULT_CHUNK_BYTES = 256 * 1024
"""Data per chunk. Small enough that an ordinary frame waits for at most one chunk's write
(a few milliseconds on a LAN), large enough that per-frame costs stay small next to the copy."""
DEFAULT_MAX_REASSEMBLY_BYTES = 512 * 1024 * 1024
"""Snapshot bytes a node holds while reassembling from one peer (all groups, all streams). It
is also the largest snapshot that can travel at all: a partition above it cannot be sent."""


class SnapshotDiscarded(Exception):
    """A snapshot being reassembled was thrown away; the message says why (for the log)."""

    def __init__(self, group: int, reason: str) -> None:
        super().__init__(f"group {group}: {reason}")
        self.group = group
        self.reason = reason


class OutgoingSnapshot:
    """One SNAPSHOT message on its way out, cut into chunks as the sender asks for them.

    The header is encoded here, so a message that cannot be encoded fails at ``__init__``
    (``CodecError``), before anything is sent; the checksum is computed chunk by chunk, so no
    single step holds the event loop for the whole snapshot.
    """

    def __init__(self, group: int, message: Message, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.group = group
        self.message = message
        self._header = encode_snapshot_header(message)
        assert message.snapshot is not None  # encode_snapshot_header checked it
        self._data = memoryview(message.snapshot.data)
        self._chunk_bytes = chunk_bytes
        self._offset = 0
        self._crc = 0
        self.chunks_sent = 0
        self.done = False

    @property
    def size(self) -> int:
        """Bytes of snapshot data."""
        return len(self._data)

    @property
    def started(self) -> bool:
        return self.chunks_sent > 0

    def next_chunk(self) -> raft_pb2.SnapshotChunk:
        """The next chunk; the one flagged ``last`` sets ``done``."""
        if self.done:
            raise RuntimeError(f"group {self.group}: the snapshot was sent whole already")
        end = min(self._offset + self._chunk_bytes, len(self._data))
        piece = bytes(self._data[self._offset : end])
        self._crc = zlib.crc32(piece, self._crc)
        chunk = raft_pb2.SnapshotChunk(group_id=self.group, offset=self._offset, data=piece)
        if self._offset == 0:
            chunk.header.CopyFrom(self._header)
            chunk.total_size = len(self._data)
        if end == len(self._data):
            chunk.last = True
            chunk.checksum = self._crc
            self.done = True
        self._offset = end
        self.chunks_sent += 1
        return chunk


@dataclass
class ReassemblyBudget:
    """Bytes one peer may have in reassembly at once, shared by its streams."""

    limit: int = DEFAULT_MAX_REASSEMBLY_BYTES
    used: int = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, "released more snapshot bytes than were reserved"


@dataclass
class _Partial:
    header: raft_pb2.Message
    total: int
    received: int = 0
    crc: int = 0
    pieces: list[bytes] = field(default_factory=list)


_SKIPPING = None
"""A group's state after a discard: its chunks are ignored until its next first chunk."""


class Reassembler:
    """The snapshots one inbound stream is receiving, by group; see the module docstring.

    ``feed`` returns ``(group, message)`` when a chunk completes a snapshot, None while one is
    still arriving (or a discarded one's chunks are being skipped), and raises
    ``SnapshotDiscarded`` when a chunk breaks the protocol (the snapshot is gone by then).
    Group ids are the caller's to check against the map first: the state is keyed by them.
    """

    def __init__(self, budget: ReassemblyBudget) -> None:
        self._budget = budget
        self._groups: dict[int, _Partial | None] = {}

    @property
    def in_flight(self) -> int:
        """Snapshots partly received."""
        return sum(partial is not None for partial in self._groups.values())

    @property
    def reserved(self) -> int:
        """Bytes this stream holds reserved from its peer's budget."""
        return sum(partial.total for partial in self._groups.values() if partial is not None)

    def feed(self, chunk: raft_pb2.SnapshotChunk) -> tuple[int, Message] | None:
        group = chunk.group_id
        if chunk.HasField("header"):
            partial = self._start(group, chunk)
        elif group not in self._groups:
            self._discard(group, f"a chunk at offset {chunk.offset} without a first chunk")
        else:
            current = self._groups[group]
            if current is None:
                return None  # the rest of a snapshot discarded earlier
            partial = current
        if chunk.offset != partial.received:
            self._discard(group, f"a chunk at offset {chunk.offset}, expected {partial.received}")
        if partial.received + len(chunk.data) > partial.total:
            self._discard(
                group,
                f"chunks add up to more than the declared {partial.total} bytes "
                f"({partial.received} + {len(chunk.data)})",
            )
        partial.pieces.append(chunk.data)
        partial.received += len(chunk.data)
        partial.crc = zlib.crc32(chunk.data, partial.crc)
        if not chunk.last:
            return None
        if partial.received != partial.total:
            self._discard(group, f"ended at {partial.received} of {partial.total} bytes")
        if partial.crc != chunk.checksum:
            self._discard(
                group, f"checksum {partial.crc:#010x}, the sender's was {chunk.checksum:#010x}"
            )
        data = b"".join(partial.pieces)
        self._forget(group)
        try:
            return group, decode_snapshot_message(partial.header, data)
        except CodecError as exc:  # the header was decoded at the start; only a bug gets here
            raise SnapshotDiscarded(group, str(exc)) from exc

    def discard_all(self) -> int:
        """Drop every snapshot in flight (the stream ended); how many there were."""
        in_flight = self.in_flight
        for group in list(self._groups):
            self._forget(group)
        return in_flight

    def _start(self, group: int, chunk: raft_pb2.SnapshotChunk) -> _Partial:
        if self._groups.get(group) is not None:
            self._discard(group, "a second snapshot began before the first one ended")
        if chunk.offset != 0:
            self._discard(group, f"a first chunk at offset {chunk.offset}")
        try:
            decode_snapshot_message(chunk.header, b"")
        except CodecError as exc:
            self._discard(group, str(exc))
        if chunk.total_size > self._budget.limit:
            self._discard(
                group,
                f"{chunk.total_size} bytes is above the {self._budget.limit}-byte limit "
                "for snapshots in reassembly from one peer",
            )
        if not self._budget.reserve(chunk.total_size):
            self._discard(
                group,
                f"no room for {chunk.total_size} bytes: {self._budget.used} of "
                f"{self._budget.limit} are held by other snapshots from this peer",
            )
        partial = _Partial(chunk.header, chunk.total_size)
        self._groups[group] = partial
        return partial

    def _forget(self, group: int) -> None:
        partial = self._groups.pop(group, None)
        if partial is not None:
            self._budget.release(partial.total)

    def _discard(self, group: int, reason: str) -> NoReturn:
        """Drop the group's snapshot, skip its remaining chunks, and raise (always)."""
        self._forget(group)
        self._groups[group] = _SKIPPING
        raise SnapshotDiscarded(group, reason)
