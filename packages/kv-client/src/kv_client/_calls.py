"""One description per operation, shared by the sync and async clients.

A ``Call`` holds the request, the key it routes by, how to decode the answer
into the public types, and how safe it is to retry. Its ``kind`` names both the
RPC and the request's place in a ``Batch`` operation, so a coalesced call needs
nothing else. Adding an operation means a factory here and a method on each client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kv.v1 import kv_pb2
from kv_client.errors import InvalidArgumentError
from kv_client.retry import Safety
from kv_client.types import Versioned, WriteResult
from kv_common.limits import MAX_KEY_BYTES

Out = TypeVar("Out")
Key = str | bytes
Value = str | bytes


def encode(data: Key, what: str = "key") -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    raise InvalidArgumentError(f"{what} must be str or bytes, not {type(data).__name__}")


def encode_key(key: Key) -> bytes:
    raw = encode(key)
    if not raw:
        raise InvalidArgumentError("key must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidArgumentError(f"key is {len(raw)} bytes; the limit is {MAX_KEY_BYTES} bytes")
    return raw


def _check_version(version: int) -> int:
    if not isinstance(version, int) or version < 0:
        raise InvalidArgumentError(f"version must be a non-negative int, got {version!r}")
    return version


@dataclass(frozen=True)
class Call(Generic[Out]):
    kind: str
    """"get", "put" or "delete": the field of kv.v1.Operation and OperationResult."""
    key: bytes
    request: Any
    decode: Callable[[Any], Out]
    safety: Safety

    @property
    def method(self) -> str:
        """The KVService RPC that sends this call alone."""
        return self.kind.capitalize()

    def operation(self) -> kv_pb2.Operation:
        """This call as one operation of a Batch request."""
        return kv_pb2.Operation(**{self.kind: self.request})


def _versioned(response: kv_pb2.GetResponse) -> Versioned | None:
    return Versioned(response.value, response.version) if response.found else None


def _value(response: kv_pb2.GetResponse) -> bytes | None:
    return response.value if response.found else None


def _put_version(response: kv_pb2.PutResponse) -> int:
    return response.version


def _write_result(response: kv_pb2.PutResponse | kv_pb2.DeleteResponse) -> WriteResult:
    return WriteResult(response.succeeded, response.version)


def _deleted(response: kv_pb2.DeleteResponse) -> bool:
    return response.found


def get(key: Key) -> Call[bytes | None]:
    raw = encode_key(key)
    return Call("get", raw, kv_pb2.GetRequest(key=raw), _value, Safety.IDEMPOTENT)


def get_versioned(key: Key) -> Call[Versioned | None]:
    raw = encode_key(key)
    return Call("get", raw, kv_pb2.GetRequest(key=raw), _versioned, Safety.IDEMPOTENT)


def put(key: Key, value: Value) -> Call[int]:
    raw = encode_key(key)
    request = kv_pb2.PutRequest(key=raw, value=encode(value, "value"))
    return Call("put", raw, request, _put_version, Safety.UNCONDITIONAL)


def put_if_version(key: Key, value: Value, version: int) -> Call[WriteResult]:
    raw = encode_key(key)
    request = kv_pb2.PutRequest(
        key=raw, value=encode(value, "value"), if_version=_check_version(version)
    )
    return Call("put", raw, request, _write_result, Safety.CONDITIONAL)


def delete(key: Key) -> Call[bool]:
    raw = encode_key(key)
    return Call("delete", raw, kv_pb2.DeleteRequest(key=raw), _deleted, Safety.UNCONDITIONAL)


def delete_if_version(key: Key, version: int) -> Call[WriteResult]:
    raw = encode_key(key)
    request = kv_pb2.DeleteRequest(key=raw, if_version=_check_version(version))
    return Call("delete", raw, request, _write_result, Safety.CONDITIONAL)
