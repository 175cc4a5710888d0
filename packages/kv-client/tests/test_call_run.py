"""The rules of one call, as table tests over the pure ``CallRun`` with a scripted world.

Each row scripts what the world does (each attempt's outcome, how long things
take) and lists the actions the run asks for, as a trace: ``map``/``map!``
(a map, a fresh one), ``send <node> <timeout>``, ``wait <seconds>``, and the end
(``done`` or ``fail <ErrorClass>``). No network, no clock, no sleep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from kv.v1 import kv_pb2
from kv_client import _calls
from kv_client._calls import Call
from kv_client._transport import DEFAULT_TIMEOUT
from kv_client.call_run import CallRun, Done, Fail, NeedMap, Send, Wait
from kv_client.errors import (
    InvalidArgumentError,
    KvError,
    StaleMapError,
    UnavailableError,
)
from kv_client.retry import NO_RETRY, RetryPolicy
from kv_client.types import WriteResult
from kv_common.cluster_map import ClusterMap, Member
from kv_common.wire import EPOCH_METADATA

MEMBERS = (Member("a", "127.0.0.1:1"), Member("b", "127.0.0.1:2"))
MAP = ClusterMap.build(epoch=7, members=MEMBERS, partitions=64, replication_factor=1, vnodes=16)
KEY = next(f"k{i}" for i in range(1000) if MAP.owner_of(f"k{i}".encode())[0] == "a")
DEFAULT = RetryPolicy()


@dataclass(frozen=True)
class Ok:
    """The attempt is answered."""


@dataclass(frozen=True)
class Err:
    """The attempt fails with ``kind``; ``unsent`` when no connection was ever made."""

    kind: type[KvError]
    unsent: bool = False


@dataclass(frozen=True)
class MapDown:
    """The map fetch fails."""


Outcome = Ok | Err | MapDown

RESPONSES: dict[str, Any] = {
    "get": kv_pb2.GetResponse(found=True, value=b"v", version=3),
    "put": kv_pb2.PutResponse(succeeded=True, version=4),
    "delete": kv_pb2.DeleteResponse(succeeded=True, found=True, version=5),
}


def drive(
    call: Call[Any],
    outcomes: Sequence[Outcome],
    *,
    policy: RetryPolicy = DEFAULT,
    budget: float = 5.0,
    attempt_seconds: float = 0.0,
    map_seconds: float = 0.0,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> tuple[list[str], CallRun[Any]]:
    """Run a CallRun against a scripted world with a fake clock; the trace of its actions."""
    now = 100.0
    run = CallRun(call, policy=policy, budget=budget, now=now, metadata=metadata, coalesce=True)
    script = list(outcomes)
    trace: list[str] = []
    action: Any = run.start()
    for _ in range(50):
        if isinstance(action, NeedMap):
            trace.append("map!" if action.refresh else "map")
            assert action.deadline == run.deadline
            assert action.stale_epoch == (MAP.epoch if action.refresh else None)
            now += map_seconds
            if action.refresh and script and isinstance(script[0], MapDown):
                script.pop(0)
                action = run.map_failed(UnavailableError("no node answered"))
            else:
                action = run.routed(MAP, now)
        elif isinstance(action, Send):
            trace.append(f"send {action.node_id} {round(action.timeout, 3):g}")
            assert action.deadline == run.deadline
            outcome = script.pop(0)
            now += attempt_seconds
            if isinstance(outcome, Ok):
                action = run.replied(RESPONSES[call.kind])
            else:
                assert isinstance(outcome, Err)
                error = outcome.kind("refused")
                action = run.failed(error, never_sent=outcome.unsent, now=now)
        elif isinstance(action, Wait):
            trace.append(f"wait {round(action.seconds, 3):g}")
            now += action.seconds
            action = run.resume(now)
        elif isinstance(action, Done):
            trace.append("done")
            return trace, run
        else:
            assert isinstance(action, Fail)
            trace.append(f"fail {type(action.error).__name__}")
            return trace, run
    raise AssertionError(f"the run did not end: {trace}")


GET: Callable[[], Call[Any]] = lambda: _calls.get(KEY)  # noqa: E731
PUT: Callable[[], Call[Any]] = lambda: _calls.put(KEY, "v")  # noqa: E731
DELETE: Callable[[], Call[Any]] = lambda: _calls.delete(KEY)  # noqa: E731
CAS: Callable[[], Call[Any]] = lambda: _calls.put_if_version(KEY, "v", 3)  # noqa: E731
CAD: Callable[[], Call[Any]] = lambda: _calls.delete_if_version(KEY, 3)  # noqa: E731
DOWN = Err(UnavailableError)
UNSENT = Err(UnavailableError, unsent=True)
STALE = Err(StaleMapError)

RETRIED = "map, send a 5, wait 0.05, send a 4.95, done"
NOT_RESENT = "map, send a 5, fail UnavailableError"

# name, call, what the world does, the trace of the run's actions
TABLE: list[tuple[str, Callable[[], Call[Any]], list[Outcome], str]] = [
    ("answered at once", GET, [Ok()], "map, send a 5, done"),
    ("a read is retried", GET, [DOWN, Ok()], RETRIED),
    ("an ambiguous put is not resent", PUT, [DOWN], NOT_RESENT),
    ("an ambiguous delete is not resent", DELETE, [DOWN], NOT_RESENT),
    ("a put that never left is resent", PUT, [UNSENT, Ok()], RETRIED),
    ("a delete that never left is resent", DELETE, [UNSENT, Ok()], RETRIED),
    (
        "a stale map refreshes, then a put is resent",
        PUT,
        [STALE, Ok()],
        "map, send a 5, map!, wait 0.05, send a 4.95, done",
    ),
    ("a conditional put is retried", CAS, [DOWN, Ok()], RETRIED),
    ("a conditional delete is retried", CAD, [DOWN, Ok()], RETRIED),
    (
        "a refusal that cannot change is not retried",
        GET,
        [Err(InvalidArgumentError)],
        "map, send a 5, fail InvalidArgumentError",
    ),
    (
        "attempts are bounded and the backoff doubles",
        GET,
        [DOWN, DOWN, DOWN, DOWN, Ok()],
        "map, send a 5, wait 0.05, send a 4.95, wait 0.1, send a 4.85, wait 0.2, send a 4.65, "
        "fail UnavailableError",
    ),
    (
        "a failed refresh fails the call",
        GET,
        [STALE, MapDown()],
        "map, send a 5, map!, fail UnavailableError",
    ),
]


@pytest.mark.parametrize(
    ("make", "outcomes", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_retry_and_refresh_rules(
    make: Callable[[], Call[Any]], outcomes: list[Outcome], expected: str
) -> None:
    trace, _ = drive(make(), outcomes)
    assert ", ".join(trace) == expected


def test_no_retry_makes_one_attempt() -> None:
    for outcome in (DOWN, UNSENT, STALE):
        trace, _ = drive(GET(), [outcome, Ok()], policy=NO_RETRY)
        assert trace == ["map", "send a 5", f"fail {outcome.kind.__name__}"]


def test_retry_policy_defaults() -> None:
    assert (
        RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=1.0, multiplier=2.0)
        == DEFAULT
    )
    assert NO_RETRY.max_attempts == 1
    assert [DEFAULT.backoff(n) for n in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_the_timeout_covers_every_attempt_and_pause() -> None:
    """Each attempt gets what is left of one budget; no pause starts that would outlive it."""
    policy = RetryPolicy(max_attempts=100, initial_backoff=0.1, multiplier=1.0)
    trace, run = drive(GET(), [DOWN] * 100, policy=policy, budget=1.0, attempt_seconds=0.2)
    assert trace == [
        "map",
        "send a 1",
        "wait 0.1",
        "send a 0.7",
        "wait 0.1",
        "send a 0.4",
        "wait 0.1",
        "send a 0.1",
        "fail UnavailableError",
    ]
    assert run.attempt == 3
    assert DEFAULT_TIMEOUT == 5.0, "the README promises a 5 s default, retries included"


def test_a_deadline_spent_before_the_first_send_fails_without_sending() -> None:
    trace, _ = drive(GET(), [Ok()], budget=0.5, map_seconds=0.6)
    assert trace == ["map", "fail DeadlineExceededError"]


def test_a_deadline_that_passes_during_a_pause_fails_with_the_last_error() -> None:
    """A pause may overrun (a busy machine); the call then fails with what went wrong."""
    call = _calls.get(KEY)
    run = CallRun(call, policy=DEFAULT, budget=1.0, now=0.0, metadata=None, coalesce=True)
    run.start()
    assert isinstance(run.routed(MAP, 0.0), Send)
    down = UnavailableError("down")
    assert run.failed(down, never_sent=False, now=0.9) == Wait(0.05)
    fail = run.resume(now=1.2)
    assert isinstance(fail, Fail) and fail.error is down


def test_a_pause_that_would_end_past_the_deadline_is_not_taken() -> None:
    trace, _ = drive(GET(), [DOWN, Ok()], budget=0.3, attempt_seconds=0.26)
    assert trace == ["map", "send a 0.3", "fail UnavailableError"]


def test_conditional_write_retry_reports_what_the_node_says() -> None:
    """The run does not reinterpret a retried CAS: the node's answer is the result."""
    call = _calls.put_if_version(KEY, "v", 3)
    run = CallRun(call, policy=DEFAULT, budget=5.0, now=0.0, metadata=None, coalesce=True)
    run.start()
    assert isinstance(run.routed(MAP, 0.0), Send)
    assert isinstance(run.failed(UnavailableError("lost"), never_sent=False, now=0.1), Wait)
    assert isinstance(run.resume(0.2), Send)
    done = run.replied(kv_pb2.PutResponse(succeeded=False, version=4))
    assert done.value == WriteResult(False, 4)


