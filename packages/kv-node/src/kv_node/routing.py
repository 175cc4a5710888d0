"""The node's one routing decision: for every operation, single or inside a Batch,
invalid, local, refused, or forwarded to its owner.

Pure: no gRPC calls, no clock, no store. The servicer translates a request into
``route``'s inputs and its decision back into gRPC; tests check the decision as a
table. Replication will add one more outcome here ("not the leader").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from grpc import StatusCode

from kv_common.cluster_map import ClusterMap
from kv_common.wire import EPOCH_METADATA, HOP_METADATA, Reason

Kind = Literal["put", "get", "delete"]

FORWARD_MARGIN_SECONDS = 0.05
"""At most this much of a caller's deadline is kept back when forwarding, so that an
unreachable owner is reported as UNAVAILABLE before the caller's own deadline passes."""

FORWARD_MARGIN_FRACTION = 0.1
"""With a short deadline the margin is this share of it instead: a 20 ms deadline keeps
back 2 ms and forwards with 18, where a fixed 50 ms would fail it at once."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An operation answered with an error status: the code, a message for people, and the
    stable reason and metadata for programs (``google.rpc.ErrorInfo``)."""

    code: StatusCode
    message: str
    reason: str
    """A ``Reason``, or an owner's reason passed through unchanged."""
    metadata: Mapping[str, str] = field(default_factory=dict)


class Refused(Exception):
    """Raised by the servicer to answer a whole call with a refusal."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class Local:
    """This node owns the key: serve it from the store."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Another node owns the key and the request may be forwarded to it."""

    owner: str


LOCAL = Local()
Decision = Local | Forward | Refusal


@dataclass(frozen=True, slots=True)
class Marks:
    """What a request's metadata says about how it reached this node."""

    routed: bool = False
    """The caller routed it with a cluster map (``kv-epoch``): a wrong node refuses."""
    forwarded: bool = False
    """Another node forwarded it (``kv-forwarded-by``): it is never forwarded again."""

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> Marks:
        """Only the two marker keys are looked at; any other entry, binary or not, is ignored.

        The markers' values are not used, so a client cannot inject text into replies.
        """
        routed = forwarded = False
        for key, _ in metadata or ():
            if key == EPOCH_METADATA:
                routed = True
            elif key == HOP_METADATA:
                forwarded = True
        return cls(routed, forwarded)


NO_MARKS = Marks()


