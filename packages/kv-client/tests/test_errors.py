"""A refusal's ErrorInfo reason, never its message, picks the SDK's error class.

Each row is checked twice: as a failed single call (the reason in the
``grpc-status-details-bin`` trailer) and as one failed operation of a Batch
(the reason in ``OperationError``), since the SDK reads both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import StatusCode as Code

from kv.v1 import kv_pb2
from kv_client import batch
from kv_client.errors import (
    AccessDeniedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KvError,
    NotLeaderError,
    OverloadedError,
    ShuttingDownError,
    StaleMapError,
    TooLargeError,
    UnavailableError,
    error_from_rpc,
    never_sent,
)
from kv_common.wire import (
    NEVER_RAN,
    STATUS_DETAILS_METADATA,
    ErrorInfo,
    Reason,
    encode_status,
)

Trailers = tuple[tuple[str, str | bytes], ...]


class FakeRpcError(grpc.RpcError):
    """What gRPC raises for a failed call: a code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Trailers = ()) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailers = trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:  # the stubs type it as gRPC's private class
        return self._trailers


def trailers(code: grpc.StatusCode, message: str, info: ErrorInfo | None) -> Trailers:
    if info is None:
        return ()
    status = encode_status(code.value[0], message, info)
    return ((STATUS_DETAILS_METADATA, status.SerializeToString()),)


def from_call(code: grpc.StatusCode, message: str, info: ErrorInfo | None) -> KvError:
    return error_from_rpc(FakeRpcError(code, message, trailers(code, message, info)))


def from_batch(code: grpc.StatusCode, message: str, info: ErrorInfo | None) -> KvError:
    error = kv_pb2.OperationError(code=code.value[0], message=message)
    if info is not None:
        error.reason = info.reason
        error.metadata.update(info.metadata)
    result = batch.result_error(kv_pb2.OperationResult(error=error))
    assert result is not None
    return result


LIMIT = {"limit": "1024", "size": "2000"}

# code, reason (None: no ErrorInfo), metadata, message, class, retriable, invalid_metadata
ROWS: list[
    tuple[grpc.StatusCode, str | None, Mapping[str, str], str, type[KvError], bool, bool]
] = [
    # Known reasons decide, whatever the message says.
    (
        Code.FAILED_PRECONDITION,
        Reason.STALE_MAP,
        {"epoch": "3"},
        "moved",
        StaleMapError,
        True,
        True,
    ),
    (Code.FAILED_PRECONDITION, Reason.NOT_OWNER, {"owner_id": "b"}, "", StaleMapError, True, True),
    (Code.INVALID_ARGUMENT, Reason.KEY_EMPTY, {}, "the limit", InvalidArgumentError, False, False),
    (Code.INVALID_ARGUMENT, Reason.KEY_TOO_LARGE, LIMIT, "big", InvalidArgumentError, False, False),
    (Code.INVALID_ARGUMENT, Reason.INVALID_REQUEST, {}, "bad", InvalidArgumentError, False, False),
    (Code.RESOURCE_EXHAUSTED, Reason.VALUE_TOO_LARGE, LIMIT, "x", TooLargeError, False, False),
    (Code.RESOURCE_EXHAUSTED, Reason.BATCH_TOO_LARGE, LIMIT, "x", TooLargeError, False, False),
    (Code.UNAVAILABLE, Reason.OWNER_UNAVAILABLE, {}, "larger than", UnavailableError, True, False),
    (Code.UNAVAILABLE, Reason.SHUTTING_DOWN, {}, "draining", ShuttingDownError, True, False),
    # No reason: the status code alone; text that once meant something means nothing now.
    (
        Code.RESOURCE_EXHAUSTED,
        None,
        {},
        "Sent message larger than max",
        TooLargeError,
        False,
        False,
    ),
    (Code.RESOURCE_EXHAUSTED, None, {}, "server overloaded", TooLargeError, False, False),
    (
        Code.FAILED_PRECONDITION,
        None,
        {},
        "stale cluster map: node 'a' does not own partition 3",
        FailedPreconditionError,
        False,
        False,
    ),
    (Code.UNAVAILABLE, None, {}, "the limit is 8 bytes", UnavailableError, True, False),
    (Code.INVALID_ARGUMENT, None, {}, "", InvalidArgumentError, False, False),
    (Code.DEADLINE_EXCEEDED, None, {}, "late", DeadlineExceededError, False, False),
    (Code.UNAUTHENTICATED, None, {}, "who", AccessDeniedError, False, False),
    (Code.PERMISSION_DENIED, None, {}, "no", AccessDeniedError, False, False),
    (Code.UNKNOWN, None, {}, "boom", InternalError, False, False),
    (Code.INTERNAL, None, {}, "boom", InternalError, False, False),
    (Code.RESOURCE_EXHAUSTED, Reason.OVERLOADED, {}, "limit", OverloadedError, True, False),
    # A reason this SDK does not know: the status code alone, again.
    (Code.RESOURCE_EXHAUSTED, "QUOTA_NEW", {}, "limit", UnavailableError, True, False),
    (Code.FAILED_PRECONDITION, "NOT_READY_YET", {}, "", FailedPreconditionError, False, False),
    # The partition's leader is elsewhere or unknown: retriable, and it never ran.
    (Code.UNAVAILABLE, Reason.NOT_LEADER, {"leader_id": "n2"}, "", NotLeaderError, True, False),
    (Code.UNAVAILABLE, "SOMETHING_NEW", {}, "", UnavailableError, True, False),
]


