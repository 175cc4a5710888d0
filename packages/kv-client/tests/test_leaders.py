"""The client's table of partition leaders, and how one call follows a NOT_LEADER hint."""

from __future__ import annotations

import itertools

import grpc

from kv.v1 import kv_pb2
from kv_client import _calls, batch
from kv_client.call_run import CallRun, Send, Wait
from kv_client.errors import NotLeaderError, UnavailableError
from kv_client.leaders import Leaders
from kv_client.retry import RetryPolicy
from kv_common.cluster_map import ClusterMap, Member
from kv_common.wire import Reason

MEMBERS = tuple(Member(name, f"127.0.0.1:{port}") for port, name in enumerate("abc", 1))
MAP = ClusterMap.build(epoch=3, members=MEMBERS, partitions=16, replication_factor=3, vnodes=8)
KEY = b"some-key"
REPLICAS = MAP.placement.replicas_for_key(KEY)


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
    assert leaders.target(MAP, KEY) == REPLICAS[0]
    assert leaders.learned(MAP, KEY, REPLICAS[2])
    assert leaders.target(MAP, KEY) == REPLICAS[2]
    assert not leaders.learned(MAP, KEY, "not-a-replica")
    assert leaders.target(MAP, KEY) == REPLICAS[2]


def test_an_unreachable_node_passes_the_partition_to_the_next_replica() -> None:
    leaders = Leaders()
    assert leaders.unreachable(MAP, KEY, REPLICAS[0]) == REPLICAS[1]
    assert leaders.target(MAP, KEY) == REPLICAS[1]
    assert leaders.unreachable(MAP, KEY, REPLICAS[2]) == REPLICAS[0]


def test_a_new_map_epoch_forgets_every_leader() -> None:
    leaders = Leaders()
    leaders.learned(MAP, KEY, REPLICAS[1])
    newer = ClusterMap.build(
        epoch=4, members=MEMBERS, partitions=16, replication_factor=3, vnodes=8
    )
    assert leaders.target(newer, KEY) == REPLICAS[0]
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


def test_a_dead_leader_named_by_a_replica_is_not_tried_again_by_the_call() -> None:
    """kill -9 of a leader: the call cannot connect to it, and the next replica still names
    it (its failure detector has not fired yet). The call waits on that replica, past
    max_attempts, until it names the new leader, instead of bouncing back to the dead one."""
    leaders = Leaders()
    run = run_of(leaders, RetryPolicy(max_attempts=2))
    dead, survivor, successor = REPLICAS
    first = run.routed(MAP, 0.0)
    assert isinstance(first, Send) and first.node_id == dead
    refused = UnavailableError("connection refused", code=grpc.StatusCode.UNAVAILABLE)
    assert isinstance(run.failed(refused, never_sent=True, now=0.0), Wait)
    targets = []
    for attempt in range(4):
        sent = run.resume(0.1 * attempt)
        assert isinstance(sent, Send)
        targets.append(sent.node_id)
        assert isinstance(run.failed(not_leader(dead), never_sent=False, now=0.1), Wait)
    assert targets == [survivor] * 4
    sent = run.resume(0.5)
    assert isinstance(sent, Send) and sent.node_id == survivor
    assert isinstance(run.failed(not_leader(successor), never_sent=False, now=0.5), Wait)
    sent = run.resume(0.5)
    assert isinstance(sent, Send) and sent.node_id == successor


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
    assert leaders.target(hinted, KEY) == REPLICAS[2]
    assert leaders.learned(hinted, KEY, REPLICAS[1])
    assert leaders.target(hinted, KEY) == REPLICAS[1]  # what a node said last wins
    hints[partition] = "not-a-replica"
    odd = ClusterMap.build(
        epoch=9,
        members=MEMBERS,
        partitions=16,
        replication_factor=3,
        vnodes=8,
        leaders=tuple(hints),
    )
    assert Leaders().target(odd, KEY) == REPLICAS[0]


def test_a_batch_goes_to_each_partitions_leader() -> None:
    leaders = Leaders()
    keys = [b"key-%d" % i for i in range(40)]
    encoded = [batch.to_proto(batch.Put(k, b"v")) for k in keys]
    learned = set()
    for key in keys[:5]:
        assert leaders.learned(MAP, key, MAP.placement.replicas_for_key(key)[1])
        learned.add(MAP.placement.partition_of(key))
    chunks = batch.plan(MAP, encoded, range(len(keys)), max_ops=100, leaders=leaders)
    sent_to = {keys[i]: chunk.node_id for chunk in chunks for i in chunk.indexes}
    assert len(learned) < MAP.partitions and len(sent_to) == len(keys)
    for key in keys:
        replicas = MAP.placement.replicas_for_key(key)
        learned_here = MAP.placement.partition_of(key) in learned
        assert sent_to[key] == (replicas[1] if learned_here else replicas[0]), key
