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
from kv_client.errors import DeadlineExceededError, KvError, UnavailableError
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
        self._unreachable: set[str] = set()
        """Nodes this call could not reach. A replica may go on naming a dead leader until its
        own failure detector notices (about an election timeout); the call does not go back
        to one of them on such a hint, but waits on the replica for news of the new leader."""

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
        return Done(self.call.decode(response))

    def failed(self, error: KvError, *, never_sent: bool, now: float) -> NeedMap | Wait | Fail:
        """The attempt failed with ``error`` (after ``Send``).

        ``never_sent`` is True only when the request provably reached no node.
        """
        sent = self._sent
        if sent is not None:
            error.relocated(f"{self.call.method} via node {sent.node_id!r} at {sent.address}")
        self._last_error = error
        pause = next_pause(
            self._policy,
            error,
            attempt=self.attempt,
            safety=self.call.safety,
            never_sent=never_sent,
            time_left=self.deadline - now,
        )
        if pause is None:
            return Fail(error)
        self.attempt += 1
        self._retarget(error, never_sent=never_sent)
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
        node_id = self._leaders.target(cluster_map, self.call.key)
        address = cluster_map.address_of(node_id)
        self._sent = Send(
            node_id=node_id,
            address=address,
            timeout=remaining,
            deadline=self.deadline,
            metadata=routed_metadata(cluster_map, self._metadata),
            lane=(address, cluster_map.epoch) if self._coalesce else None,
            limits=cluster_map.limits,
        )
        return self._sent

    def _retarget(self, error: KvError, *, never_sent: bool) -> None:
        """Where a retry goes when the key's partition has several replicas: the leader a
        NOT_LEADER refusal named, or after the node tried could not serve (unreachable, no
        leader yet), the next replica in ring order, which knows the leader or forwards."""
        sent, cluster_map = self._sent, self._map
        if sent is None or cluster_map is None or cluster_map.replication_factor < 2:
            return
        hinted = error.metadata.get("leader_id")
        if hinted is not None and hinted in self._unreachable:
            return  # stay on the replica that answered: it will learn the new leader
        if (
            hinted is not None
            and hinted != sent.node_id
            and self._leaders.learned(cluster_map, self.call.key, hinted)
        ):
            return
        if isinstance(error, UnavailableError):
            if never_sent:
                self._unreachable.add(sent.node_id)
            self._leaders.unreachable(cluster_map, self.call.key, sent.node_id)
