"""Tests for kv_node.replication.transport: real grpc.aio servers on 127.0.0.1, in one process.

Every wait is for an event that a transport callback fires (``Recorder.until``), bounded by
``EVENT_TIMEOUT``; no test sleeps to synchronise. Intervals are short so that liveness and
backoff play out in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import pytest

from kv.raft.v1 import raft_pb2
from kv_common.cluster_map import ClusterMap, Member
from kv_common.fingerprint import map_fingerprint
from kv_node.replication import transport as transport_module
from kv_node.replication.chunks import OutgoingSnapshot
from kv_node.replication.codec import CodecError, encode_message
from kv_node.replication.transport import (
    STREAM_METHOD,
    PeerTransport,
    TransportConfig,
    raft_node_ids,
)
from kv_raft import ConfState, Entry, Message, MessageType, Snapshot, SnapshotMeta

EVENT_TIMEOUT = 10.0
TEST_TIMEOUT = 60.0
HEARTBEAT = 0.02
DEAD_AFTER = 0.15
BACKOFF_MAX = 0.2
PARTITIONS = 8
BASE_CONFIG: dict[str, Any] = {
    "heartbeat_interval": HEARTBEAT,
    "dead_after": DEAD_AFTER,
    "backoff_max": BACKOFF_MAX,
}

Items = list[tuple[int, Message]]


class Recorder:
    """What one transport reported through its callbacks, and a way to wait for it."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, Items]] = []
        self.peer_states: list[tuple[int, bool]] = []
        self.link_states: list[tuple[int, bool]] = []
        self.dropped: list[tuple[int, Items]] = []
        self.mismatches: list[tuple[int, str]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def messages_from(self, peer: int) -> list[Message]:
        return [m for frm, items in self.batches if frm == peer for _, m in items]

    def on_batch(self, peer: int, items: Items) -> None:
        self.batches.append((peer, items))
        self._changed()

    def on_peer_state(self, peer: int, alive: bool) -> None:
        self.peer_states.append((peer, alive))
        self._changed()

    def on_link_state(self, peer: int, connected: bool) -> None:
        self.link_states.append((peer, connected))
        self._changed()

    def on_dropped(self, peer: int, items: Sequence[tuple[int, Message]]) -> None:
        self.dropped.append((peer, list(items)))
        self._changed()

    def on_map_mismatch(self, peer: int, line: str) -> None:
        self.mismatches.append((peer, line))
        self._changed()

    def _changed(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)
        self._waiters = [(p, f) for p, f in self._waiters if not f.done()]

    async def until(self, predicate: Callable[[], bool], timeout: float = EVENT_TIMEOUT) -> None:
        if predicate():
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        async with asyncio.timeout(timeout):
            await future


@dataclass
class Node:
    raft_id: int
    address: str
    server: grpc.aio.Server
    transport: PeerTransport
    recorder: Recorder


@dataclass
class Cluster:
    """Servers bound first (free ports picked by the OS), then the map, then transports."""

    ports: list[int]
    cluster_map: ClusterMap
    nodes: dict[int, Node] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def bind(cls, size: int, **options: Any) -> Cluster:
        servers = [grpc.aio.server() for _ in range(size)]
        ports = [server.add_insecure_port("127.0.0.1:0") for server in servers]
        cluster = cls(ports, make_map(ports), options=options)
        for raft_id, server in enumerate(servers, start=1):
            await cluster.start(raft_id, server)
        return cluster

    async def start(
        self,
        raft_id: int,
        server: grpc.aio.Server | None = None,
        cluster_map: ClusterMap | None = None,
    ) -> Node:
        address = f"127.0.0.1:{self.ports[raft_id - 1]}"
        if server is None:
            server = grpc.aio.server()
            server.add_insecure_port(address)
        recorder = Recorder()
        transport = PeerTransport(
            raft_id,
            cluster_map or self.cluster_map,
            recorder.on_batch,
            recorder.on_peer_state,
            on_dropped=recorder.on_dropped,
            on_link_state=recorder.on_link_state,
            on_map_mismatch=recorder.on_map_mismatch,
            config=TransportConfig(**{**BASE_CONFIG, **self.options}),
        )
        transport.add_to_server(server)
        await server.start()
        transport.start()
        node = Node(raft_id, address, server, transport, recorder)
        self.nodes[raft_id] = node
        return node

    async def stop(self, raft_id: int) -> None:
        node = self.nodes.pop(raft_id)
        await node.transport.close()
        await node.server.stop(None)

    async def stop_all(self) -> None:
        for raft_id in list(self.nodes):
            await self.stop(raft_id)

    async def connected(self, a: int, b: int) -> None:
        """Both streams between a and b are up."""
        for x, y in ((a, b), (b, a)):
            transport = self.nodes[x].transport
            await self.nodes[x].recorder.until(partial(transport.connected, y))


def make_map(ports: list[int], *, partitions: int = PARTITIONS) -> ClusterMap:
    return ClusterMap.build(
        epoch=1,
        members=tuple(Member(f"n{i + 1}", f"127.0.0.1:{port}") for i, port in enumerate(ports)),
        partitions=partitions,
        replication_factor=min(3, len(ports)),
        vnodes=4,
    )


def received(recorder: Recorder, sender: int, count: int) -> bool:
    return len(recorder.messages_from(sender)) == count


def append(frm: int, to: int, index: int, data: bytes = b"") -> Message:
    entries = (Entry(term=1, index=index, data=data),) if data else ()
    return Message(MessageType.APPEND, to=to, frm=frm, term=1, index=index, entries=entries)


def run(scenario: Callable[[AsyncExitStack], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            await scenario(stack)

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


async def cluster_of(stack: AsyncExitStack, size: int, **options: Any) -> Cluster:
    cluster = await Cluster.bind(size, **options)
    stack.push_async_callback(cluster.stop_all)
    return cluster


def test_raft_node_ids_follow_sorted_member_ids() -> None:
    cluster_map = ClusterMap.build(
        epoch=1,
        members=(Member("b", "h:2"), Member("c", "h:3"), Member("a", "h:1")),
        partitions=4,
        replication_factor=1,
        vnodes=1,
    )
    assert raft_node_ids(cluster_map) == {"a": 1, "b": 2, "c": 3}


def test_delivery_in_order_on_each_stream() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 3)
        await cluster.connected(1, 2)
        await cluster.connected(1, 3)
        count = 300
        for i in range(count):
            cluster.nodes[1].transport.send(2, [(i % PARTITIONS, append(1, 2, i))])
            cluster.nodes[1].transport.send(3, [(0, append(1, 3, i))])
            cluster.nodes[3].transport.send(1, [(1, append(3, 1, i))])
            if i % 50 == 0:
                await asyncio.sleep(0)  # let frames leave between sends too
        for receiver, sender in ((2, 1), (3, 1), (1, 3)):
            recorder = cluster.nodes[receiver].recorder
            await recorder.until(partial(received, recorder, sender, count))
            assert [m.index for m in recorder.messages_from(sender)] == list(range(count))
        groups = [g for frm, items in cluster.nodes[2].recorder.batches for g, _ in items]
        assert groups == [i % PARTITIONS for i in range(count)]
        assert not any(r.dropped for r in (n.recorder for n in cluster.nodes.values()))

    run(scenario)


def test_many_sends_leave_in_few_bounded_frames() -> None:
    max_frame_messages = 100

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2, max_frame_messages=max_frame_messages)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        count = 2000
        for i in range(count):
            a.transport.send(2, [(0, append(1, 2, i))])
        await b.recorder.until(lambda: len(b.recorder.messages_from(1)) == count)
        sizes = [len(items) for _, items in b.recorder.batches]
        assert max(sizes) == max_frame_messages
        assert len(sizes) <= 2 * count // max_frame_messages
        assert a.transport.stats.messages_sent == count

    run(scenario)


def test_frames_are_bounded_in_bytes() -> None:
    max_frame_bytes = 16 * 1024
    payload = b"x" * 3000

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2, max_frame_bytes=max_frame_bytes)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        a.transport.send(2, [(0, append(1, 2, i, payload)) for i in range(50)])
        await b.recorder.until(lambda: len(b.recorder.messages_from(1)) == 50)
        for _, items in b.recorder.batches:
            frame = raft_pb2.Batch(
                messages=[
                    raft_pb2.GroupMessage(group_id=g, message=encode_message(m)) for g, m in items
                ]
            )
            assert frame.ByteSize() <= max_frame_bytes
        assert len(b.recorder.batches) >= 50 * len(payload) // max_frame_bytes

    run(scenario)


