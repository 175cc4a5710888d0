"""The SDK's error hierarchy.

Every error carries two flags that the retry loop reads instead of matching
types (the aiokafka habit): ``retriable`` (trying again may succeed) and
``invalid_metadata`` (the cluster map is stale; refresh before retrying).
"""

from __future__ import annotations

import grpc

from kv_common.wire import STALE_MAP_PREFIX


class KvError(Exception):
    """Base class of every error the SDK raises."""

    retriable = False
    invalid_metadata = False

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidArgumentError(KvError):
    """The request is malformed: empty or oversized key, bad field."""


class TooLargeError(KvError):
    """A value or a request is over a configured limit."""


class UnavailableError(KvError):
    """The node that owns the key could not be reached, or is overloaded."""

    retriable = True


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


def error_from_rpc(error: grpc.RpcError) -> KvError:
    """Map a gRPC failure to the SDK's hierarchy, keeping the server's message."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    return error_from_status(code, details)


def error_from_status(code: grpc.StatusCode, details: str) -> KvError:
    cls: type[KvError]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        cls = InvalidArgumentError
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        too_large = "limit" in details or "larger than" in details
        cls = TooLargeError if too_large else UnavailableError
    elif code == grpc.StatusCode.UNAVAILABLE:
        cls = UnavailableError
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        cls = DeadlineExceededError
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        cls = StaleMapError if details.startswith(STALE_MAP_PREFIX) else FailedPreconditionError
    elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        cls = AccessDeniedError
    else:
        cls = InternalError
    return cls(details, code=code)


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
    details: str = error.details() or ""
    return code == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details or "Connection refused" in details
    )
