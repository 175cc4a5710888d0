"""The rules of request coalescing, as pure state both clients' lanes share.

A lane per node lets ``max_in_flight`` calls go out at once, each as its own
unary RPC, so a lightly loaded client adds no latency. Calls that arrive while
the lane is full wait; whenever a call in flight finishes, its slot goes to the
waiting calls (up to ``max_ops`` and ``max_bytes``), sent as one ``Batch`` RPC.
Under load the node then pays gRPC's per-call cost once per batch instead of
once per key (TiKV's client batches commands the same way).

Invariant: calls wait only while every slot is taken, because a freed slot is
handed to the waiting calls before anyone new may take it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from kv.v1 import kv_pb2
from kv_client.batch import DEFAULT_MAX_OPS
from kv_common.cluster_map import Limits
from kv_common.limits import DEFAULT_MAX_BATCH_BYTES

MIN_BATCH_TIMEOUT = 0.001
"""Seconds a coalesced batch is given at least, so gRPC gets a positive deadline."""

GET_OR_DELETE_BYTES = 64
"""Size counted for a call with no value when filling a batch up to ``max_bytes``."""


@dataclass(frozen=True)
class CoalesceConfig:
    """How single-key calls are gathered into batches (``None`` turns coalescing off)."""

    max_in_flight: int = 2
    """Calls per node sent at once before later ones wait to be batched."""
    max_ops: int = DEFAULT_MAX_OPS
    """Most calls in one coalesced Batch; keep at or under the node's --max-batch-ops."""
    max_bytes: int = DEFAULT_MAX_BATCH_BYTES // 2
    """Most key+value bytes in one coalesced Batch; under the node's --max-batch-bytes."""


DEFAULT_COALESCE = CoalesceConfig()


def within(config: CoalesceConfig, limits: Limits) -> CoalesceConfig:
    """The config, capped so a coalesced batch never exceeds the node's published limits."""
    return replace(
        config,
        max_ops=min(config.max_ops, limits.max_batch_ops),
        max_bytes=min(config.max_bytes, limits.max_batch_bytes // 2),
    )


class Queued(Protocol):
    """A call waiting in a lane: its Batch operation and its call's deadline."""

    @property
    def operation(self) -> kv_pb2.Operation: ...

    @property
    def deadline(self) -> float: ...


W = TypeVar("W", bound=Queued)


def size_of(operation: kv_pb2.Operation) -> int:
    if operation.HasField("put"):
        return len(operation.put.key) + len(operation.put.value)
    return GET_OR_DELETE_BYTES


def take_group(waiting: list[W], config: CoalesceConfig) -> list[W]:
    """Remove and return the next group: at most max_ops calls and max_bytes (at least one)."""
    total = 0
    count = 0
    for item in waiting[: config.max_ops]:
        total += size_of(item.operation)
        if count and total > config.max_bytes:
            break
        count += 1
    group = waiting[:count]
    del waiting[:count]
    return group


def batch_of(group: list[W], now: float) -> tuple[kv_pb2.BatchRequest, float]:
    """The Batch request for a group and its timeout: until the latest caller's deadline.

    Each caller still stops waiting at its own deadline; the batch runs on for
    the others.
    """
    request = kv_pb2.BatchRequest(operations=[w.operation for w in group])
    timeout = max(MIN_BATCH_TIMEOUT, max(w.deadline for w in group) - now)
    return request, timeout


class LaneState(Generic[W]):
    """One node's lane: the calls in flight and the calls waiting."""

    def __init__(self, config: CoalesceConfig) -> None:
        self.config = config
        self.in_flight = 0
        self.waiting: list[W] = []

    def arrive(self, call: W) -> bool:
        """True: ``call`` takes a slot and goes alone at once. False: it waits."""
        if self.in_flight < self.config.max_in_flight and not self.waiting:
            self.in_flight += 1
            return True
        self.waiting.append(call)
        return False

    def finished(self) -> list[W]:
        """A call or batch in flight ended: the group to send in its slot (empty: slot freed)."""
        if not self.waiting:
            self.in_flight -= 1
            return []
        return take_group(self.waiting, self.config)

    def give_up(self, call: W) -> bool:
        """``call``'s deadline passed. True if it was still waiting (so it was never sent)."""
        for index, waiting in enumerate(self.waiting):
            if waiting is call:  # identity: two calls may be equal
                del self.waiting[index]
                return True
        return False