def test_queue_bound_drops_and_reports_the_excess() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2, max_queue_messages=10)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        a.transport.send(2, [(3, append(1, 2, i)) for i in range(25)])  # no await: no draining
        assert a.transport.stats.messages_dropped == 15
        assert [(peer, [m.index for _, m in items]) for peer, items in a.recorder.dropped] == [
            (2, list(range(10, 25)))
        ]
        await b.recorder.until(lambda: len(b.recorder.messages_from(1)) == 10)
        assert [m.index for m in b.recorder.messages_from(1)] == list(range(10))

    run(scenario)


def test_send_to_a_stranger_is_a_bug_but_to_a_down_peer_is_not() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2)
        await cluster.connected(1, 2)
        a = cluster.nodes[1]
        with pytest.raises(ValueError, match="not a peer"):
            a.transport.send(7, [(0, append(1, 7, 0))])
        with pytest.raises(ValueError, match="not a peer"):
            a.transport.send(1, [(0, append(1, 1, 0))])
        await cluster.stop(2)
        await a.recorder.until(lambda: (2, False) in a.recorder.link_states)
        a.transport.send(2, [(0, append(1, 2, 0))])
        assert a.transport.stats.messages_dropped == 1

    run(scenario)


def test_reconnects_after_the_peer_restarts() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2)
        await cluster.connected(1, 2)
        a = cluster.nodes[1]
        a.transport.send(2, [(0, append(1, 2, 0))])
        await cluster.nodes[2].recorder.until(
            lambda: len(cluster.nodes[2].recorder.messages_from(1)) == 1
        )
        await cluster.stop(2)
        await a.recorder.until(lambda: (2, False) in a.recorder.link_states)
        dropped_before = a.transport.stats.messages_dropped
        a.transport.send(2, [(1, append(1, 2, i)) for i in range(1, 6)])
        assert a.transport.stats.messages_dropped == dropped_before + 5
        assert [m.index for _, m in a.recorder.dropped[-1][1]] == [1, 2, 3, 4, 5]

        b = await cluster.start(2)
        await a.recorder.until(lambda: a.recorder.link_states[-1] == (2, True))
        a.transport.send(2, [(1, append(1, 2, i)) for i in range(6, 9)])
        await b.recorder.until(lambda: len(b.recorder.messages_from(1)) == 3)
        assert [m.index for m in b.recorder.messages_from(1)] == [6, 7, 8]
        assert a.transport.stats.connects >= 2

    run(scenario)