class Router:
    """The routing decision for one node at one cluster map."""

    def __init__(
        self,
        node_id: str,
        cluster_map: ClusterMap,
        *,
        leader_of: Callable[[int], str | None] | None = None,
    ) -> None:
        """``leader_of`` (replicated partitions) names the member this node believes leads a
        partition; without it the key's owner (first replica) serves it."""
        self.node_id = node_id
        self.cluster_map = cluster_map
        self._leader_of = leader_of
        self._partition_of = cluster_map.placement.partition_of
        self._owner_of_key = cluster_map.placement.owner_of_key
        limits = cluster_map.limits
        self._max_key = limits.max_key_bytes
        self._max_value = limits.max_value_bytes
        self._forwards = {m.node_id: Forward(m.node_id) for m in cluster_map.members}

    def route(self, kind: Kind | None, key: bytes, value_size: int, marks: Marks) -> Decision:
        """Where one operation goes. ``value_size`` counts only for puts."""
        if kind is None:
            return Refusal(
                StatusCode.INVALID_ARGUMENT,
                "the operation sets none of put, get or delete",
                Reason.INVALID_REQUEST,
            )
        if not key or len(key) > self._max_key:
            return self._bad_key(key)
        if kind == "put" and value_size > self._max_value:
            return Refusal(
                StatusCode.RESOURCE_EXHAUSTED,
                f"value is {value_size} bytes; the limit is {self._max_value} bytes "
                "(--max-value-bytes)",
                Reason.VALUE_TOO_LARGE,
                {"limit": str(self._max_value), "size": str(value_size)},
            )
        if self._leader_of is not None:
            return self._to_leader(key, marks)
        owner = self._owner_of_key(key)
        if owner == self.node_id:
            return LOCAL
        if marks.forwarded:
            return self._misrouted(
                key,
                owner,
                Reason.NOT_OWNER,
                f"node {self.node_id!r} received a request marked as forwarded "
                f"({HOP_METADATA}) for a key it does not own; a forwarded request is never "
                "forwarded again",
            )
        if marks.routed:
            return self._misrouted(
                key,
                owner,
                Reason.STALE_MAP,
                f"stale cluster map: node {self.node_id!r} does not own partition "
                f"{self.cluster_map.placement.partition_of(key)}",
            )
        return self._forwards[owner]

    def _to_leader(self, key: bytes, marks: Marks) -> Decision:
        """Replicated: the partition's leader serves it. A request from a client without the
        SDK is forwarded there once (grpcurl works against any node); one from the SDK
        (``kv-epoch``), a forwarded one that missed the leader, or one for a partition with no
        known leader is refused NOT_LEADER, as never run, naming the leader when known."""
        assert self._leader_of is not None
        group = self._partition_of(key)
        leader = self._leader_of(group)
        if leader == self.node_id:
            return LOCAL
        if leader is None:
            return self.not_leader(group, None, f"partition {group} has no leader yet")
        if marks.forwarded or marks.routed:
            # An SDK (routed) learns the leader from the refusal and goes there itself,
            # which costs it one round trip once per partition instead of a hop per call.
            return self.not_leader(
                group, leader, f"node {self.node_id!r} does not lead partition {group}"
            )
        return self._forwards[leader]

    def not_leader(self, group: int, leader: str | None, why: str) -> Refusal:
        """The refusal of an operation on a partition this node does not lead: UNAVAILABLE
        (retry), reason NOT_LEADER, naming the leader it knows of when it knows one."""
        metadata = {"partition": str(group)}
        if leader is not None and leader != self.node_id:
            metadata["leader_id"] = leader
            metadata["leader_address"] = self.cluster_map.address_of(leader)
            why += f"; its leader is {leader!r} at {metadata['leader_address']}"
        return Refusal(StatusCode.UNAVAILABLE, why, Reason.NOT_LEADER, metadata)

    def check_batch(self, operations: int, size: int) -> Refusal | None:
        """A Batch over the node's count or byte limit is refused as a whole."""
        limits = self.cluster_map.limits
        for count, limit, unit, flag in (
            (operations, limits.max_batch_ops, "operations", "--max-batch-ops"),
            (size, limits.max_batch_bytes, "bytes", "--max-batch-bytes"),
        ):
            if count > limit:
                shown = f"{count} operations" if unit == "operations" else f"{count} bytes encoded"
                return Refusal(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"batch has {shown}; the limit is {limit} ({flag})",
                    Reason.BATCH_TOO_LARGE,
                    {"limit": str(limit), "size": str(count), "unit": unit},
                )
        return None

    def _bad_key(self, key: bytes) -> Refusal:
        if not key:
            return Refusal(StatusCode.INVALID_ARGUMENT, "key must not be empty", Reason.KEY_EMPTY)
        return Refusal(
            StatusCode.INVALID_ARGUMENT,
            f"key is {len(key)} bytes; the limit is {self._max_key} bytes",
            Reason.KEY_TOO_LARGE,
            {"limit": str(self._max_key), "size": str(len(key))},
        )

    def _misrouted(self, key: bytes, owner: str, reason: Reason, why: str) -> Refusal:
        address = self.cluster_map.address_of(owner)
        epoch = self.cluster_map.epoch
        return Refusal(
            StatusCode.FAILED_PRECONDITION,
            f"{why}; its owner is {owner!r} at {address} (epoch {epoch})",
            reason,
            {"epoch": str(epoch), "owner_id": owner, "owner_address": address},
        )


def forward_budget(remaining: float | None, forward_timeout: float) -> float | Refusal:
    """How long a forwarded call may take, given the caller's remaining deadline.

    A margin is kept back so that the caller hears UNAVAILABLE from this node, not its own
    deadline; it shrinks with the deadline so that short deadlines still get forwarded.
    """
    if remaining is None:
        return forward_timeout
    margin = min(FORWARD_MARGIN_SECONDS, remaining * FORWARD_MARGIN_FRACTION)
    budget = min(forward_timeout, remaining - margin)
    if budget <= 0:
        return Refusal(
            StatusCode.DEADLINE_EXCEEDED,
            "the caller's deadline passed before the request could be forwarded",
            Reason.DEADLINE_EXCEEDED,
        )
    return budget