@pytest.mark.parametrize("decode", [from_call, from_batch], ids=["call", "batch"])
@pytest.mark.parametrize(
    ("code", "reason", "metadata", "message", "kind", "retriable", "stale"), ROWS
)
def test_reason_then_code_picks_the_class(
    decode: object,
    code: grpc.StatusCode,
    reason: str | None,
    metadata: Mapping[str, str],
    message: str,
    kind: type[KvError],
    retriable: bool,
    stale: bool,
) -> None:
    assert decode in (from_call, from_batch)
    info = None if reason is None else ErrorInfo(reason, metadata)
    error = (
        from_call(code, message, info) if decode is from_call else from_batch(code, message, info)
    )
    assert type(error) is kind
    assert (error.retriable, error.invalid_metadata) == (retriable, stale)
    assert error.code == code
    assert error.reason == reason
    assert dict(error.metadata) == dict(metadata)
    assert error.message == (message or code.name)


@pytest.mark.parametrize("decode", [from_call, from_batch], ids=["call", "batch"])
def test_never_ran_by_reason_or_by_the_nodes_never_ran_mark(decode: object) -> None:
    """A stopping node's refusal, and a forward that could not even connect (the node says
    so in ``never_ran``), never ran: the retry rules may resend an unconditional write."""
    assert decode in (from_call, from_batch)
    build = from_call if decode is from_call else from_batch
    assert build(Code.UNAVAILABLE, "draining", ErrorInfo(Reason.SHUTTING_DOWN, {})).never_ran
    unreached = ErrorInfo(Reason.OWNER_UNAVAILABLE, {"owner_id": "b", NEVER_RAN: "true"})
    assert build(Code.UNAVAILABLE, "owner down", unreached).never_ran
    maybe = ErrorInfo(Reason.OWNER_UNAVAILABLE, {"owner_id": "b"})
    assert not build(Code.UNAVAILABLE, "owner did not answer", maybe).never_ran
    assert not build(
        Code.UNAVAILABLE, "x", ErrorInfo(Reason.OWNER_UNAVAILABLE, {NEVER_RAN: "no"})
    ).never_ran


def test_too_large_exposes_the_limit_from_metadata() -> None:
    error = from_call(
        Code.RESOURCE_EXHAUSTED, "no", ErrorInfo(Reason.VALUE_TOO_LARGE, {"limit": "1024"})
    )
    assert isinstance(error, TooLargeError) and error.limit == 1024
    grpc_own = from_call(Code.RESOURCE_EXHAUSTED, "Received message larger than max", None)
    assert isinstance(grpc_own, TooLargeError) and grpc_own.limit is None
    garbled = from_batch(
        Code.RESOURCE_EXHAUSTED, "", ErrorInfo(Reason.BATCH_TOO_LARGE, {"limit": "many"})
    )
    assert isinstance(garbled, TooLargeError) and garbled.limit is None


def test_an_error_info_of_another_domain_is_not_ours() -> None:
    detail = error_details_pb2.ErrorInfo(reason=Reason.STALE_MAP, domain="proxy.example")
    status = status_pb2.Status(code=Code.FAILED_PRECONDITION.value[0], message="m")
    status.details.add().Pack(detail)
    raw = ((STATUS_DETAILS_METADATA, status.SerializeToString()),)
    error = error_from_rpc(FakeRpcError(Code.FAILED_PRECONDITION, "m", raw))
    assert type(error) is FailedPreconditionError and error.reason is None


def test_unreadable_details_fall_back_on_the_code() -> None:
    raw = ((STATUS_DETAILS_METADATA, b"\xff\xff not a status"),)
    error = error_from_rpc(FakeRpcError(Code.FAILED_PRECONDITION, "stale cluster map", raw))
    assert type(error) is FailedPreconditionError


@pytest.mark.parametrize(
    ("code", "details", "info", "expected"),
    [
        (Code.UNAVAILABLE, "failed to connect to all addresses", None, True),
        (Code.UNAVAILABLE, "ipv4:127.0.0.1:1: Connection refused", None, True),
        (Code.UNAVAILABLE, "Socket closed", None, False),
        (Code.UNAVAILABLE, "Connection reset by peer", None, False),
        (Code.DEADLINE_EXCEEDED, "failed to connect", None, False),
        # A node's refusal proves a connection, whatever text it quotes from its own peer call.
        (
            Code.UNAVAILABLE,
            "owner 'b' is unreachable: failed to connect to all addresses",
            ErrorInfo(Reason.OWNER_UNAVAILABLE, {"owner_id": "b"}),
            False,
        ),
    ],
)
def test_never_sent_only_when_grpc_could_not_connect(
    code: grpc.StatusCode, details: str, info: ErrorInfo | None, expected: bool
) -> None:
    assert never_sent(FakeRpcError(code, details, trailers(code, details, info))) is expected