def test_a_peer_restarted_faster_than_dead_after_is_reported_dead_then_alive() -> None:
    """A restart inside ``dead_after`` leaves no silence to notice; the new incarnation in the
    restarted peer's Hello is what tells the others (so its groups elect again at once)."""

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2, dead_after=30.0, heartbeat_interval=0.05)
        await cluster.connected(1, 2)
        a = cluster.nodes[1]
        first = cluster.nodes[2].transport.incarnation
        assert a.recorder.peer_states == [(2, True)]
        await cluster.stop(2)
        b = await cluster.start(2)
        assert b.transport.incarnation not in (0, first)
        await a.recorder.until(lambda: a.recorder.peer_states[-2:] == [(2, False), (2, True)])
        assert a.recorder.peer_states == [(2, True), (2, False), (2, True)]
        assert a.transport.stats.peer_restarts == 1
        assert a.transport.alive(2)

    run(scenario)


def test_a_different_map_is_refused_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="kv_node.replication.transport")

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2)
        await cluster.connected(1, 2)
        await cluster.stop(2)
        other_map = make_map(cluster.ports, partitions=PARTITIONS * 2)
        b = await cluster.start(2, cluster_map=other_map)
        a = cluster.nodes[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        refusals = 3
        for node in (a, b):
            stats = node.transport.stats
            await node.recorder.until(lambda: stats.map_mismatches_refused >= refusals)  # noqa: B023
        elapsed = loop.time() - started
        # Retried at the capped backoff, not in a hot loop.
        assert elapsed >= (refusals - 1) * BACKOFF_MAX
        assert b.transport.stats.map_mismatches_refused_by_peer >= refusals - 1
        assert a.transport.stats.map_mismatches_refused_by_peer >= refusals - 1
        assert not a.transport.connected(2) and not b.transport.connected(1)
        assert {peer for peer, _ in a.recorder.mismatches} == {2}
        assert {peer for peer, _ in b.recorder.mismatches} == {1}
        assert not a.transport.alive(2) and not b.transport.alive(1)
        a.transport.send(2, [(0, append(1, 2, 0))])
        assert a.transport.stats.messages_dropped >= 1
        assert not b.recorder.batches

    run(scenario)
    small, large = "8 partitions, 4 vnodes, RF 2", "16 partitions, 4 vnodes, RF 2"
    lines = [r.getMessage() for r in caplog.records]
    # n1 (8 partitions) and n2 (16) each refuse the other's stream and learn that the other
    # refused theirs: two lines per side although the refusals repeat (a line is logged when
    # it changes, and counted every time).
    for prefix, ours, theirs in (("peer n2 at", small, large), ("peer n1 at", large, small)):
        side = sorted(line for line in lines if line.startswith(prefix + " 127.0.0.1:"))
        assert len(side) == 2, lines
        for line in side:
            assert "serves a different cluster map" in line
            head, tail = line.split("; ours ")
            assert theirs in head.split("theirs ")[1] and ours in tail
        assert sum("it refused our stream: FAILED_PRECONDITION" in line for line in side) == 1


def test_liveness_follows_frames() -> None:
    # Roomier intervals than the other tests: a false death here would be a loop stall on a
    # loaded machine, not a bug, and this test asserts that none happens.
    heartbeat, dead_after, observed = 0.04, 0.4, 1.2

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2, heartbeat_interval=heartbeat, dead_after=dead_after)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        await a.recorder.until(lambda: a.transport.alive(2))
        assert a.recorder.peer_states == [(2, True)]
        # Idle: only heartbeats flow, and they keep the peer alive. This sleep is the length of
        # the observation (nothing may happen during it), not a synchronisation.
        beats = b.transport.stats.heartbeats_sent
        await asyncio.sleep(observed)
        assert a.recorder.peer_states == [(2, True)] and a.transport.alive(2)
        # At least one per dead_after (what kept it alive), whatever the machine's load;
        # the rate itself is a benchmark's business, not a test's.
        assert b.transport.stats.heartbeats_sent >= beats + int(observed / dead_after)

        loop = asyncio.get_running_loop()
        stopped = loop.time()
        await cluster.stop(2)
        await a.recorder.until(lambda: a.recorder.peer_states[-1] == (2, False))
        assert loop.time() - stopped >= dead_after - heartbeat
        assert not a.transport.alive(2)

        await cluster.start(2)
        await a.recorder.until(lambda: a.recorder.peer_states[-1] == (2, True))
        assert a.recorder.peer_states == [(2, True), (2, False), (2, True)]
        assert a.transport.alive(2)

    run(scenario)


