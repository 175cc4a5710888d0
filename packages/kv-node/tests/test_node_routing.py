"""The routing decision as a table: no servers, no clock."""

from __future__ import annotations

import pytest
from grpc import StatusCode

from kv_common.cluster_map import ClusterMap, Limits, Member
from kv_common.wire import EPOCH_METADATA, HOP_METADATA, Reason
from kv_node.routing import (
    FORWARD_MARGIN_SECONDS,
    LOCAL,
    NO_MARKS,
    Decision,
    Forward,
    Kind,
    Marks,
    Refusal,
    Router,
    forward_budget,
)

LIMITS = Limits(max_key_bytes=8, max_value_bytes=4, max_batch_ops=3, max_batch_bytes=100)
CLUSTER = ClusterMap.build(
    epoch=7,
    members=(Member("a", "10.0.0.1:1"), Member("b", "10.0.0.2:2")),
    partitions=16,
    replication_factor=1,
    vnodes=8,
    limits=LIMITS,
)
ROUTER = Router("a", CLUSTER)


def key_of(owner: str) -> bytes:
    return next(
        k for k in (f"k{i}".encode() for i in range(100)) if CLUSTER.owner_of(k)[0] == owner
    )


MINE, THEIRS = key_of("a"), key_of("b")
ROUTED, FORWARDED = Marks(routed=True), Marks(forwarded=True)
WHERE_B = {"epoch": "7", "owner_id": "b", "owner_address": "10.0.0.2:2"}


@pytest.mark.parametrize(
    ("kind", "key", "size", "marks", "expected"),
    [
        # Valid and owned here: local, whatever the marks.
        ("get", MINE, 0, NO_MARKS, LOCAL),
        ("put", MINE, 4, ROUTED, LOCAL),
        ("delete", MINE, 0, FORWARDED, LOCAL),
        # Valid and owned elsewhere: forwarded, unless marked.
        ("get", THEIRS, 0, NO_MARKS, Forward("b")),
        ("put", THEIRS, 4, NO_MARKS, Forward("b")),
        (
            "get",
            THEIRS,
            0,
            ROUTED,
            (StatusCode.FAILED_PRECONDITION, Reason.STALE_MAP, WHERE_B),
        ),
        (
            "put",
            THEIRS,
            1,
            FORWARDED,
            (StatusCode.FAILED_PRECONDITION, Reason.NOT_OWNER, WHERE_B),
        ),
        # Both marks: the hop marker wins (it is a disagreement between nodes).
        (
            "get",
            THEIRS,
            0,
            Marks(routed=True, forwarded=True),
            (StatusCode.FAILED_PRECONDITION, Reason.NOT_OWNER, WHERE_B),
        ),
        # Invalid, whoever owns the key: refused before routing.
        (None, b"", 0, NO_MARKS, (StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST, {})),
        ("get", b"", 0, ROUTED, (StatusCode.INVALID_ARGUMENT, Reason.KEY_EMPTY, {})),
        (
            "delete",
            b"123456789",
            0,
            NO_MARKS,
            (StatusCode.INVALID_ARGUMENT, Reason.KEY_TOO_LARGE, {"limit": "8", "size": "9"}),
        ),
        ("get", b"12345678", 0, NO_MARKS, None),  # at the key limit: fine
        (
            "put",
            THEIRS,
            5,
            NO_MARKS,
            (StatusCode.RESOURCE_EXHAUSTED, Reason.VALUE_TOO_LARGE, {"limit": "4", "size": "5"}),
        ),
        # A value size is ignored for reads and deletes.
        ("get", MINE, 99, NO_MARKS, LOCAL),
    ],
)
def test_route(
    kind: Kind | None,
    key: bytes,
    size: int,
    marks: Marks,
    expected: Decision | tuple[StatusCode, Reason, dict[str, str]] | None,
) -> None:
    decision = ROUTER.route(kind, key, size, marks)
    if expected is None:
        assert not isinstance(decision, Refusal)
    elif isinstance(expected, tuple):
        assert isinstance(decision, Refusal)
        assert (decision.code, decision.reason, dict(decision.metadata)) == expected
        assert decision.message and "\n" not in decision.message
    else:
        assert decision == expected


def test_stale_map_message_names_the_owner_for_people() -> None:
    decision = ROUTER.route("get", THEIRS, 0, ROUTED)
    assert isinstance(decision, Refusal)
    assert "'b' at 10.0.0.2:2" in decision.message


