"""etcd v3's KV messages in protobuf wire format, written and read by hand.

The bench drives etcd over gRPC with generic calls (``channel.unary_unary`` on bytes) instead
of generated etcd stubs: it needs three requests and two fields of the answers, and pulling in
etcd's protos (with gogoproto options and googleapis imports) would be a codegen step for
them. The field numbers are etcd's ``etcdserverpb`` (rpc.proto, API v3):

* ``PutRequest``   key = 1, value = 2
* ``RangeRequest`` key = 1 (serializable = 7 left unset: the read is linearizable)
* ``TxnRequest``   compare = 1, success = 2, failure = 3; ``RequestOp`` request_range = 1,
  request_put = 2. With no compares the success branch runs.
* answers: ``ResponseHeader`` header = 1 {cluster_id = 1, member_id = 2}; ``RangeResponse``
  kvs = 2 {``KeyValue`` value = 5}; ``StatusResponse`` (Maintenance/Status, an empty
  ``StatusRequest``) leader = 4.

Encoding follows proto3's canonical form (empty scalar fields are left out, fields in number
order), so the bytes equal what protobuf's own encoder writes; the tests compare them.
"""

from __future__ import annotations

from collections.abc import Sequence

from kv_tools.bench.workload import PUT, Op

LENGTH_DELIMITED = 2
VARINT = 0
FIXED64 = 1
FIXED32 = 5

PUT_KEY, PUT_VALUE = 1, 2
RANGE_KEY = 1
TXN_SUCCESS = 2
OP_RANGE, OP_PUT = 1, 2
HEADER = 1
HEADER_MEMBER_ID = 2
RANGE_KVS = 2
KEYVALUE_VALUE = 5
STATUS_LEADER = 4
STATUS_REQUEST = b""


class WireError(ValueError):
    """Bytes that are not the protobuf message they were read as."""


def varint(value: int) -> bytes:
    """A non-negative integer as a base-128 varint, low groups first."""
    if value < 0:
        raise WireError(f"varint of a negative number: {value}")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def message_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field that is always written (an embedded message, even empty)."""
    return varint(number << 3 | LENGTH_DELIMITED) + varint(len(payload)) + payload


def bytes_field(number: int, payload: bytes) -> bytes:
    """A proto3 ``bytes`` field: left out when empty, as protobuf's encoder does."""
    return message_field(number, payload) if payload else b""


def parse_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The top-level fields of a message as (number, value) pairs, in wire order."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0

    def read_varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data):
                raise WireError("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def take(length: int) -> bytes:
        nonlocal pos
        if pos + length > len(data):
            raise WireError(f"field of {length} bytes runs past the end")
        chunk = data[pos : pos + length]
        pos += length
        return chunk

    while pos < len(data):
        tag = read_varint()
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            fields.append((number, read_varint()))
        elif wire == LENGTH_DELIMITED:
            fields.append((number, take(read_varint())))
        elif wire == FIXED64:
            fields.append((number, int.from_bytes(take(8), "little")))
        elif wire == FIXED32:
            fields.append((number, int.from_bytes(take(4), "little")))
        else:
            raise WireError(f"unsupported protobuf wire type {wire}")
    return fields


def put_request(key: bytes, value: bytes) -> bytes:
    """``PutRequest{key, value}``."""
    return bytes_field(PUT_KEY, key) + bytes_field(PUT_VALUE, value)


def range_request(key: bytes) -> bytes:
    """``RangeRequest{key}``: one key, linearizable (etcd's default)."""
    return bytes_field(RANGE_KEY, key)


def txn_request(ops: Sequence[Op]) -> bytes:
    """``TxnRequest{success: [RequestOp{request_put | request_range}, ...]}``, no compares."""
    parts = []
    for op in ops:
        if op.kind == PUT:
            request_op = message_field(OP_PUT, put_request(op.key, op.value))
        else:
            request_op = message_field(OP_RANGE, range_request(op.key))
        parts.append(message_field(TXN_SUCCESS, request_op))
    return b"".join(parts)


def range_value(response: bytes) -> bytes | None:
    """The value of a ``RangeResponse``'s first KeyValue, or None when no key matched."""
    for number, field in parse_fields(response):
        if number == RANGE_KVS and isinstance(field, bytes):
            for inner, value in parse_fields(field):
                if inner == KEYVALUE_VALUE and isinstance(value, bytes):
                    return value
            return b""
    return None


def member_id(response: bytes) -> int:
    """The id of the member that answered (any etcd KV response's header), 0 if absent."""
    for number, field in parse_fields(response):
        if number == HEADER and isinstance(field, bytes):
            for inner, value in parse_fields(field):
                if inner == HEADER_MEMBER_ID and isinstance(value, int):
                    return value
    return 0


def status_leader(response: bytes) -> int:
    """The member id of the leader a ``StatusResponse`` names, 0 if it names none."""
    for number, field in parse_fields(response):
        if number == STATUS_LEADER and isinstance(field, int):
            return field
    return 0