async def raw_stream(address: str, requests: list[bytes]) -> grpc.StatusCode:
    """Send raw request bytes as a peer would, and return how the receiver ended the call."""
    async with grpc.aio.insecure_channel(address) as channel:
        method: grpc.aio.StreamStreamMultiCallable[bytes, bytes]
        method = channel.stream_stream(STREAM_METHOD)
        call = method(iter(requests), timeout=EVENT_TIMEOUT)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return await call.code()


def hello_from(cluster: Cluster, raft_id: int) -> bytes:
    fingerprint = map_fingerprint(cluster.cluster_map)
    hello = raft_pb2.Hello(
        node_id=raft_id,
        member_id=f"n{raft_id}",
        map_fingerprint=fingerprint.digest,
        map_description=fingerprint.description,
        address=f"127.0.0.1:{cluster.ports[raft_id - 1]}",
    )
    return raft_pb2.StreamRequest(hello=hello).SerializeToString()


def batch_of(*items: tuple[int, Message]) -> bytes:
    batch = raft_pb2.Batch(
        messages=[raft_pb2.GroupMessage(group_id=g, message=encode_message(m)) for g, m in items]
    )
    return raft_pb2.StreamRequest(batch=batch).SerializeToString()


def test_hostile_streams_are_refused_and_the_receiver_keeps_serving() -> None:
    garbage_item = b"\x12\x05\x0a\x03\xff\xff\xff"  # a batch whose one message is garbage

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 3)
        await cluster.connected(1, 2)
        a = cluster.nodes[1]
        hello = hello_from(cluster, 3)
        cases = {
            "no Hello first": [batch_of((0, append(3, 1, 0)))],
            "garbage first": [b"\xff\xff\xff\xff"],
            "garbage in the batch": [hello, garbage_item],
            "a second Hello": [hello, hello],
            "forged sender": [hello, batch_of((0, append(2, 1, 0)))],
            "not for us": [hello, batch_of((0, append(3, 2, 0)))],
            "group out of range": [hello, batch_of((PARTITIONS, append(3, 1, 0)))],
            "a stranger's Hello": [hello.replace(b"n3", b"n9")],
        }
        for name, requests in cases.items():
            before = a.transport.stats.invalid_streams
            code = await raw_stream(a.address, requests)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert a.transport.stats.invalid_streams == before + 1, name
        assert not any(peer == 3 for peer, _ in a.recorder.batches)
        # Still serving its real peers.
        cluster.nodes[2].transport.send(1, [(0, append(2, 1, 42))])
        await a.recorder.until(lambda: [m.index for m in a.recorder.messages_from(2)] == [42])

    run(scenario)


