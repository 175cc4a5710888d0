"""kv_raft values <-> kv.raft.v1 protobuf, and the one error that bad input can cause.

Everything a peer sends passes through ``decode_*`` before the Raft core sees it, and the core
trusts what it is given: a message with no type, a node id of 0 where a node must be named, or a
snapshot without its membership would break invariants far from here. So decoding checks what
the core relies on and turns every failure, whether the bytes do not parse or they parse into
something the core must not see, into ``CodecError``; the transport catches that one type and
refuses the stream. Encoding applies the same checks, so a bug in our own node shows up at the
sender rather than as a refusal at the receiver.

The enums are mapped by name (``MESSAGE_TYPE_`` + the kv_raft member's name), not by value: the
protobuf enums start with an UNSPECIFIED zero, so their numbers are one off, and a table built by
name fails at import if the two enums ever stop matching.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from google.protobuf.message import DecodeError

from kv.raft.v1 import raft_pb2
from kv_raft import (
    NO_NODE,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

__all__ = [
    "CodecError",
    "decode_batch",
    "decode_message",
    "decode_snapshot_message",
    "encode_batch",
    "encode_message",
    "encode_message_into",
    "encode_snapshot_header",
    "parse_request",
]

Ours = TypeVar("Ours", bound=enum.Enum)
Theirs = TypeVar("Theirs", bound=int)


class CodecError(ValueError):
    """Bytes or a protobuf value that do not describe a valid Raft message (or a value of ours
    that cannot be encoded)."""


def _by_name(ours: type[Ours], prefix: str, theirs: Mapping[str, Theirs]) -> dict[Ours, Theirs]:
    table = {}
    for member in ours:
        name = prefix + member.name
        if name not in theirs:
            raise ImportError(f"kv.raft.v1 has no {name}: regenerate after changing kv_raft")
        table[member] = theirs[name]
    if len(table) != len(theirs) - 1:  # all but UNSPECIFIED
        raise ImportError(f"kv.raft.v1 has {prefix}* values that kv_raft lacks")
    return table


_MESSAGE_TYPE_TO_PB = _by_name(MessageType, "MESSAGE_TYPE_", dict(raft_pb2.MessageType.items()))
_MESSAGE_TYPE_FROM_PB = {value: member for member, value in _MESSAGE_TYPE_TO_PB.items()}
_ENTRY_TYPE_TO_PB = _by_name(EntryType, "ENTRY_TYPE_", dict(raft_pb2.EntryType.items()))
_ENTRY_TYPE_FROM_PB = {value: member for member, value in _ENTRY_TYPE_TO_PB.items()}


def _node_ids(ids: Iterable[int], what: str) -> frozenset[int]:
    seen: set[int] = set()
    for node_id in ids:
        if node_id == NO_NODE:
            raise CodecError(f"{what} lists node id 0")
        if node_id in seen:
            raise CodecError(f"{what} lists node {node_id} twice")
        seen.add(node_id)
    return frozenset(seen)


def _check_conf_state(conf_state: ConfState) -> None:
    if NO_NODE in conf_state.voters or NO_NODE in conf_state.learners:
        raise CodecError("conf state lists node id 0")
    if conf_state.voters & conf_state.learners:
        raise CodecError("conf state lists a node as both voter and learner")


def _encode_snapshot(snapshot: Snapshot) -> raft_pb2.Snapshot:
    conf_state = snapshot.meta.conf_state
    _check_conf_state(conf_state)
    return raft_pb2.Snapshot(
        meta=raft_pb2.SnapshotMeta(
            index=snapshot.meta.index,
            term=snapshot.meta.term,
            conf_state=raft_pb2.ConfState(
                voters=sorted(conf_state.voters), learners=sorted(conf_state.learners)
            ),
        ),
        data=snapshot.data,
    )


def _decode_snapshot(snapshot: raft_pb2.Snapshot) -> Snapshot:
    if not snapshot.HasField("meta"):
        raise CodecError("snapshot without meta")
    meta = snapshot.meta
    if not meta.HasField("conf_state"):
        raise CodecError("snapshot meta without conf state")
    voters = _node_ids(meta.conf_state.voters, "conf state voters")
    learners = _node_ids(meta.conf_state.learners, "conf state learners")
    conf_state = ConfState(voters=voters, learners=learners)
    _check_conf_state(conf_state)
    return Snapshot(SnapshotMeta(meta.index, meta.term, conf_state), snapshot.data)


def encode_message(message: Message) -> raft_pb2.Message:
    """Raises CodecError for a message the receiver would refuse (or numbers outside uint64)."""
    encoded = raft_pb2.Message()
    encode_message_into(encoded, message)
    return encoded


def encode_message_into(encoded: raft_pb2.Message, message: Message) -> None:
    """``encode_message`` into an empty ``encoded`` (an item of a batch being built, so that
    it is not copied there); raises CodecError as it does, leaving ``encoded`` partly set.

    Fields at their default (0, False, empty) are left unset: proto3 does not send them, so
    the bytes are the same, and each field set is a call into protobuf (the per-message cost
    of every Raft message sent)."""
    if message.to == NO_NODE or message.frm == NO_NODE:
        raise CodecError(f"{message.type.name} message names node 0 as sender or receiver")
    try:
        encoded.type = _MESSAGE_TYPE_TO_PB[message.type]
        encoded.to = message.to
        encoded.frm = message.frm
        encoded.term = message.term
        if message.log_term:
            encoded.log_term = message.log_term
        if message.index:
            encoded.index = message.index
        if message.commit:
            encoded.commit = message.commit
        if message.reject:
            encoded.reject = True
        if message.reject_hint:
            encoded.reject_hint = message.reject_hint
        if message.context:
            encoded.context = message.context
        if message.entries:
            add = encoded.entries.add
            for e in message.entries:
                add(term=e.term, index=e.index, type=_ENTRY_TYPE_TO_PB[e.type], data=e.data)
        if message.snapshot is not None:
            encoded.snapshot.CopyFrom(_encode_snapshot(message.snapshot))
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"cannot encode {message.type.name} message: {exc}") from exc


def decode_message(message: raft_pb2.Message) -> Message:
    kind = _MESSAGE_TYPE_FROM_PB.get(message.type)
    if kind is None:
        raise CodecError(f"unknown or missing message type {message.type}")
    to = message.to
    frm = message.frm
    if to == NO_NODE or frm == NO_NODE:
        raise CodecError(f"{kind.name} message names node 0 as sender or receiver")
    entries: tuple[Entry, ...] = ()
    if message.entries:
        decoded = []
        for entry in message.entries:
            entry_type = _ENTRY_TYPE_FROM_PB.get(entry.type)
            if entry_type is None:
                raise CodecError(f"unknown or missing entry type {entry.type}")
            decoded.append(Entry(entry.term, entry.index, entry_type, entry.data))
        entries = tuple(decoded)
    # Positional, in Message's field order: each keyword is a lookup (per message received).
    return Message(
        kind,
        to,
        frm,
        message.term,
        message.log_term,
        message.index,
        entries,
        message.commit,
        message.reject,
        message.reject_hint,
        _decode_snapshot(message.snapshot) if message.HasField("snapshot") else None,
        message.context,
    )


def encode_batch(items: Sequence[tuple[int, Message]]) -> raft_pb2.Batch:
    """One Batch of (group id, message) pairs, in order."""
    try:
        return raft_pb2.Batch(
            messages=[
                raft_pb2.GroupMessage(group_id=group, message=encode_message(message))
                for group, message in items
            ]
        )
    except (ValueError, TypeError) as exc:
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"cannot encode batch: {exc}") from exc


def decode_batch(batch: raft_pb2.Batch) -> list[tuple[int, Message]]:
    items = []
    for item in batch.messages:
        if not item.HasField("message"):
            raise CodecError(f"group {item.group_id}: item without a message")
        items.append((item.group_id, decode_message(item.message)))
    return items


def parse_request(data: bytes) -> raft_pb2.StreamRequest:
    """Parse a StreamRequest from the wire; the transport decodes requests itself (not gRPC) so
    that bytes that do not parse are a CodecError like any other bad input."""
    request = raft_pb2.StreamRequest()
    try:
        request.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CodecError(f"request does not parse: {exc}") from exc
    return request


# ---- snapshots, which travel in chunks (kv_node.replication.chunks) rather than in a Batch


def encode_snapshot_header(message: Message) -> raft_pb2.Message:
    """A SNAPSHOT message as its first chunk carries it: everything but the snapshot's data,
    which follows in chunks. Raises CodecError for anything but a message with a snapshot."""
    if message.snapshot is None:
        raise CodecError(f"a {message.type.name} message without a snapshot is not chunked")
    header = encode_message(message)
    header.snapshot.data = b""
    return header


def decode_snapshot_message(header: raft_pb2.Message, data: bytes) -> Message:
    """The whole message again from its header and the reassembled data; CodecError when the
    header is not a SNAPSHOT message with a snapshot and no data of its own."""
    if header.type != _MESSAGE_TYPE_TO_PB[MessageType.SNAPSHOT]:
        raise CodecError("a snapshot chunk's header is not a SNAPSHOT message")
    if not header.HasField("snapshot") or header.snapshot.data:
        raise CodecError("a snapshot chunk's header must carry a snapshot without its data")
    message = decode_message(header)
    assert message.snapshot is not None  # checked above
    return replace(message, snapshot=replace(message.snapshot, data=data))
