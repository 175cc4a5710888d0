"""The client's table of partition leaders, and how one call follows a NOT_LEADER hint."""

from __future__ import annotations

import itertools

import grpc

from kv.v1 import kv_pb2
from kv_client import _calls, batch
from kv_client.call_run import CallRun, Fail, Send, Wait
from kv_client.errors import NotLeaderError, OverloadedError, ShuttingDownError, UnavailableError
from kv_client.leaders import SUSPECT_SECONDS, Leaders
from kv_client.retry import FAILOVER_MAX_PAUSE, NO_RETRY, RetryPolicy
from kv_common.cluster_map import ClusterMap, Member
from kv_common.wire import Reason

MEMBERS = tuple(Member(name, f"127.0.0.1:{port}") for port, name in enumerate("abc", 1))
MAP = ClusterMap.build(epoch=3, members=MEMBERS, partitions=16, replication_factor=3, vnodes=8)
KEY = b"some-key"
REPLICAS = MAP.placement.replicas_for_key(KEY)
PATIENCE = 0.5
PATIENT = RetryPolicy(patience=PATIENCE)
ONE_COPY = ClusterMap.build(epoch=3, members=MEMBERS, partitions=16, replication_factor=1, vnodes=8)


def not_leader(leader: str | None) -> NotLeaderError:
    metadata = {"partition": "0"} | ({"leader_id": leader} if leader else {})
    return NotLeaderError(
        "not the leader",
        code=grpc.StatusCode.UNAVAILABLE,
        reason=Reason.NOT_LEADER,
        metadata=metadata,
    )


def test_the_owner_until_a_leader_is_learned_then_the_leader() -> None:
    leaders = Leaders()
    assert leaders.target(MAP, KEY, now=0.0) == REPLICAS[0]
    assert leaders.learned(MAP, KEY, REPLICAS[2], now=0.0)
    assert leaders.target(MAP, KEY, now=0.0) == REPLICAS[2]
    assert not leaders.learned(MAP, KEY, "not-a-replica", now=0.0)
    assert leaders.target(MAP, KEY, now=0.0) == REPLICAS[2]


def test_an_unreachable_node_passes_the_partition_to_the_next_replica() -> None:
    leaders = Leaders()
    assert leaders.unreachable(MAP, KEY, REPLICAS[0]) == REPLICAS[1]
    assert leaders.target(MAP, KEY, now=0.0) == REPLICAS[1]
    assert leaders.unreachable(MAP, KEY, REPLICAS[2]) == REPLICAS[0]


def test_a_new_map_epoch_forgets_every_leader() -> None:
    leaders = Leaders()
    leaders.learned(MAP, KEY, REPLICAS[1], now=0.0)
    newer = ClusterMap.build(
        epoch=4, members=MEMBERS, partitions=16, replication_factor=3, vnodes=8
    )
    assert leaders.target(newer, KEY, now=0.0) == REPLICAS[0]
    assert leaders.known() == 0


def run_of(leaders: Leaders, policy: RetryPolicy | None = None) -> CallRun[int]:
    run = CallRun(
        _calls.put(KEY, b"v"),
        policy=policy or RetryPolicy(),
        budget=5.0,
        now=0.0,
        metadata=None,
        coalesce=False,
        leaders=leaders,
    )
    run.start()
    return run


def start(leaders: Leaders) -> Send:
    sent = run_of(leaders).routed(MAP, 0.0)
    assert isinstance(sent, Send)
    return sent


def test_a_put_follows_the_named_leader_at_once_and_the_client_remembers_it() -> None:
    leaders = Leaders()
    run = run_of(leaders)
    first = run.routed(MAP, 0.0)
    assert isinstance(first, Send) and first.node_id == REPLICAS[0]
    pause = run.failed(not_leader(REPLICAS[1]), never_sent=False, now=0.1)
    assert pause == Wait(0.0)  # the put did not run: resent at once, even unconditional
    second = run.resume(0.1)
    assert isinstance(second, Send) and second.node_id == REPLICAS[1]
    assert run.replied(kv_pb2.PutResponse(succeeded=True, version=9)).value == 9
    assert start(leaders).node_id == REPLICAS[1]  # the next call goes there directly