def test_close_leaves_no_task_and_no_open_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[grpc.aio.Channel] = []
    closed: list[grpc.aio.Channel] = []
    real_channel = grpc.aio.insecure_channel

    def recording_channel(target: str, options: Any = None) -> grpc.aio.Channel:
        channel = real_channel(target, options=options)
        real_close = channel.close

        async def close(grace: float | None = None) -> None:
            closed.append(channel)
            await real_close(grace)

        channel.close = close  # type: ignore[method-assign]
        opened.append(channel)
        return channel

    monkeypatch.setattr(grpc.aio, "insecure_channel", recording_channel)

    async def scenario(stack: AsyncExitStack) -> None:
        before = asyncio.all_tasks()
        cluster = await Cluster.bind(3)
        try:
            await cluster.connected(1, 2)
            await cluster.connected(2, 3)
            cluster.nodes[1].transport.send(2, [(0, append(1, 2, 0))])
            assert len(asyncio.all_tasks() - before) >= 3 * 3  # 2 senders + a watchdog each
        finally:
            await cluster.stop_all()
        await asyncio.sleep(0)  # one loop turn for gRPC's own done-callbacks (no time passes)
        assert asyncio.all_tasks() - before == set()

    run(scenario)
    assert len(opened) == 6
    assert {id(c) for c in opened} == {id(c) for c in closed}


def test_a_stream_that_never_says_hello_is_ended() -> None:
    async def silent(release: asyncio.Event) -> AsyncIterator[bytes]:
        await release.wait()
        yield b""

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2, connect_timeout=0.2)
        release = asyncio.Event()
        async with grpc.aio.insecure_channel(cluster.nodes[1].address) as channel:
            method: grpc.aio.StreamStreamMultiCallable[bytes, bytes]
            method = channel.stream_stream(STREAM_METHOD)
            call = method(silent(release), timeout=EVENT_TIMEOUT)
            # Ended by the receiver's Hello deadline, long before the call's own deadline.
            async with asyncio.timeout(EVENT_TIMEOUT / 5):
                assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            release.set()

    run(scenario)


class BlockedContext:
    """Stands in for a grpc.aio servicer context whose client never sends anything."""

    def __init__(self) -> None:
        self.aborted: grpc.StatusCode | None = None
        self._never = asyncio.Event()

    async def read(self) -> bytes:
        await self._never.wait()
        raise AssertionError("unreachable")

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = code
        raise RuntimeError(details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def test_inbound_streams_are_bounded() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster_map = make_map([1, 2, 3])
        transport = PeerTransport(1, cluster_map, lambda p, i: None, lambda p, a: None)
        serve: Any = transport._serve_stream  # the handler that add_to_server registers
        limit = 2 * 2 + 4  # two per peer and four spare: see INBOUND_STREAMS_PER_PEER
        held = [asyncio.create_task(serve(None, BlockedContext())) for _ in range(limit)]
        await asyncio.sleep(0)  # one loop turn: each handler has counted itself (no time passes)
        refused = BlockedContext()
        with pytest.raises(RuntimeError, match="too many"):
            await serve(None, refused)
        assert refused.aborted == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert transport.stats.inbound_streams_refused == 1
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        admitted = BlockedContext()
        task = asyncio.create_task(serve(None, admitted))
        await asyncio.sleep(0)
        assert admitted.aborted is None and transport.stats.inbound_streams_refused == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario)