@pytest.mark.parametrize(
    ("operations", "size", "expected"),
    [
        (3, 100, None),
        (4, 10, {"limit": "3", "size": "4", "unit": "operations"}),
        (1, 101, {"limit": "100", "size": "101", "unit": "bytes"}),
    ],
)
def test_check_batch(operations: int, size: int, expected: dict[str, str] | None) -> None:
    refusal = ROUTER.check_batch(operations, size)
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert (refusal.code, refusal.reason) == (
            StatusCode.RESOURCE_EXHAUSTED,
            Reason.BATCH_TOO_LARGE,
        )
        assert dict(refusal.metadata) == expected


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, NO_MARKS),
        ((("x-other", "1"),), NO_MARKS),
        (((EPOCH_METADATA, "7"),), ROUTED),
        (((HOP_METADATA, "b"),), FORWARDED),
        # Binary metadata that is not UTF-8 is simply not looked at.
        ((("trace-bin", b"\xff\xfe\x00"), (EPOCH_METADATA, "1")), ROUTED),
    ],
)
def test_marks_from_metadata(
    metadata: tuple[tuple[str, str | bytes], ...] | None, expected: Marks
) -> None:
    assert Marks.from_metadata(metadata) == expected


@pytest.mark.parametrize(
    ("remaining", "forward_timeout", "expected"),
    [
        (None, 5.0, 5.0),  # no caller deadline: the configured timeout
        (10.0, 5.0, 5.0),  # a long deadline: capped by the configured timeout
        (1.0, 5.0, 1.0 - FORWARD_MARGIN_SECONDS),  # the full margin
        (0.02, 5.0, 0.018),  # a short deadline: a margin sized to it
        (0.001, 5.0, 0.0009),
    ],
)
def test_forward_budget(remaining: float | None, forward_timeout: float, expected: float) -> None:
    assert forward_budget(remaining, forward_timeout) == pytest.approx(expected)


@pytest.mark.parametrize("remaining", [0.0, -0.5])
def test_forward_budget_after_the_deadline_is_a_refusal(remaining: float) -> None:
    budget = forward_budget(remaining, 5.0)
    assert isinstance(budget, Refusal)
    assert (budget.code, budget.reason) == (StatusCode.DEADLINE_EXCEEDED, Reason.DEADLINE_EXCEEDED)


REPLICATED = ClusterMap.build(
    epoch=7,
    members=(Member("a", "10.0.0.1:1"), Member("b", "10.0.0.2:2"), Member("c", "10.0.0.3:3")),
    partitions=16,
    replication_factor=3,
    vnodes=8,
)
LEADERS = {0: "a", 1: "b"}  # other partitions: no leader known
GROUP_A = next(
    k for k in (b"a%d" % i for i in range(1000)) if REPLICATED.placement.partition_of(k) == 0
)
GROUP_B = next(
    k for k in (b"b%d" % i for i in range(1000)) if REPLICATED.placement.partition_of(k) == 1
)
GROUP_NONE = next(
    k for k in (b"n%d" % i for i in range(1000)) if REPLICATED.placement.partition_of(k) > 1
)
LEADER_ROUTER = Router("a", REPLICATED, leader_of=LEADERS.get)
HINT_B = {"partition": "1", "leader_id": "b", "leader_address": "10.0.0.2:2"}


@pytest.mark.parametrize(
    ("key", "marks", "expected"),
    [
        # The leader serves its partition, however the request came.
        (GROUP_A, NO_MARKS, LOCAL),
        (GROUP_A, Marks(routed=True), LOCAL),
        (GROUP_A, Marks(forwarded=True), LOCAL),
        # A client without the SDK is forwarded to the leader, once.
        (GROUP_B, NO_MARKS, Forward("b")),
        # The SDK is told where the leader is; so is a forwarded request that missed it.
        (GROUP_B, Marks(routed=True), (StatusCode.UNAVAILABLE, Reason.NOT_LEADER, HINT_B)),
        (GROUP_B, Marks(forwarded=True), (StatusCode.UNAVAILABLE, Reason.NOT_LEADER, HINT_B)),
        # No leader known (an election): refused, never run, whoever asks.
        (GROUP_NONE, NO_MARKS, (StatusCode.UNAVAILABLE, Reason.NOT_LEADER, None)),
    ],
)
def test_route_to_the_partition_leader(
    key: bytes, marks: Marks, expected: Decision | tuple[StatusCode, Reason, dict[str, str] | None]
) -> None:
    decision = LEADER_ROUTER.route("put", key, 1, marks)
    if isinstance(expected, tuple):
        assert isinstance(decision, Refusal)
        code, reason, metadata = expected
        assert (decision.code, decision.reason) == (code, reason)
        if metadata is not None:
            assert dict(decision.metadata) == metadata
        else:
            assert "leader_id" not in decision.metadata
        assert decision.message and "\n" not in decision.message
    else:
        assert decision == expected


def test_limits_are_checked_before_leadership() -> None:
    decision = LEADER_ROUTER.route("put", b"", 1, NO_MARKS)
    assert isinstance(decision, Refusal) and decision.reason == Reason.KEY_EMPTY
