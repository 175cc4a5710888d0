"""Plain result types of the public API (generated protobuf classes stay behind it)."""

from __future__ import annotations

from dataclasses import dataclass

from kv_common.cluster_map import Location

__all__ = ["Location", "NodeStatus", "Versioned", "WriteResult"]


@dataclass(frozen=True, slots=True)
class Versioned:
    """A value with the version (revision of its last write) it was read at."""

    value: bytes
    version: int


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a conditional write.

    ``version`` is the key's new version when ``succeeded``; otherwise the
    version the key has now (0 when absent), so a compare-and-swap loop can
    retry without another read.
    """

    succeeded: bool
    version: int


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: str
    address: str
    uptime_seconds: float
    keys_stored: int
    engine: str
    version: str
    requests_served: int
    requests_forwarded: int
    epoch: int
