"""Protobuf wire bytes written by hand, so that tests can send what no generated class would:
wrong wire types, unknown fields, lengths that lie, nesting bombs."""

from __future__ import annotations

VARINT, FIXED64, LENGTH, GROUP_START, GROUP_END, FIXED32 = 0, 1, 2, 3, 4, 5

MAX_VARINT_BYTES = 10
"""A varint longer than this is malformed: 64 bits need at most ten 7-bit groups."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint(field_number << 3 | wire_type)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return tag(field_number, LENGTH) + varint(len(payload)) + payload


def declared_length(field_number: int, length: int, payload: bytes) -> bytes:
    """A length-delimited field whose length prefix says ``length`` but carries ``payload``."""
    return tag(field_number, LENGTH) + varint(length) + payload


def nested_groups(field_number: int, depth: int) -> bytes:
    """``depth`` unknown groups, each inside the last: a parser that recurses runs out of stack
    unless it has a depth limit."""
    return tag(field_number, GROUP_START) * depth + tag(field_number, GROUP_END) * depth
