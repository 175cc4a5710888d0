"""kv_client: the typed Python SDK of the kv distributed key-value store.

from kv_client import Client

with Client("127.0.0.1:7001") as kv:
    kv.put("greeting", "hello")
    assert kv.get("greeting") == b"hello"
"""

from kv_client.aio import AsyncClient
from kv_client.client import Client
from kv_client.coalesce import CoalesceConfig
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
)
from kv_client.retry import NO_RETRY, RetryPolicy
from kv_client.types import Location, NodeStatus, Versioned, WriteResult
from kv_common.cluster_map import ClusterMap, Member

__all__ = [
    "NO_RETRY",
    "AccessDeniedError",
    "AsyncClient",
    "Client",
    "ClusterMap",
    "CoalesceConfig",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "KvError",
    "Location",
    "Member",
    "NodeStatus",
    "NotLeaderError",
    "OverloadedError",
    "RetryPolicy",
    "ShuttingDownError",
    "StaleMapError",
    "TooLargeError",
    "UnavailableError",
    "Versioned",
    "WriteResult",
]
