"""Tests for kv_node.replication.chunks: snapshots cut into chunks and put back together.

Round trips at and around chunk boundaries (and with no data at all), then every way a chunk
sequence can break the protocol: each must discard the snapshot, release its reserved bytes,
stay quiet about the rest of that snapshot, and leave the next snapshot unharmed.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kv.raft.v1 import raft_pb2
from kv_node.replication.chunks import (
    OutgoingSnapshot,
    Reassembler,
    ReassemblyBudget,
    SnapshotDiscarded,
)
from kv_node.replication.codec import CodecError, encode_message
from kv_raft import ConfState, Message, MessageType, Snapshot, SnapshotMeta

CHUNK = 16
GROUP = 3
LIMIT = 1_000


def snapshot_message(data: bytes, *, index: int = 7) -> Message:
    meta = SnapshotMeta(index=index, term=2, conf_state=ConfState(voters=frozenset({1, 2, 3})))
    return Message(
        MessageType.SNAPSHOT, to=2, frm=1, term=2, snapshot=Snapshot(meta, data), context=b"c"
    )


def cut(
    message: Message, chunk_bytes: int = CHUNK, group: int = GROUP
) -> list[raft_pb2.SnapshotChunk]:
    outgoing = OutgoingSnapshot(group, message, chunk_bytes)
    chunks = []
    while not outgoing.done:
        chunks.append(outgoing.next_chunk())
    return chunks


def feed_all(
    reassembler: Reassembler, chunks: list[raft_pb2.SnapshotChunk]
) -> list[tuple[int, Message] | None]:
    return [reassembler.feed(chunk) for chunk in chunks]


def data_of(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 5 * CHUNK]
)
def test_round_trip_at_and_around_chunk_boundaries(size: int) -> None:
    message = snapshot_message(data_of(size))
    chunks = cut(message)
    assert len(chunks) == max(1, -(-size // CHUNK))
    assert [c.offset for c in chunks] == [i * CHUNK for i in range(len(chunks))]
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.HasField("header") for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert all(len(c.data) <= CHUNK for c in chunks)
    budget = ReassemblyBudget(LIMIT)
    reassembler = Reassembler(budget)
    results = feed_all(reassembler, chunks)
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == (GROUP, message)
    assert budget.used == 0 and reassembler.in_flight == 0


@given(data=st.binary(max_size=300), chunk_bytes=st.integers(1, 64))
def test_round_trip_for_any_data_and_chunk_size(data: bytes, chunk_bytes: int) -> None:
    message = snapshot_message(data)
    results = feed_all(Reassembler(ReassemblyBudget(LIMIT)), cut(message, chunk_bytes))
    assert results[-1] == (GROUP, message)


def test_the_budget_is_reserved_from_the_first_chunk_until_the_last() -> None:
    budget = ReassemblyBudget(LIMIT)
    reassembler = Reassembler(budget)
    chunks = cut(snapshot_message(data_of(3 * CHUNK)))
    reassembler.feed(chunks[0])
    assert budget.used == 3 * CHUNK and reassembler.reserved == 3 * CHUNK
    feed_all(reassembler, chunks[1:])
    assert budget.used == 0


def test_snapshots_of_two_groups_may_interleave_on_one_stream() -> None:
    a, b = snapshot_message(data_of(40)), snapshot_message(data_of(50), index=9)
    chunks_a, chunks_b = cut(a, group=1), cut(b, group=2)
    reassembler = Reassembler(ReassemblyBudget(LIMIT))
    done = []
    for i in range(max(len(chunks_a), len(chunks_b))):
        for chunks in (chunks_a, chunks_b):
            if i < len(chunks):
                done.append(reassembler.feed(chunks[i]))
    assert [d for d in done if d is not None] == [(1, a), (2, b)]


def corrupt_checksum(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks[-1].checksum ^= 1


def flip_a_byte(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks[1].data = b"\xff" + chunks[1].data[1:]


def drop_a_chunk(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    del chunks[1]


def repeat_a_chunk(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks.insert(2, chunks[1])


def declare_less(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks[0].total_size -= 1


def declare_more(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks[0].total_size += 1


def declare_above_the_limit(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks[0].total_size = LIMIT + 1


def first_chunk_not_at_zero(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks[0].offset = 1


def no_first_chunk(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    del chunks[0]


def header_is_not_a_snapshot(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    append = Message(MessageType.APPEND, to=2, frm=1, term=2)
    chunks[0].header.CopyFrom(encode_message(append))


def header_carries_data(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks[0].header.snapshot.data = b"x"


def second_snapshot_starts(chunks: list[raft_pb2.SnapshotChunk]) -> None:
    chunks.insert(2, cut(snapshot_message(data_of(10), index=8))[0])


BREAKAGES = {
    "bad checksum": (corrupt_checksum, "checksum"),
    "corrupted data": (flip_a_byte, "checksum"),
    "gap": (drop_a_chunk, "expected"),
    "overlap": (repeat_a_chunk, "expected"),
    "more than declared": (declare_less, "more than the declared"),
    "less than declared": (declare_more, "ended at"),
    "declared above the limit": (declare_above_the_limit, "above the 1000-byte limit"),
    "first chunk not at 0": (first_chunk_not_at_zero, "first chunk at offset 1"),
    "no first chunk": (no_first_chunk, "without a first chunk"),
    "header not a snapshot": (header_is_not_a_snapshot, "not a SNAPSHOT"),
    "header with data": (header_carries_data, "without its data"),
    "second snapshot interleaved": (second_snapshot_starts, "a second snapshot began"),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_a_broken_sequence_discards_the_snapshot_once_and_the_next_one_arrives(
    name: str,
) -> None:
    breakage, reason = BREAKAGES[name]
    chunks = cut(snapshot_message(data_of(4 * CHUNK)))
    breakage(chunks)
    budget = ReassemblyBudget(LIMIT)
    reassembler = Reassembler(budget)
    discarded: list[SnapshotDiscarded] = []
    for chunk in chunks:
        try:
            assert reassembler.feed(chunk) is None, "a broken snapshot must never be delivered"
        except SnapshotDiscarded as exc:
            discarded.append(exc)
    assert len(discarded) == 1, [str(d) for d in discarded]
    assert reason in discarded[0].reason and discarded[0].group == GROUP
    assert budget.used == 0 and reassembler.in_flight == 0
    fresh = snapshot_message(data_of(2 * CHUNK + 3), index=11)
    assert feed_all(reassembler, cut(fresh))[-1] == (GROUP, fresh)


def test_a_peer_cannot_hold_more_than_its_budget_across_groups_and_streams() -> None:
    budget = ReassemblyBudget(100)
    one, other = Reassembler(budget), Reassembler(budget)  # two streams of one peer
    big = cut(snapshot_message(data_of(70)), group=1)
    one.feed(big[0])
    with pytest.raises(SnapshotDiscarded, match="no room for 40 bytes: 70 of 100"):
        other.feed(cut(snapshot_message(data_of(40)), group=2)[0])
    assert budget.used == 70
    assert feed_all(one, big[1:])[-1] is not None
    assert budget.used == 0
    assert feed_all(other, cut(snapshot_message(data_of(40)), group=2))[-1] is not None


def test_a_stream_that_ends_discards_what_it_was_reassembling() -> None:
    budget = ReassemblyBudget(LIMIT)
    reassembler = Reassembler(budget)
    reassembler.feed(cut(snapshot_message(data_of(40)), group=1)[0])
    reassembler.feed(cut(snapshot_message(data_of(40)), group=2)[0])
    assert budget.used == 80
    assert reassembler.discard_all() == 2
    assert budget.used == 0 and reassembler.in_flight == 0
    assert reassembler.discard_all() == 0


def test_only_a_message_with_a_snapshot_is_cut() -> None:
    with pytest.raises(CodecError, match="without a snapshot"):
        OutgoingSnapshot(GROUP, Message(MessageType.APPEND, to=2, frm=1, term=2))
    with pytest.raises(ValueError, match="positive"):
        OutgoingSnapshot(GROUP, snapshot_message(b""), 0)
    outgoing = OutgoingSnapshot(GROUP, snapshot_message(b""))
    outgoing.next_chunk()
    with pytest.raises(RuntimeError, match="whole already"):
        outgoing.next_chunk()


@st.composite
def mangled(draw: st.DrawFn) -> list[raft_pb2.SnapshotChunk]:
    """A valid chunk sequence, then a few random drops, repeats, swaps and tamperings."""
    chunks = cut(snapshot_message(data_of(draw(st.integers(0, 6 * CHUNK)))))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(chunks) - 1))
        action = draw(
            st.sampled_from(["drop", "repeat", "swap", "offset", "size", "data", "resize", "last"])
        )
        chunk = raft_pb2.SnapshotChunk()
        chunk.CopyFrom(chunks[i])
        if action == "drop" and len(chunks) > 1:
            del chunks[i]
            continue
        if action == "repeat":
            chunks.insert(i, chunk)
            continue
        if action == "swap":
            j = draw(st.integers(0, len(chunks) - 1))
            chunks[i], chunks[j] = chunks[j], chunks[i]
            continue
        if action == "offset":
            chunk.offset = draw(st.integers(0, 2**64 - 1))
        elif action == "size":
            chunk.total_size = draw(st.integers(0, 2**64 - 1))
        elif action == "data":  # same length: only the checksum can tell
            chunk.data = draw(st.binary(min_size=len(chunk.data), max_size=len(chunk.data)))
        elif action == "resize":
            chunk.data = draw(st.binary(max_size=2 * CHUNK))
        else:
            chunk.last = not chunk.last
        chunks[i] = chunk
    return chunks


@given(mangled())
def test_any_sequence_delivers_the_snapshot_or_nothing_and_stays_in_its_budget(
    chunks: list[raft_pb2.SnapshotChunk],
) -> None:
    meta = snapshot_message(b"").snapshot
    budget = ReassemblyBudget(LIMIT)
    reassembler = Reassembler(budget)
    for chunk in chunks:
        try:
            done = reassembler.feed(chunk)
        except SnapshotDiscarded:
            done = None
        if done is not None:
            group, message = done
            assert group == GROUP and message.snapshot is not None
            assert message.snapshot.data == data_of(len(message.snapshot.data))
            assert meta is not None and message.snapshot.meta == meta.meta
        assert budget.used == reassembler.reserved <= LIMIT
    reassembler.discard_all()
    assert budget.used == 0