def test_a_message_above_the_frame_size_goes_alone_and_one_above_the_limit_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport_module, "MAX_MESSAGE_BYTES", 200_000)

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2, max_frame_bytes=16 * 1024)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        a.transport.send(
            2,
            [
                (0, append(1, 2, 1, b"s" * 100)),
                (0, append(1, 2, 2, b"L" * 100_000)),  # above a frame, below the limit
                (0, append(1, 2, 3, b"X" * 300_000)),  # above the limit
                (0, append(1, 2, 4, b"s" * 100)),
            ],
        )
        await b.recorder.until(lambda: len(b.recorder.messages_from(1)) == 3)
        assert [[m.index for _, m in items] for _, items in b.recorder.batches] == [[1], [2], [4]]
        assert [[m.index for _, m in items] for _, items in a.recorder.dropped] == [[3]]
        assert a.transport.stats.messages_dropped == 1

    run(scenario)


@pytest.mark.parametrize(
    "bad",
    [
        {"heartbeat_interval": 1.0, "dead_after": 1.0},
        {"heartbeat_interval": 0.0},
        {"backoff_initial": 3.0, "backoff_max": 2.0},
        {"connect_timeout": 0.0},
        {"max_queue_messages": 0},
        {"max_frame_bytes": 10**9},
    ],
)
def test_config_that_cannot_work_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        TransportConfig(**bad).validate()


def test_a_failing_callback_is_logged_and_survived(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        recorded = b.recorder.on_batch

        def record_then_fail(peer: int, items: Items) -> None:
            recorded(peer, items)
            raise RuntimeError("a bug in the runtime")

        b.transport._on_batch = record_then_fail  # the runtime's callback, replaced for the test
        connects = a.transport.stats.connects
        a.transport.send(2, [(0, append(1, 2, 1))])
        await b.recorder.until(lambda: len(b.recorder.messages_from(1)) == 1)
        a.transport.send(2, [(0, append(1, 2, 2))])
        await b.recorder.until(lambda: len(b.recorder.messages_from(1)) == 2)
        assert [m.index for m in b.recorder.messages_from(1)] == [1, 2]
        assert a.transport.stats.connects == connects  # the same stream carried both

    run(scenario)
    assert any("callback" in r.getMessage() and r.exc_info for r in caplog.records)


def test_hostile_hellos_cannot_flood_logs_or_memory(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="kv_node.replication.transport")

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2)
        a = cluster.nodes[1]
        for made_up_id in range(1000, 1020):
            hello = raft_pb2.Hello(
                node_id=made_up_id,
                member_id="m" * 50_000,
                map_fingerprint=b"not ours",
                map_description="d" * 200_000,
                address="a" * 50_000,
            )
            request = raft_pb2.StreamRequest(hello=hello).SerializeToString()
            assert await raw_stream(a.address, [request]) == grpc.StatusCode.FAILED_PRECONDITION
        assert a.transport.stats.map_mismatches_refused == 20
        assert len(a.transport._refusals_logged) == 1  # one slot for all strangers

    run(scenario)
    lines = [r.getMessage() for r in caplog.records if "different cluster map" in r.getMessage()]
    assert len(lines) == 1  # the same (truncated) line each time: logged once
    assert len(lines[0]) < 4 * transport_module.MAX_SHOWN_CHARS


# ---- snapshots, which travel in chunks


def snapshot_to(to: int, frm: int, data: bytes, *, index: int = 5) -> Message:
    meta = SnapshotMeta(index=index, term=1, conf_state=ConfState(voters=frozenset({1, 2})))
    return Message(MessageType.SNAPSHOT, to=to, frm=frm, term=1, snapshot=Snapshot(meta, data))


