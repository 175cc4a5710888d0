"""The retry rule for an overloaded node: it never ran the call, and it says how long to wait."""

from __future__ import annotations

import grpc
import pytest

from kv_client.errors import OverloadedError, UnavailableError
from kv_client.retry import RetryPolicy, Safety, next_pause
from kv_common.wire import RETRY_AFTER_MS

POLICY = RetryPolicy()  # 50 ms first backoff, doubling


def overloaded(retry_after_ms: str | None) -> OverloadedError:
    metadata = {} if retry_after_ms is None else {RETRY_AFTER_MS: retry_after_ms}
    return OverloadedError(
        "busy", code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="OVERLOADED", metadata=metadata
    )


@pytest.mark.parametrize("safety", list(Safety))
def test_an_overloaded_refusal_is_retried_for_every_kind_of_call(safety: Safety) -> None:
    pause = next_pause(
        POLICY, overloaded("10"), attempt=0, safety=safety, never_sent=False, time_left=5.0
    )
    assert pause == pytest.approx(POLICY.backoff(0))


def test_the_pause_is_never_shorter_than_the_nodes_hint() -> None:
    pause = next_pause(
        POLICY,
        overloaded("400"),
        attempt=0,
        safety=Safety.UNCONDITIONAL,
        never_sent=False,
        time_left=5.0,
    )
    assert pause == pytest.approx(0.4)
    assert overloaded("400").retry_after == pytest.approx(0.4)
    assert overloaded(None).retry_after is None
    assert overloaded("soon").retry_after is None


def test_no_retry_when_the_hint_outlasts_the_deadline() -> None:
    pause = next_pause(
        POLICY,
        overloaded("400"),
        attempt=0,
        safety=Safety.IDEMPOTENT,
        never_sent=False,
        time_left=0.3,
    )
    assert pause is None


def test_an_ambiguous_unavailable_put_is_still_not_resent() -> None:
    error = UnavailableError("owner down", code=grpc.StatusCode.UNAVAILABLE)
    pause = next_pause(
        POLICY, error, attempt=0, safety=Safety.UNCONDITIONAL, never_sent=False, time_left=5.0
    )
    assert pause is None