def test_sends_are_routed_marked_and_laned() -> None:
    run = CallRun(GET(), policy=DEFAULT, budget=5.0, now=0.0, metadata=None, coalesce=True)
    run.start()
    send = run.routed(MAP, 1.0)
    assert isinstance(send, Send)
    assert (send.node_id, send.address) == MAP.owner_of(KEY.encode())
    assert send.metadata == ((EPOCH_METADATA, "7"),)
    assert send.lane == (send.address, 7)
    assert send.limits == MAP.limits
    assert (send.timeout, send.deadline) == (4.0, 5.0)


@pytest.mark.parametrize(
    ("metadata", "coalesce", "laned"),
    [(None, True, True), ([("x-request-id", "1")], True, False), (None, False, False)],
)
def test_calls_with_their_own_metadata_are_never_coalesced(
    metadata: list[tuple[str, str]] | None, coalesce: bool, laned: bool
) -> None:
    run = CallRun(GET(), policy=DEFAULT, budget=5.0, now=0.0, metadata=metadata, coalesce=coalesce)
    run.start()
    send = run.routed(MAP, 0.0)
    assert isinstance(send, Send)
    assert (send.lane is not None) is laned
    assert send.metadata[-1] == (EPOCH_METADATA, "7")
    assert send.metadata[:-1] == tuple(metadata or ())


def test_a_failure_names_where_the_call_went() -> None:
    run = CallRun(PUT(), policy=DEFAULT, budget=5.0, now=0.0, metadata=None, coalesce=True)
    run.start()
    send = run.routed(MAP, 0.0)
    assert isinstance(send, Send)
    fail = run.failed(UnavailableError("owner down"), never_sent=False, now=0.1)
    assert isinstance(fail, Fail)
    assert str(fail.error) == f"Put via node 'a' at {send.address}: owner down"
