"""The coalescing rules, as table tests over the pure ``LaneState``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kv.v1 import kv_pb2
from kv_client import Client
from kv_client.lane_state import (
    DEFAULT_COALESCE,
    GET_OR_DELETE_BYTES,
    MIN_BATCH_TIMEOUT,
    CoalesceConfig,
    LaneState,
    batch_of,
    take_group,
    within,
)
from kv_common.cluster_map import Limits


@dataclass(eq=False)
class Item:
    name: str
    size: int = 10
    deadline: float = 10.0

    @property
    def operation(self) -> kv_pb2.Operation:
        return kv_pb2.Operation(put=kv_pb2.PutRequest(key=b"k", value=b"v" * (self.size - 1)))


def test_coalescing_defaults() -> None:
    assert CoalesceConfig() == CoalesceConfig(
        max_in_flight=2, max_ops=1000, max_bytes=2 * 1024 * 1024
    )
    assert CoalesceConfig() == DEFAULT_COALESCE
    with Client("127.0.0.1:1") as kv:  # no call is made: the map is fetched on first use
        assert kv._coalesce == CoalesceConfig(), "coalescing is on by default"


# Events: "+x" x arrives, "-" a call in flight finishes; each event's expected outcome:
# for "+x": "send" (alone, now) or "wait"; for "-": the names of the group sent in the slot.
TABLE: list[tuple[str, CoalesceConfig, list[tuple[str, str]], int]] = [
    (
        "light load goes out at once",
        CoalesceConfig(max_in_flight=2),
        [("+a", "send"), ("-", ""), ("+b", "send"), ("-", "")],
        0,
    ),
    (
        "a full lane queues, and a freed slot takes everyone waiting",
        CoalesceConfig(max_in_flight=2),
        [("+a", "send"), ("+b", "send"), ("+c", "wait"), ("+d", "wait"), ("-", "cd"), ("-", "")],
        1,
    ),
    (
        "no one overtakes the queue while it waits",
        CoalesceConfig(max_in_flight=1),
        [("+a", "send"), ("+b", "wait"), ("-", "b"), ("+c", "wait"), ("-", "c"), ("-", "")],
        0,
    ),
    (
        "groups are cut at max_ops",
        CoalesceConfig(max_in_flight=1, max_ops=2),
        [("+a", "send"), ("+b", "wait"), ("+c", "wait"), ("+d", "wait"), ("-", "bc"), ("-", "d")],
        1,
    ),
    (
        "groups are cut at max_bytes",
        CoalesceConfig(max_in_flight=1, max_bytes=25),
        [("+a", "send"), ("+b", "wait"), ("+c", "wait"), ("+d", "wait"), ("-", "bc"), ("-", "d")],
        1,
    ),
]


@pytest.mark.parametrize(
    ("config", "events", "in_flight"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_who_goes_alone_who_waits_and_who_goes_together(
    config: CoalesceConfig, events: list[tuple[str, str]], in_flight: int
) -> None:
    lane: LaneState[Item] = LaneState(config)
    for event, expected in events:
        if event.startswith("+"):
            assert ("send" if lane.arrive(Item(event[1:])) else "wait") == expected, event
        else:
            assert "".join(item.name for item in lane.finished()) == expected, event
    assert lane.in_flight == in_flight
    assert lane.in_flight <= config.max_in_flight


def test_an_expired_caller_leaves_the_queue_only_if_not_yet_sent() -> None:
    lane: LaneState[Item] = LaneState(CoalesceConfig(max_in_flight=1))
    twins = Item("x"), Item("x")  # equal fields, different calls
    assert lane.arrive(Item("a"))
    assert not lane.arrive(twins[0]) and not lane.arrive(twins[1])
    assert lane.give_up(twins[1]), "still waiting: never sent"
    assert lane.waiting == [twins[0]], "the caller that gave up leaves, not its twin"
    assert lane.finished() == [twins[0]]
    assert not lane.give_up(twins[0]), "already in a batch: the outcome is unknown"


def test_an_oversized_call_still_goes_alone() -> None:
    queue = [Item("big", size=500), Item("small")]
    assert [i.name for i in take_group(queue, CoalesceConfig(max_bytes=100))] == ["big"]
    assert [i.name for i in take_group(queue, CoalesceConfig(max_bytes=100))] == ["small"]


def test_reads_and_deletes_count_a_fixed_size() -> None:
    @dataclass(eq=False)
    class Read:
        deadline: float = 1.0

        @property
        def operation(self) -> kv_pb2.Operation:
            return kv_pb2.Operation(get=kv_pb2.GetRequest(key=b"k" * 900))

    queue = [Read() for _ in range(5)]
    group = take_group(queue, CoalesceConfig(max_bytes=3 * GET_OR_DELETE_BYTES))
    assert len(group) == 3


def test_a_batch_lasts_until_the_latest_callers_deadline() -> None:
    group = [Item("a", deadline=3.0), Item("b", deadline=7.5)]
    request, timeout = batch_of(group, now=2.0)
    assert timeout == 5.5
    assert [op.put.value for op in request.operations] == [b"v" * 9, b"v" * 9]
    assert batch_of(group, now=9.0)[1] == MIN_BATCH_TIMEOUT


def test_batches_fit_the_limits_nodes_publish() -> None:
    limits = Limits(max_value_bytes=1024, max_batch_ops=50, max_batch_bytes=16 * 1024)
    capped = within(CoalesceConfig(max_in_flight=3), limits)
    assert capped == CoalesceConfig(max_in_flight=3, max_ops=50, max_bytes=8 * 1024)
    roomy = Limits(max_value_bytes=1024, max_batch_ops=10_000, max_batch_bytes=1 << 30)
    assert within(CoalesceConfig(max_ops=7, max_bytes=99), roomy) == CoalesceConfig(
        max_ops=7, max_bytes=99
    )