def test_no_leader_yet_backs_off_and_tries_the_next_replica() -> None:
    leaders = Leaders()
    run = run_of(leaders, RetryPolicy(max_attempts=2))
    run.routed(MAP, 0.0)
    waits, targets = [], []
    for attempt in range(5):  # beyond max_attempts: an election is waited out, to the deadline
        action = run.failed(not_leader(None), never_sent=False, now=0.1 * attempt)
        assert isinstance(action, Wait) and action.seconds > 0
        waits.append(action.seconds)
        sent = run.resume(0.1 * attempt)
        assert isinstance(sent, Send)
        targets.append(sent.node_id)
    assert waits == sorted(waits)
    # A node that knows no leader passes the call on to the next replica, in ring order.
    following = {r: REPLICAS[(i + 1) % len(REPLICAS)] for i, r in enumerate(REPLICAS)}
    assert targets[0] == REPLICAS[1]
    assert all(following[a] == b for a, b in itertools.pairwise(targets))


def unsent() -> UnavailableError:
    return UnavailableError("failed to connect to all addresses; Connection refused")


def test_a_node_that_refused_a_connect_is_avoided_and_not_followed_when_named() -> None:
    """A restarting leader refuses connects, and its followers still name it for a moment:
    the put goes round the other replicas (with backoff) instead of back to it, even with
    retries off, since it never ran (failover, not a retry)."""
    leaders = Leaders()
    run = run_of(leaders, NO_RETRY)
    first = run.routed(MAP, 0.0)
    assert isinstance(first, Send) and first.node_id == REPLICAS[0]
    assert run.failed(unsent(), never_sent=True, now=0.0) == Wait(0.05)
    second = run.resume(0.05)
    assert isinstance(second, Send) and second.node_id == REPLICAS[1]
    backoff = run.failed(not_leader(REPLICAS[0]), never_sent=False, now=0.06)
    assert isinstance(backoff, Wait) and backoff.seconds > 0  # the hint is not followed
    third = run.resume(0.2)
    assert isinstance(third, Send) and third.node_id == REPLICAS[2]
    assert start(leaders).node_id != REPLICAS[0]  # other calls avoid it too...
    assert run.failed(not_leader(REPLICAS[0]), never_sent=False, now=SUSPECT_SECONDS + 0.1)
    assert leaders.target(MAP, KEY, now=SUSPECT_SECONDS + 0.1) == REPLICAS[0]  # ...for a while


def test_a_shutting_down_refusal_goes_to_another_replica_even_without_retries() -> None:
    leaders = Leaders()
    run = run_of(leaders, NO_RETRY)
    run.routed(MAP, 0.0)
    draining = ShuttingDownError("draining", reason=Reason.SHUTTING_DOWN)
    assert isinstance(run.failed(draining, never_sent=False, now=0.0), Wait)
    # The node is going: other calls keep away from it (its server's own stop would cancel
    # them, which reads as an unknown outcome).
    assert leaders.is_suspect(REPLICAS[0], 0.0)
    busy = OverloadedError("busy", reason=Reason.OVERLOADED)
    assert isinstance(run.resume(0.1), Send)
    assert isinstance(run.failed(busy, never_sent=False, now=0.1), Fail)  # bounded: 1 attempt


def test_the_final_error_says_never_ran_only_when_no_attempt_may_have_run() -> None:
    gone = run_of(Leaders(), RetryPolicy(max_attempts=1))
    gone.routed(ONE_COPY, 0.0)
    failed = gone.failed(unsent(), never_sent=True, now=0.0)
    assert isinstance(failed, Fail) and failed.error.never_ran
    cas = CallRun(
        _calls.put_if_version(KEY, b"v", 3),
        policy=RetryPolicy(max_attempts=2),
        budget=5.0,
        now=0.0,
        metadata=None,
        coalesce=False,
    )
    cas.start()
    cas.routed(ONE_COPY, 0.0)
    assert isinstance(cas.failed(UnavailableError("reset"), never_sent=False, now=0.0), Wait)
    assert isinstance(cas.resume(0.1), Send)
    last = cas.failed(unsent(), never_sent=True, now=0.1)
    assert isinstance(last, Fail) and not last.error.never_ran  # the first may have applied


def test_a_slow_attempt_makes_its_node_suspect_a_read_goes_elsewhere_a_put_waits() -> None:
    leaders = Leaders()
    get = CallRun(
        _calls.get(KEY),
        policy=PATIENT,
        budget=5.0,
        now=0.0,
        metadata=None,
        coalesce=False,
        leaders=leaders,
    )
    get.start()
    sent = get.routed(MAP, 0.0)
    assert isinstance(sent, Send) and sent.abandon
    assert sent.patience == PATIENCE and sent.node_id == REPLICAS[0]
    assert isinstance(get.slow(PATIENCE), Wait)  # abandoned: sent again elsewhere
    again = get.resume(PATIENCE + 0.05)
    assert isinstance(again, Send) and again.node_id != REPLICAS[0]

    leaders = Leaders()
    put = run_of(leaders, PATIENT)
    sent = put.routed(MAP, 0.0)
    assert isinstance(sent, Send) and not sent.abandon and sent.patience == PATIENCE
    assert put.slow(PATIENCE) is None  # an unconditional write is waited for...
    assert start(leaders).node_id != REPLICAS[0]  # ...while other calls go elsewhere
    put.replied(kv_pb2.PutResponse(succeeded=True, version=2))
    assert start(leaders).node_id == REPLICAS[0]  # it answered: no longer suspect