def test_a_snapshot_above_the_message_limit_travels_in_chunks_beside_other_groups() -> None:
    size = transport_module.MAX_MESSAGE_BYTES + 1024 * 1024 + 7
    data = bytes(range(256)) * (size // 256) + b"tail..."[: size % 256]
    assert len(data) == size

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        snapshot = snapshot_to(2, 1, data)
        loop = asyncio.get_running_loop()
        started = loop.time()
        a.transport.send(2, [(3, snapshot), (4, append(1, 2, 1))])
        await b.recorder.until(lambda: received(b.recorder, 1, 2))
        seconds = loop.time() - started
        got = dict((group, m) for _, items in b.recorder.batches for group, m in items)
        assert got[3] == snapshot and got[4] == append(1, 2, 1)
        chunks = -(-size // TransportConfig().chunk_bytes)
        assert (a.transport.stats.snapshots_sent, a.transport.stats.snapshot_chunks_sent) == (
            1,
            chunks,
        )
        assert a.transport.stats.snapshot_bytes_sent == size
        assert a.transport.stats.messages_sent == 2
        assert (
            b.transport.stats.snapshots_received,
            b.transport.stats.snapshot_chunks_received,
        ) == (
            1,
            chunks,
        )
        assert b.transport.stats.messages_received == 2
        assert b.transport.stats.snapshot_bytes_received == size
        assert b.transport.stats.snapshots_discarded == 0 and not a.recorder.dropped
        print(f"snapshot of {size} bytes in {chunks} chunks: {seconds:.3f}s")

    run(scenario)


class FakeCall:
    """Stands in for the gRPC call in ``_pump``: records every request written, runs a hook
    after each, and ends after ``writes`` writes."""

    def __init__(self, writes: int, hook: Callable[[raft_pb2.StreamRequest], None]) -> None:
        self.requests: list[raft_pb2.StreamRequest] = []
        self._writes = writes
        self._hook = hook

    def done(self) -> bool:
        return len(self.requests) >= self._writes

    async def write(self, request: raft_pb2.StreamRequest) -> None:
        self.requests.append(request)
        self._hook(request)

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK


def pump(
    writes: int,
    hook: Callable[[PeerTransport, raft_pb2.StreamRequest], None],
    first: Items,
    **config: Any,
) -> tuple[list[raft_pb2.StreamRequest], PeerTransport, Recorder]:
    """Run node 1's sender to node 2 over a FakeCall: ``first`` is sent before it starts."""
    recorder = Recorder()
    transport = PeerTransport(
        1,
        make_map([1, 2]),
        recorder.on_batch,
        recorder.on_peer_state,
        on_dropped=recorder.on_dropped,
        config=TransportConfig(**{**BASE_CONFIG, **config}),
    )
    link = transport._links[2]
    call = FakeCall(writes, partial(hook, transport))

    async def main() -> None:
        transport._set_connected(link, True)
        transport.send(2, first)
        await transport._pump(link, call)  # type: ignore[arg-type]

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))
    return call.requests, transport, recorder


def kinds(requests: list[raft_pb2.StreamRequest]) -> str:
    return "".join("C" if r.WhichOneof("kind") == "snapshot_chunk" else "B" for r in requests)


def test_chunks_alternate_with_batches_so_other_groups_are_not_starved() -> None:
    # Every frame written is followed by a new append for another group: a sender that sent
    # the snapshot first would write all its chunks before any of them.
    sent = [0]

    def more_appends(transport: PeerTransport, request: raft_pb2.StreamRequest) -> None:
        sent[0] += 1
        transport.send(2, [(1, append(1, 2, sent[0], b"a"))])

    requests, transport, _ = pump(
        9, more_appends, [(0, snapshot_to(2, 1, b"s" * 40))], chunk_bytes=10
    )
    assert kinds(requests) == "CBCBCBCBB"
    assert transport.stats.snapshots_sent == 1 and transport.stats.snapshot_chunks_sent == 4


def test_one_snapshot_per_group_is_queued_and_the_one_on_the_wire_is_kept() -> None:
    def on_first_chunk(transport: PeerTransport, request: raft_pb2.StreamRequest) -> None:
        if request.snapshot_chunk.offset == 0 and request.snapshot_chunk.group_id == 0:
            transport.send(2, [(0, snapshot_to(2, 1, b"n" * 30, index=9))])  # on the wire: no
            transport.send(2, [(1, snapshot_to(2, 1, b"o" * 5))])  # another group: yes

    requests, transport, recorder = pump(
        4,
        on_first_chunk,
        # The first snapshot of group 0 is replaced by the second before either started.
        [(0, snapshot_to(2, 1, b"x" * 30, index=5)), (0, snapshot_to(2, 1, b"y" * 30, index=6))],
        chunk_bytes=10,
    )
    chunks = [r.snapshot_chunk for r in requests]
    assert [(c.group_id, c.offset) for c in chunks] == [(0, 0), (0, 10), (0, 20), (1, 0)]
    assert chunks[0].header.snapshot.meta.index == 6
    dropped = [
        (g, m.snapshot.meta.index) for _, items in recorder.dropped for g, m in items if m.snapshot
    ]
    assert dropped == [(0, 5), (0, 9)]
    assert transport.stats.snapshots_sent == 2 and transport.stats.messages_dropped == 2


