"""Tests for kv_node.replication.codec: lossless for every valid value, CodecError for the rest."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kv.raft.v1 import raft_pb2
from kv_node.replication.codec import (
    CodecError,
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
    parse_request,
)
from kv_raft import ConfState, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMeta

U64 = st.integers(0, 2**64 - 1)
NODE_IDS = st.integers(1, 2**64 - 1)

entries = st.builds(
    Entry, term=U64, index=U64, type=st.sampled_from(EntryType), data=st.binary(max_size=32)
)


@st.composite
def conf_states(draw: st.DrawFn) -> ConfState:
    members = draw(st.lists(NODE_IDS, max_size=6, unique=True))
    split = draw(st.integers(0, len(members)))
    return ConfState(voters=frozenset(members[:split]), learners=frozenset(members[split:]))


snapshots = st.builds(
    Snapshot,
    meta=st.builds(SnapshotMeta, index=U64, term=U64, conf_state=conf_states()),
    data=st.binary(max_size=64),
)

messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=NODE_IDS,
    frm=NODE_IDS,
    term=U64,
    log_term=U64,
    index=U64,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=U64,
    reject=st.booleans(),
    reject_hint=U64,
    snapshot=st.none() | snapshots,
    context=st.binary(max_size=16),
)

batches = st.lists(st.tuples(U64, messages), max_size=5)


def wire(batch: raft_pb2.Batch) -> bytes:
    return raft_pb2.StreamRequest(batch=batch).SerializeToString()


def unwire(data: bytes) -> list[tuple[int, Message]]:
    return decode_batch(parse_request(data).batch)


@given(messages)
def test_message_roundtrip(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


@given(batches)
def test_batch_roundtrip_through_bytes(items: list[tuple[int, Message]]) -> None:
    request = parse_request(wire(encode_batch(items)))
    assert request.WhichOneof("kind") == "batch"
    assert decode_batch(request.batch) == items


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (Message, raft_pb2.Message),
        (Entry, raft_pb2.Entry),
        (ConfState, raft_pb2.ConfState),
        (SnapshotMeta, raft_pb2.SnapshotMeta),
        (Snapshot, raft_pb2.Snapshot),
    ],
)
def test_every_field_has_a_protobuf_twin(ours: type, theirs: type[raft_pb2.Message]) -> None:
    # A field added to kv_raft without one in raft.proto would be dropped on the wire silently.
    assert {f.name for f in dataclasses.fields(ours)} == set(theirs.DESCRIPTOR.fields_by_name)


def valid() -> raft_pb2.Message:
    return encode_message(Message(MessageType.APPEND, to=2, frm=1, term=3))


def with_snapshot(voters: list[int], learners: list[int]) -> raft_pb2.Message:
    message = valid()
    message.snapshot.meta.conf_state.voters.extend(voters)
    message.snapshot.meta.conf_state.learners.extend(learners)
    return message


def hostile_messages() -> dict[str, tuple[raft_pb2.Message, str]]:
    """Each case and the words its refusal must contain (so it fails for the reason meant)."""
    cases: dict[str, tuple[raft_pb2.Message, str]] = {}
    cases["missing type"] = raft_pb2.Message(to=2, frm=1), "message type 0"
    cases["unknown type"] = raft_pb2.Message(type=99, to=2, frm=1), "type 99"  # type: ignore[arg-type]
    cases["to is 0"] = raft_pb2.Message(type=raft_pb2.MESSAGE_TYPE_VOTE, frm=1), "node 0"
    cases["frm is 0"] = raft_pb2.Message(type=raft_pb2.MESSAGE_TYPE_VOTE, to=1), "node 0"
    entry = valid()
    entry.entries.add(term=1, index=2)
    cases["entry type missing"] = entry, "entry type 0"
    unknown_entry = valid()
    unknown_entry.entries.add(term=1, index=2, type=7)
    cases["entry type unknown"] = unknown_entry, "entry type 7"
    no_meta = valid()
    no_meta.snapshot.data = b"x"
    cases["snapshot without meta"] = no_meta, "without meta"
    no_conf = valid()
    no_conf.snapshot.meta.index = 5
    cases["meta without conf state"] = no_conf, "without conf state"
    cases["voter 0"] = with_snapshot([0], []), "voters lists node id 0"
    cases["learner 0"] = with_snapshot([1], [0]), "learners lists node id 0"
    cases["voter twice"] = with_snapshot([1, 1], []), "node 1 twice"
    cases["voter and learner"] = with_snapshot([1, 2], [2]), "both voter and learner"
    return cases


@pytest.mark.parametrize("case", sorted(hostile_messages()))
def test_invalid_message_is_refused(case: str) -> None:
    message, reason = hostile_messages()[case]
    # Still valid on the wire: the receiver parses it, and must then refuse it.
    reparsed = raft_pb2.Message.FromString(message.SerializeToString())
    with pytest.raises(CodecError, match=reason):
        decode_message(reparsed)


def test_batch_item_without_message_is_refused() -> None:
    with pytest.raises(CodecError, match="without a message"):
        decode_batch(raft_pb2.Batch(messages=[raft_pb2.GroupMessage(group_id=3)]))


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x05\x0a\x03\xff\xff\xff",  # a batch whose message bytes are garbage
        b"\x12\x02\x0a\x7f",  # a length beyond the end
        b"\x0a\x02\x08" + b"\xff" * 11,  # a varint longer than 64 bits
        b"\xff\xff\xff\xff\x0f",  # field number 0 / invalid tag
    ],
)
def test_garbage_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        unwire(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        unwire(data)


@given(batches, st.data())
def test_corrupted_frames_raise_only_codec_error(
    items: list[tuple[int, Message]], data: st.DataObject
) -> None:
    encoded = bytearray(wire(encode_batch(items)))
    for _ in range(data.draw(st.integers(1, 4))):
        if not encoded:
            break
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CodecError):
        unwire(bytes(encoded))


@pytest.mark.parametrize(
    "message",
    [
        Message(MessageType.APPEND, to=0, frm=1, term=1),
        Message(MessageType.APPEND, to=2, frm=1, term=-1),
        Message(MessageType.APPEND, to=2, frm=1, term=1, commit=2**64),
        Message(MessageType.APPEND, to=2, frm=1, term=1, entries=(Entry(term=-5, index=1),)),
        Message(
            MessageType.SNAPSHOT,
            to=2,
            frm=1,
            term=1,
            snapshot=Snapshot(SnapshotMeta(5, 1, ConfState(voters=frozenset({0})))),
        ),
    ],
)
def test_unencodable_message_raises_codec_error(message: Message) -> None:
    with pytest.raises(CodecError):
        encode_message(message)


def test_unencodable_group_id_raises_codec_error() -> None:
    with pytest.raises(CodecError):
        encode_batch([(-1, Message(MessageType.APPEND, to=2, frm=1, term=1))])
