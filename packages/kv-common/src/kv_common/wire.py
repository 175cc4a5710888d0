"""Wire conventions beyond the schema: metadata keys and the error model node and SDK share.

A node's refusal is a gRPC status carrying a ``google.rpc.Status`` detail with one
``google.rpc.ErrorInfo`` (AIP-193): a stable ``reason`` and string ``metadata``. Clients
switch on the reason, never on the message text, which is for people and may change. The
reasons and their metadata are documented in ``proto/kv/v1/kv.proto`` and the README.

Pure: this module builds and reads protobuf messages; it never makes a call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

EPOCH_METADATA = "kv-epoch"
"""Set by a routing client to the cluster-map epoch it routed with.

A node that does not own the key answers FAILED_PRECONDITION (reason STALE_MAP)
instead of forwarding, so the client learns its map is stale (Redis MOVED, TiKV
region errors) rather than silently paying an extra hop forever.
"""

HOP_METADATA = "kv-forwarded-by"
"""Set by a node on a request it forwards, to the forwarding node's id.

A node never forwards a request that already carries it, so a disagreement
between cluster maps can cost one extra hop but never a loop.
"""

STATUS_DETAILS_METADATA = "grpc-status-details-bin"
"""The trailer in which gRPC's rich error model carries a serialized google.rpc.Status."""

ERROR_DOMAIN = "kv.v1"
"""ErrorInfo.domain of every error a kv node produces."""


class Reason(StrEnum):
    """ErrorInfo reasons. Adding one is compatible; renaming one is not."""

    KEY_EMPTY = "KEY_EMPTY"
    KEY_TOO_LARGE = "KEY_TOO_LARGE"
    VALUE_TOO_LARGE = "VALUE_TOO_LARGE"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    INVALID_REQUEST = "INVALID_REQUEST"
    STALE_MAP = "STALE_MAP"
    NOT_OWNER = "NOT_OWNER"
    OWNER_UNAVAILABLE = "OWNER_UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    OVERLOADED = "OVERLOADED"
    NOT_LEADER = "NOT_LEADER"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


RETRY_AFTER_MS = "retry_after_ms"
"""ErrorInfo.metadata key of an OVERLOADED refusal: milliseconds to wait before retrying."""

NEVER_RAN = "never_ran"
"""ErrorInfo.metadata key set to ``"true"`` on a refusal that proves the operation ran nowhere,
where its reason alone does not say so: a node that could not even connect to the owner it
forwards to (OWNER_UNAVAILABLE) sent nothing, so the caller may resend even an unconditional
write. Absent means "may have run" unless the reason itself is one that never runs."""

CONNECT_FAILURE_TEXT = ("failed to connect", "Connection refused")
"""Fragments of gRPC's own UNAVAILABLE details when no connection was made.

gRPC offers no structured signal for "the request was never written to a socket", and one
decision (may an unconditional write be resent?) needs it, on the SDK and on a forwarding node
alike; the text is gRPC's, not a kv node's, so no reason can replace it."""


def connect_failed(details: str) -> bool:
    """True when gRPC's details of an UNAVAILABLE call without our ErrorInfo say that no
    connection could be made: the request certainly never reached a server."""
    return any(fragment in details for fragment in CONNECT_FAILURE_TEXT)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The machine-readable part of a refusal: its reason and structured fields."""

    reason: str
    metadata: Mapping[str, str] = field(default_factory=dict)


def encode_status(code: int, message: str, info: ErrorInfo) -> status_pb2.Status:
    """A google.rpc.Status for ``code`` (a grpc status number) carrying ``info``."""
    detail = error_details_pb2.ErrorInfo(
        reason=info.reason, domain=ERROR_DOMAIN, metadata=dict(info.metadata)
    )
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(detail)
    return status


def decode_status_details(trailers: Sequence[tuple[str, str | bytes]] | None) -> ErrorInfo | None:
    """The ErrorInfo in a call's trailing metadata; None when absent or unreadable.

    A detail from another domain (a proxy, gRPC itself) is ignored: its reasons are not ours.
    """
    for key, value in trailers or ():
        if key != STATUS_DETAILS_METADATA or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except DecodeError:
            return None
        for any_detail in status.details:
            detail = error_details_pb2.ErrorInfo()
            if any_detail.Unpack(detail) and detail.domain == ERROR_DOMAIN:
                return ErrorInfo(detail.reason, dict(detail.metadata))
    return None
