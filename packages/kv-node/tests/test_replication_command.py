"""The log entry encoding: exact roundtrips, and hostile bytes fail only as CommandError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kv_common.limits import MAX_KEY_BYTES
from kv_node.replication.command import (
    FORMAT_VERSION,
    Command,
    CommandError,
    decode_command,
    encode_command,
)
from kv_node.store import DeleteOp, GetOp, Op, PutOp

keys = st.binary(min_size=1, max_size=64) | st.binary(
    min_size=MAX_KEY_BYTES - 2, max_size=MAX_KEY_BYTES
)
versions = st.none() | st.integers(min_value=0, max_value=2**64 - 1)
ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(PutOp, keys, st.binary(max_size=256), versions),
    st.builds(DeleteOp, keys, versions),
    st.builds(GetOp, keys),
)
commands = st.builds(
    Command, st.lists(ops, max_size=8).map(tuple), st.none() | st.binary(max_size=32)
)


@given(commands)
def test_every_command_roundtrips_exactly(command: Command) -> None:
    assert decode_command(encode_command(command.ops, command.request_id)) == command


@given(st.binary(max_size=512))
def test_hostile_bytes_fail_only_as_command_error(data: bytes) -> None:
    try:
        decoded = decode_command(data)
    except CommandError:
        return
    assert encode_command(decoded.ops, decoded.request_id) == data


@given(commands, st.data())
def test_any_truncation_or_trailing_byte_is_refused(command: Command, data: st.DataObject) -> None:
    encoded = encode_command(command.ops, command.request_id)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(CommandError):
        decode_command(encoded[:cut])
    with pytest.raises(CommandError, match="after the last op"):
        decode_command(encoded + b"\x00")


@given(commands, st.data())
def test_flipped_bytes_fail_only_as_command_error(command: Command, data: st.DataObject) -> None:
    encoded = bytearray(encode_command(command.ops, command.request_id))
    position = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        decoded = decode_command(bytes(encoded))
    except CommandError:
        return
    assert encode_command(decoded.ops, decoded.request_id) == bytes(encoded)


def test_the_layout_is_fixed() -> None:
    """Replicas of different builds must agree byte for byte; a change here needs a new version."""
    encoded = encode_command([PutOp(b"k", b"v", 7), DeleteOp(b"d"), GetOp(b"g")], request_id=b"r1")
    assert encoded.hex() == (
        "0101000272310000000381000000000000000700016b00000001760200016403000167"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (bytes([FORMAT_VERSION + 1, 0]) + b"\x00" * 4, "format 2"),
        (bytes([FORMAT_VERSION, 0x02]) + b"\x00" * 4, "unknown command flags"),
        (bytes([FORMAT_VERSION, 0]) + b"\x00\x00\x00\x01" + b"\x04\x00\x01k", "unknown op tag"),
        (bytes([FORMAT_VERSION, 0]) + b"\x00\x00\x00\x01" + b"\x83\x00\x01k", "unknown op tag"),
        (bytes([FORMAT_VERSION, 0]) + b"\x00\x00\x00\x01" + b"\x03\x00\x00abcd", "key of 0 bytes"),
        (bytes([FORMAT_VERSION, 0]) + b"\xff\xff\xff\xff" + b"\x03\x00\x01k", "ops cannot fit"),
        (
            bytes([FORMAT_VERSION, 0]) + b"\x00\x00\x00\x01" + b"\x01\x00\x01k\xff\xff\xff\xff",
            "truncated",
        ),
        (bytes([FORMAT_VERSION, 1]) + b"\xff\xff", "truncated"),
    ],
)
def test_malformed_commands_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        decode_command(data)


def test_a_long_key_decodes_but_an_oversized_one_does_not() -> None:
    longest = b"k" * MAX_KEY_BYTES
    assert decode_command(encode_command([GetOp(longest)])).ops == (GetOp(longest),)
    with pytest.raises(CommandError, match=f"key of {MAX_KEY_BYTES + 1} bytes"):
        encode_command([GetOp(longest + b"k")])
    raw = bytearray(encode_command([GetOp(longest)]))
    raw[7:9] = (MAX_KEY_BYTES + 1).to_bytes(2, "big")
    with pytest.raises(CommandError, match=f"key of {MAX_KEY_BYTES + 1} bytes"):
        decode_command(bytes(raw) + b"k")


def test_unencodable_commands_are_refused_before_they_reach_the_log() -> None:
    with pytest.raises(CommandError, match="out of range"):
        encode_command([PutOp(b"k", b"v", -1)])
    with pytest.raises(CommandError, match="request id"):
        encode_command([], request_id=b"r" * 70_000)
