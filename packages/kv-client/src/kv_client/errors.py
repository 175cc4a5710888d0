"""The SDK's error hierarchy, and how a node's refusal becomes one of its classes.

Every error carries two flags that the retry loop reads instead of matching
types (the aiokafka habit): ``retriable`` (trying again may succeed) and
``invalid_metadata`` (the cluster map is stale; refresh before retrying).

A refusal is classified by its ``google.rpc.ErrorInfo`` reason (the contract in
``kv_common.wire`` and ``proto/kv/v1/kv.proto``); without a reason we know, by
its status code alone. The message is for people and is never read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from kv_common.wire import (
    NEVER_RAN,
    RETRY_AFTER_MS,
    ErrorInfo,
    Reason,
    connect_failed,
    decode_status_details,
)

LIMIT_METADATA = "limit"
"""ErrorInfo.metadata field with the limit a TOO_LARGE refusal was measured against."""


class KvError(Exception):
    """Base class of every error the SDK raises.

    ``reason`` and ``metadata`` are the node's machine-readable ErrorInfo (None and
    empty when the failure carried none: a client-side check, or gRPC itself).
    """

    retriable = False
    invalid_metadata = False
    never_ran = False
    """True when the call certainly did not run: the node refused it before running it (by
    its reason, or its ``never_ran`` metadata), or no attempt of it ever left this client."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: Mapping[str, str] = dict(metadata or {})
        if self.metadata.get(NEVER_RAN) == "true":
            self.never_ran = True

    def relocated(self, where: str) -> None:
        """Prefix the message with where the failed call went."""
        self.message = f"{where}: {self.message}"
        self.args = (self.message,)


class InvalidArgumentError(KvError):
    """The request is malformed: empty or oversized key, bad field."""


class TooLargeError(KvError):
    """A value or a request is over a configured limit (``limit`` when the node said)."""

    @property
    def limit(self) -> int | None:
        """The limit the node measured against, from the refusal's metadata."""
        raw = self.metadata.get(LIMIT_METADATA)
        return int(raw) if raw is not None and raw.isdigit() else None


class UnavailableError(KvError):
    """The node that owns the key could not be reached, or is shutting down."""

    retriable = True


class OverloadedError(UnavailableError):
    """The node refused the call before running it: too much work in flight.

    Because the call provably did not run, even an unconditional write may be
    resent; the retry waits at least the node's hint (``retry_after``).
    """

    never_ran = True

    @property
    def retry_after(self) -> float | None:
        """Seconds the node asked callers to wait, from the refusal's metadata."""
        raw = self.metadata.get(RETRY_AFTER_MS)
        return int(raw) / 1000 if raw is not None and raw.isdigit() else None


class ShuttingDownError(UnavailableError):
    """The node is stopping and refused the call before running it (another replica or
    the node's successor takes it), so even an unconditional write may be resent."""

    never_ran = True


class NotLeaderError(UnavailableError):
    """The node does not lead the key's partition (or it has no leader yet, during an
    election): the operation did not run, so even a write may be resent.

    ``leader_id`` names the leader the node knew of, when it knew one."""

    never_ran = True

    @property
    def leader_id(self) -> str | None:
        return self.metadata.get("leader_id")


class DeadlineExceededError(KvError):
    """The call's deadline passed before an answer came. The outcome is unknown."""


class StaleMapError(KvError):
    """The node contacted does not own the key: the client's cluster map is out of date."""

    retriable = True
    invalid_metadata = True


class FailedPreconditionError(KvError):
    """The node refused the request in its current state."""


class AccessDeniedError(KvError):
    """Authentication failed or the caller may not do this."""


class InternalError(KvError):
    """The node failed in an unexpected way; see its log."""


BY_REASON: Mapping[str, type[KvError]] = {
    Reason.STALE_MAP: StaleMapError,
    Reason.NOT_OWNER: StaleMapError,
    Reason.KEY_EMPTY: InvalidArgumentError,
    Reason.KEY_TOO_LARGE: InvalidArgumentError,
    Reason.INVALID_REQUEST: InvalidArgumentError,
    Reason.VALUE_TOO_LARGE: TooLargeError,
    Reason.BATCH_TOO_LARGE: TooLargeError,
    Reason.OWNER_UNAVAILABLE: UnavailableError,
    Reason.SHUTTING_DOWN: ShuttingDownError,
    Reason.OVERLOADED: OverloadedError,
    Reason.NOT_LEADER: NotLeaderError,
}
"""The class of a refusal whose reason we know; it decides before the status code."""

BY_CODE: Mapping[grpc.StatusCode, type[KvError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    # A kv reason this SDK does not know yet: a refusal of load, not of size (sizes are known).
    grpc.StatusCode.RESOURCE_EXHAUSTED: UnavailableError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: AccessDeniedError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
}
"""The class of a failure whose reason we do not know; any other code is an InternalError."""

WITHOUT_REASON: Mapping[grpc.StatusCode, type[KvError]] = {
    # gRPC's own refusal of a message over its size limit carries no ErrorInfo.
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLargeError,
}
"""Where a failure with no reason at all differs from one with an unknown reason."""


def error_from_status(
    code: grpc.StatusCode, message: str, info: ErrorInfo | None = None
) -> KvError:
    """The SDK error for a status code and its ErrorInfo (the message is only carried)."""
    reason = info.reason if info is not None and info.reason else None
    if reason is None:
        cls = WITHOUT_REASON.get(code) or BY_CODE.get(code, InternalError)
    else:
        cls = BY_REASON.get(reason) or BY_CODE.get(code, InternalError)
    return cls(
        message or code.name,
        code=code,
        reason=reason,
        metadata=info.metadata if info is not None else None,
    )


def details_of(error: grpc.RpcError) -> ErrorInfo | None:
    """The kv ErrorInfo in a failed call's trailers (sync and aio errors alike)."""
    raw: Any = error.trailing_metadata()  # the stubs of the two flavours disagree
    trailers: list[tuple[str, str | bytes]] = [(str(k), v) for k, v in raw or ()]
    return decode_status_details(trailers)


def error_from_rpc(error: grpc.RpcError) -> KvError:
    """Map a failed gRPC call to the SDK's hierarchy by its code and status details."""
    code: grpc.StatusCode = error.code()
    return error_from_status(code, error.details() or "", details_of(error))


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_from_number(number: int) -> grpc.StatusCode:
    """The status code with this wire number (UNKNOWN for a number gRPC does not define)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def never_sent(error: grpc.RpcError) -> bool:
    """True when gRPC reports that no connection could be made.

    Only then is it certain that a request never reached a server, which is what
    makes retrying an unconditional write safe (the rule etcd's client uses).
    """
    code: grpc.StatusCode = error.code()
    if code != grpc.StatusCode.UNAVAILABLE or details_of(error):
        return False  # a refusal with our ErrorInfo came from a node: a connection was made
    return connect_failed(error.details() or "")