def test_by_default_latency_alone_suspects_nobody() -> None:
    sent = start(Leaders())
    assert sent.patience is None and not sent.abandon


def test_a_connection_lost_under_a_call_makes_its_node_suspect_a_refusal_does_not() -> None:
    """A frozen node's connection ends by keepalive (UNAVAILABLE, no reason from the node):
    the put's outcome is unknown (not resent), and the next calls go to another replica."""
    leaders = Leaders()
    run = run_of(leaders)
    run.routed(MAP, 0.0)
    lost = UnavailableError("Stream removed (ping timeout)", code=grpc.StatusCode.UNAVAILABLE)
    failed = run.failed(lost, never_sent=False, now=1.0)
    assert isinstance(failed, Fail) and not failed.error.never_ran
    assert leaders.target(MAP, KEY, now=1.0) != REPLICAS[0]
    refused = Leaders()
    other = run_of(refused)
    other.routed(MAP, 0.0)
    other.failed(not_leader(None), never_sent=False, now=1.0)
    assert not refused.is_suspect(REPLICAS[0], 1.0)


def test_one_copy_has_no_patience_there_is_nowhere_else_to_go() -> None:
    run = run_of(Leaders())
    sent = run.routed(ONE_COPY, 0.0)
    assert isinstance(sent, Send) and sent.patience is None and not sent.abandon


def test_nodes_that_disagree_about_the_leader_cost_pauses_of_at_most_a_few_ticks() -> None:
    """During a hand-off the old leader names the replica taking over, which still names the
    old leader for a moment: the call bounces, and its pauses stay short enough to catch the
    move as soon as it is over (not a backoff grown to a second)."""
    run = run_of(Leaders())
    run.routed(MAP, 0.0)
    now, pauses = 0.0, []
    for bounce in range(8):
        named = REPLICAS[(bounce + 1) % 2]  # each names the other
        action = run.failed(not_leader(named), never_sent=False, now=now)
        assert isinstance(action, Wait)
        pauses.append(action.seconds)
        now += action.seconds
        assert isinstance(run.resume(now), Send)
    assert pauses[0] == 0.0
    assert max(pauses) == FAILOVER_MAX_PAUSE
    assert now < 8 * FAILOVER_MAX_PAUSE


def test_the_maps_leader_hints_stand_in_until_a_leader_is_learned() -> None:
    partition = MAP.placement.partition_of(KEY)
    hints = [""] * MAP.partitions
    hints[partition] = REPLICAS[2]
    hinted = ClusterMap.build(
        epoch=MAP.epoch,
        members=MEMBERS,
        partitions=16,
        replication_factor=3,
        vnodes=8,
        leaders=tuple(hints),
    )
    leaders = Leaders()
    assert leaders.target(hinted, KEY, now=0.0) == REPLICAS[2]
    assert leaders.learned(hinted, KEY, REPLICAS[1], now=0.0)
    assert leaders.target(hinted, KEY, now=0.0) == REPLICAS[1]  # what a node said last wins
    hints[partition] = "not-a-replica"
    odd = ClusterMap.build(
        epoch=9,
        members=MEMBERS,
        partitions=16,
        replication_factor=3,
        vnodes=8,
        leaders=tuple(hints),
    )
    assert Leaders().target(odd, KEY, now=0.0) == REPLICAS[0]


def test_a_batch_goes_to_each_partitions_leader() -> None:
    leaders = Leaders()
    keys = [b"key-%d" % i for i in range(40)]
    encoded = [batch.to_proto(batch.Put(k, b"v")) for k in keys]
    learned = set()
    for key in keys[:5]:
        assert leaders.learned(MAP, key, MAP.placement.replicas_for_key(key)[1], now=0.0)
        learned.add(MAP.placement.partition_of(key))
    chunks = batch.plan(MAP, encoded, range(len(keys)), max_ops=100, leaders=leaders)
    sent_to = {keys[i]: chunk.node_id for chunk in chunks for i in chunk.indexes}
    assert len(learned) < MAP.partitions and len(sent_to) == len(keys)
    for key in keys:
        replicas = MAP.placement.replicas_for_key(key)
        learned_here = MAP.placement.partition_of(key) in learned
        assert sent_to[key] == (replicas[1] if learned_here else replicas[0]), key
