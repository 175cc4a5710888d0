"""One single-key call's run, as a pure state machine both clients drive.

Every rule about a call lives here: where the next attempt goes and with what
deadline, whether it may join a coalescing lane, and what a failure leads to
(refresh the map, pause and try again, or give up). There is no gRPC call, no
clock and no sleep: the driver passes ``now`` (monotonic seconds) in, performs
the action it gets back, and reports the outcome (the h11 habit). ``Client``
and ``AsyncClient`` differ only in how they perform ``Send`` and ``Wait``.

    run = CallRun(call, policy=..., budget=..., now=now, metadata=..., coalesce=...)
    action = run.start()
    loop:  NeedMap -> run.routed(map, now) | run.map_failed(error)
           Send    -> run.replied(response) | run.failed(error, never_sent=..., now=now)
           Wait    -> run.resume(now)
           Done / Fail -> return the value / raise the error
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kv_client._calls import Call
from kv_client._transport import Metadata, routed_metadata
from kv_client.errors import (
    DeadlineExceededError,
    KvError,
    NotLeaderError,
    ShuttingDownError,
    UnavailableError,
)
from kv_client.leaders import Leaders
from kv_client.retry import RetryPolicy, next_pause
from kv_common.cluster_map import ClusterMap, Limits

Out = TypeVar("Out")

LaneKey = tuple[str, int]
"""A coalescing lane: one per node address and map epoch (the epoch is in each request)."""


@dataclass(frozen=True, slots=True)
class NeedMap:
    """Get the cluster map (a fresh one when ``refresh``) by ``deadline``; report it.

    ``stale_epoch`` is the epoch of the map a node refused (see ``MapCache.want``).
    """

    refresh: bool
    deadline: float
    stale_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Send one attempt to ``address`` and report its answer or failure.

    ``timeout`` is what is left of the call's budget now; a call that waits in a
    lane first computes it again from ``deadline`` when it is really sent.
    ``lane`` is None when the call must go alone as a unary RPC.
    """

    node_id: str
    address: str
    timeout: float
    deadline: float
    metadata: tuple[tuple[str, str], ...]
    lane: LaneKey | None
    limits: Limits
    """The node's published request limits, which a lane's batches must fit."""
    patience: float | None = None
    """When (monotonic) to report the attempt to ``CallRun.slow`` if it is still unanswered;
    None: never (one copy, or the policy says so)."""
    abandon: bool = False
    """Whether ``slow`` will abandon the attempt (cancel it and go elsewhere): only a call
    that may be sent again after an unknown outcome. A queued, unsent lane call is always
    taken out of its lane at ``patience`` (see ``coalesce``)."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Pause ``seconds`` (the retry backoff), then ``resume``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Done(Generic[Out]):
    """The call succeeded with ``value``."""

    value: Out


@dataclass(frozen=True, slots=True)
class Fail:
    """The call failed: raise ``error``."""

    error: KvError


Action = NeedMap | Send | Wait | Done[Any] | Fail


class CallRun(Generic[Out]):
    """The decisions of one call across its attempts."""

    def __init__(
        self,
        call: Call[Out],
        *,
        policy: RetryPolicy,
        budget: float,
        now: float,
        metadata: Metadata | None,
        coalesce: bool,
        leaders: Leaders | None = None,
    ) -> None:
        """``leaders`` is the client's shared table of partition leaders (replicated maps);
        without one, every attempt goes to the key's owner."""
        self.call = call
        self.budget = budget
        self.deadline = now + budget
        self.attempt = 0
        self._policy = policy
        self._metadata = metadata
        # Calls with their own metadata go alone: a Batch carries one set for all.
        self._coalesce = coalesce and not metadata
        self._map: ClusterMap | None = None
        self._pause_after_map: float | None = None
        self._sent: Send | None = None
        self._last_error: KvError | None = None
        self._leaders = leaders if leaders is not None else Leaders()
        self._may_have_run = False
        """Some failed attempt may have run (its outcome is unknown)."""

    def start(self) -> NeedMap:
        return NeedMap(refresh=False, deadline=self.deadline)

    def routed(self, cluster_map: ClusterMap, now: float) -> Action:
        """The map to route by is ``cluster_map`` (after ``NeedMap``)."""
        self._map = cluster_map
        pause, self._pause_after_map = self._pause_after_map, None
        return Wait(pause) if pause is not None else self._send(now)

    def map_failed(self, error: KvError) -> Fail:
        """No node gave a map: nothing can be routed."""
        return Fail(error)

    def resume(self, now: float) -> Action:
        """The pause is over (after ``Wait``)."""
        return self._send(now)

    def replied(self, response: Any) -> Done[Out]:
        """The node answered (after ``Send``)."""
        if self._sent is not None:
            self._leaders.answered(self._sent.node_id)
        return Done(self.call.decode(response))

    def slow(self, now: float) -> NeedMap | Wait | Fail | None:
        """The attempt is still unanswered at its ``patience`` (after ``Send``): its node is
        suspect, so other calls avoid it. None: keep waiting for this attempt; else it is
        abandoned (``Send.abandon``: the driver cancels it) and this is what comes next."""
        sent = self._sent
        assert sent is not None and sent.patience is not None, "slow() follows a patient Send"
        self._leaders.suspect(sent.node_id, now)
        if not sent.abandon:
            return None
        waited = self._policy.patience
        error = UnavailableError(f"no answer within {waited}s; sent again to another replica")
        return self.failed(error, never_sent=False, now=now)

    def failed(self, error: KvError, *, never_sent: bool, now: float) -> NeedMap | Wait | Fail:
        """The attempt failed with ``error`` (after ``Send``).

        ``never_sent`` is True only when the request provably reached no node.
        """
        sent = self._sent
        if sent is not None:
            error.relocated(f"{self.call.method} via node {sent.node_id!r} at {sent.address}")
            if isinstance(error, ShuttingDownError):
                # It is going: calls sent to it from now on may meet its server's own stop
                # (CANCELLED, which cannot be told from a call cut short after it ran).
                self._leaders.suspect(sent.node_id, now)
            elif error.reason is not None:  # the node's own refusal: it is answering
                self._leaders.answered(sent.node_id)
            elif never_sent or isinstance(error, UnavailableError):
                # No connection, or the connection failed under the call (reset, a ping
                # unanswered: a frozen node): nothing from the node itself.
                self._leaders.suspect(sent.node_id, now)
        if not (error.never_ran or error.invalid_metadata or never_sent):
            self._may_have_run = True
        self._last_error = error
        replicated = self._map is not None and self._map.replication_factor > 1
        pause = next_pause(
            self._policy,
            error,
            attempt=self.attempt,
            safety=self.call.safety,
            never_sent=never_sent,
            time_left=self.deadline - now,
            failover=replicated,
        )
        if pause is None:
            # What the caller may rely on is what holds for every attempt: the call never
            # ran only if none of them may have.
            error.never_ran = (error.never_ran or never_sent) and not self._may_have_run
            return Fail(error)
        self.attempt += 1
        if not self._retarget(error, now) and isinstance(error, NotLeaderError) and not pause:
            # The hint was not followed (it names a suspect node): back off, then the next
            # replica, rather than asking the same followers again at once.
            pause = self._policy.backoff(self.attempt - 1)
        if error.invalid_metadata:
            self._pause_after_map = pause
            epoch = self._map.epoch if self._map is not None else None
            return NeedMap(refresh=True, deadline=self.deadline, stale_epoch=epoch)
        return Wait(pause)

    def _send(self, now: float) -> Send | Fail:
        remaining = self.deadline - now
        if remaining <= 0:
            # After a failed attempt, its error says more than the deadline does.
            return Fail(
                self._last_error
                or DeadlineExceededError(
                    f"deadline of {self.budget}s passed before {self.call.method}"
                )
            )
        cluster_map = self._map
        assert cluster_map is not None, "routed() comes before any send"
        node_id = self._leaders.target(cluster_map, self.call.key, now=now)
        address = cluster_map.address_of(node_id)
        patience = self._policy.patience
        patient = patience is not None and cluster_map.replication_factor > 1
        self._sent = Send(
            node_id=node_id,
            address=address,
            timeout=remaining,
            deadline=self.deadline,
            metadata=routed_metadata(cluster_map, self._metadata),
            lane=(address, cluster_map.epoch) if self._coalesce else None,
            limits=cluster_map.limits,
            patience=now + patience if patient and patience is not None else None,
            abandon=patient and self._abandonable(),
        )
        return self._sent

    def _abandonable(self) -> bool:
        """May an attempt with an unknown outcome be followed by another (``Send.abandon``)?"""
        probe = UnavailableError("probe")
        return self._policy.should_retry(
            probe, attempt=self.attempt, safety=self.call.safety, never_sent=False
        )

    def _retarget(self, error: KvError, now: float) -> bool:
        """Where a retry goes when the key's partition has several replicas: the leader a
        NOT_LEADER refusal named, or after the node tried could not serve (unreachable, no
        leader yet), the next replica in ring order, which knows the leader or forwards.
        True when it follows a named leader."""
        sent, cluster_map = self._sent, self._map
        if sent is None or cluster_map is None or cluster_map.replication_factor < 2:
            return False
        hinted = error.metadata.get("leader_id")
        if (
            hinted is not None
            and hinted != sent.node_id
            and self._leaders.learned(cluster_map, self.call.key, hinted, now=now)
        ):
            return True
        if isinstance(error, UnavailableError):
            self._leaders.unreachable(cluster_map, self.call.key, sent.node_id)
        return False
