"""When the SDK tries a call again, as pure decisions the client loops follow.

Which calls are retried:
- reads, and conditional writes (put_if_version, put_if_absent,
  delete_if_version), on any retriable error: UNAVAILABLE and a stale cluster
  map. A conditional write that did apply before its answer was lost reports
  ``succeeded=False`` on the retry with the version it wrote itself; the docs
  show how to recognise that;
- unconditional writes (put, delete) only when the request provably never ran:
  the node said the map is stale or that it is overloaded (it refused without
  applying), or gRPC could not connect at all. After any other failure the
  outcome is unknown and the error goes to the caller.

An overloaded node names how long to wait (``OverloadedError.retry_after``);
the pause is never shorter than that hint. A refusal because the partition's
leader is elsewhere or being elected (``NotLeaderError``) is retried, with
backoff, until the call's deadline rather than ``max_attempts`` times: the
operation did not run, and an election ends within a few election timeouts.
With replicas (``failover``), so is a call that provably never ran because a
node is going or gone (a refused connect, SHUTTING_DOWN, a forward that could
not connect): another replica takes it, which is failover rather than a retry,
so even ``NO_RETRY`` does it.

``patience`` (replicated maps only) is how long an attempt may go unanswered
before its node is suspected of being stuck (paused, cut off: it accepted the
request and says nothing). New calls then go to another replica; the attempt
itself is abandoned and sent again elsewhere when the call may be retried after
an unknown outcome (reads, conditional writes with attempts left), and is
otherwise waited for, since an unconditional write may not be sent twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kv_client.errors import KvError, NotLeaderError, OverloadedError, ShuttingDownError
from kv_common.wire import NEVER_RAN

FAILOVER_MAX_PAUSE = 0.2
"""The longest pause before resending a call that never ran because its partition's leader
moved or its node is going: a few ticks of an election, far below the second the backoff grows
to. (Nodes that disagree about the leader, during a hand-off, bounce a call a few times in
milliseconds; an uncapped backoff then held it for seconds after the move was over.)"""

DEFAULT_PATIENCE: float | None = None
"""Off by default: latency alone does not tell a frozen node from a busy one (replicated
writes under heavy load take hundreds of milliseconds, a batch seconds), and suspecting a busy
leader sends its callers round its followers. A frozen node is found by the channel's
keepalive instead (``_transport.PING_TIMEOUT_MS``); set a patience for a deployment whose
latency is known to be far below it."""


class Safety(enum.Enum):
    """How safe a call is to send twice."""

    IDEMPOTENT = "idempotent"
    CONDITIONAL = "conditional"
    UNCONDITIONAL = "unconditional"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying one call. The call's deadline bounds it as well."""

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    patience: float | None = DEFAULT_PATIENCE
    """Seconds an attempt may go unanswered before its node is suspected (module docstring);
    None never suspects a slow node."""

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return float(min(self.max_backoff, self.initial_backoff * self.multiplier**attempt))

    def should_retry(
        self,
        error: KvError,
        *,
        attempt: int,
        safety: Safety,
        never_sent: bool,
        failover: bool = False,
    ) -> bool:
        """``failover``: the key has other replicas to send a call that never ran to."""
        if not error.retriable:
            return False
        if attempt + 1 >= self.max_attempts and not (
            isinstance(error, NotLeaderError) or (failover and _node_gone(error, never_sent))
        ):
            # An election in progress ends within a few election timeouts, and the
            # operation did not run: only the call's deadline bounds waiting it out.
            # So with a node that is going or gone and replicas that take over.
            return False
        if safety is Safety.UNCONDITIONAL:
            return error.invalid_metadata or error.never_ran or never_sent
        return True


NO_RETRY = RetryPolicy(max_attempts=1)


def _node_gone(error: KvError, never_sent: bool) -> bool:
    """The call never ran because a node is stopping or cannot be reached (not because it is
    busy: an overloaded node's refusals stay bounded by ``max_attempts``)."""
    return (
        never_sent
        or isinstance(error, ShuttingDownError)
        or error.metadata.get(NEVER_RAN) == "true"
    )


def next_pause(
    policy: RetryPolicy,
    error: KvError,
    *,
    attempt: int,
    safety: Safety,
    never_sent: bool,
    time_left: float,
    failover: bool = False,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up and raise."""
    pause = policy.backoff(attempt)
    if isinstance(error, OverloadedError) and error.retry_after is not None:
        pause = max(pause, error.retry_after)
    if (
        isinstance(error, NotLeaderError)
        and error.leader_id is not None
        and attempt + 1 < policy.max_attempts
    ):
        pause = 0.0  # the leader is named: go there at once (with backoff once nodes disagree)
    if isinstance(error, NotLeaderError) or (failover and _node_gone(error, never_sent)):
        # Leadership moves in milliseconds (a hand-off) to an election timeout: asking again
        # soon is a cheap refusal, while a backoff grown to a second outlasts the move.
        pause = min(pause, FAILOVER_MAX_PAUSE)
    retry = policy.should_retry(
        error, attempt=attempt, safety=safety, never_sent=never_sent, failover=failover
    )
    return pause if retry and pause < time_left else None