def test_snapshots_beyond_the_sender_bounds_are_dropped() -> None:
    requests, transport, recorder = pump(
        3,
        lambda transport, request: None,
        [
            (0, snapshot_to(2, 1, b"x" * 101)),  # above the limit: never sent
            (1, snapshot_to(2, 1, b"x" * 60)),
            (2, snapshot_to(2, 1, b"x" * 30)),
            (3, snapshot_to(2, 1, b"x" * 30)),  # 120 bytes queued: over
            (4, snapshot_to(2, 1, b"x" * 1)),  # a third snapshot: over the count
        ],
        chunk_bytes=1000,
        max_reassembly_bytes=100,
        max_queued_snapshots=2,
    )
    assert [r.snapshot_chunk.group_id for r in requests[:2]] == [1, 2]
    assert kinds(requests) == "CCB"  # then a heartbeat
    assert [g for _, items in recorder.dropped for g, _ in items] == [0, 3, 4]
    assert transport.stats.snapshots_sent == 2


def chunk_requests(group: int, message: Message, chunk_bytes: int) -> list[bytes]:
    outgoing = OutgoingSnapshot(group, message, chunk_bytes)
    requests = []
    while not outgoing.done:
        chunk = outgoing.next_chunk()
        requests.append(raft_pb2.StreamRequest(snapshot_chunk=chunk).SerializeToString())
    return requests


def test_the_receiver_discards_broken_or_cut_snapshots_and_keeps_the_stream() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 3)
        a = cluster.nodes[1]
        hello = hello_from(cluster, 3)
        good = snapshot_to(1, 3, b"g" * 100)
        chunks = chunk_requests(2, good, 30)
        stats = a.transport.stats
        # The stream ends after two of four chunks: the half snapshot is discarded.
        assert await raw_stream(a.address, [hello, *chunks[:2]]) == grpc.StatusCode.OK
        assert (stats.snapshots_discarded, stats.snapshots_received) == (1, 0)
        # A gap costs the snapshot, not the stream: what follows on it still arrives.
        gap = [hello, chunks[0], chunks[2], chunks[3], batch_of((0, append(3, 1, 7))), *chunks]
        assert await raw_stream(a.address, gap) == grpc.StatusCode.OK
        assert (stats.snapshots_discarded, stats.snapshots_received) == (2, 1)
        assert [(g, m) for _, items in a.recorder.batches for g, m in items] == [
            (0, append(3, 1, 7)),
            (2, good),
        ]
        assert stats.invalid_streams == 0
        assert a.transport._budgets[3].used == 0
        # Chunks that name a group the map lacks, or a sender other than the stream's, are
        # invalid content: the stream is refused, as for a Batch.
        # (One chunk each: the refusal must come after the client's last write, or gRPC may
        # report the cut-off write instead.)
        forged = chunk_requests(2, snapshot_to(1, 2, b"f" * 10), 30)
        beyond = chunk_requests(PARTITIONS, snapshot_to(1, 3, b"b" * 10), 30)
        for requests in ([hello, *forged], [hello, *beyond]):
            assert await raw_stream(a.address, requests) == grpc.StatusCode.INVALID_ARGUMENT
        assert stats.invalid_streams == 2 and stats.snapshots_received == 1

    run(scenario)


def test_a_stream_broken_mid_snapshot_drops_it_on_both_sides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunks = 256
    data = b"d" * (chunks * TransportConfig().chunk_bytes)

    async def scenario(stack: AsyncExitStack) -> None:
        cluster = await cluster_of(stack, 2)
        await cluster.connected(1, 2)
        a, b = cluster.nodes[1], cluster.nodes[2]
        receive_chunk = b.transport._receive_chunk

        def break_after_the_first_chunk(*args: Any) -> None:
            receive_chunk(*args)
            # Ends the stream at once: the receiver reads nothing more, so flow control holds
            # the sender far from the last chunk until its writes fail.
            raise CodecError("broken on purpose by the test")

        monkeypatch.setattr(b.transport, "_receive_chunk", break_after_the_first_chunk)
        a.transport.send(2, [(3, snapshot_to(2, 1, data))])
        await a.recorder.until(
            lambda: any(m.snapshot is not None for _, items in a.recorder.dropped for _, m in items)
        )
        assert a.transport.stats.snapshots_sent == 0
        assert a.transport.stats.snapshot_chunks_sent < chunks
        assert b.transport.stats.snapshot_chunks_received == 1
        assert b.transport.stats.snapshots_discarded == 1
        assert b.transport.stats.snapshots_received == 0
        assert b.transport._budgets[1].used == 0

    run(scenario)
