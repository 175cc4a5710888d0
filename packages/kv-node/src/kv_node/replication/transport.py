"""How nodes carry Raft messages to each other: one long-lived gRPC stream per peer and direction.

The runtime drives thousands of Raft groups per node, and Raft messages are small and frequent,
so messages are not sent one call each. ``PeerTransport.send`` only appends ``(group id,
message)`` pairs to a bounded queue for the peer and returns; one sender task per peer drains
the queue into frames (``kv.raft.v1.Batch``) on ONE long-lived ``RaftTransportService.Stream``.
Everything queued while a frame was on the wire leaves in the next frame, so the busier the
node, the fuller the frames (like TiKV's and CockroachDB's per-store streams).

Loss instead of blocking. Raft tolerates lost messages (it retries on ticks and probes), but a
runtime blocked on a slow peer would stall every group. So ``send`` never blocks and never
raises for a down peer: while the stream to a peer is not up, and beyond the queue's bounds
(count and bytes), messages are dropped, counted, and handed to ``on_dropped`` so that the
runtime can call ``report_unreachable`` for their groups. Messages queued or in flight when a
stream breaks are dropped the same way (we cannot know which arrived).

Handshake. A stream opens with a ``Hello`` (Raft node id, member id, address, and the
``kv_common.fingerprint`` of the sender's cluster map), answered by the receiver's own Hello.
Raft node ids are positions in the sorted member list, so two nodes with different maps would
talk about different nodes under the same id: a receiver whose fingerprint differs refuses the
stream with FAILED_PRECONDITION, and the sender, comparing the answer, learns it too. Each side
logs one line naming both sides and both maps, and counts it. A refused sender keeps retrying at
the capped backoff, since operators fix such configs by restarting nodes.

Liveness for the whole node, not per group. Idle Raft groups must not heartbeat (4,096 groups
per node would burn the CPU), so the transport provides the failure detector: each sender sends
an empty frame every ``heartbeat_interval`` when it has nothing else to send, and a peer is
alive while frames from it arrive within ``dead_after``. ``on_peer_state(peer, alive)`` fires
on every change; the runtime can wake quiet groups of a peer that died. All time comes from the
event loop's clock, and every interval is a parameter so that tests run in milliseconds.

Snapshots travel in chunks. A SNAPSHOT message carries a whole partition, so it never goes in
a Batch: ``send`` puts it on a queue of its own, and the sender cuts it into ``SnapshotChunk``
frames (``chunks.OutgoingSnapshot``), one snapshot at a time per peer, alternating with
ordinary frames whenever both are waiting so that a long transfer delays other groups'
heartbeats and appends by at most one chunk. The receiver reassembles per stream and group
within a per-peer byte budget (``chunks.Reassembler``) and hands the runtime one complete
message, as if it had come in a Batch. A snapshot that breaks the chunk protocol, or whose
stream ends before its last chunk, is discarded, logged and counted; Raft sends another. The
sender keeps one snapshot per group: a newer one replaces a queued one that has not started,
and is dropped while one is on the wire (the leader would otherwise restart an ever-longer
transfer every election timeout and never finish one).

Bounds and deadlines. Queue (messages and bytes per peer), frame (messages and bytes), a single
message in a Batch (``MAX_MESSAGE_BYTES``), snapshots (queued per peer, and bytes in
reassembly per peer, which also caps one snapshot's size), inbound request size, inbound
streams. Connecting (channel ready + Hello answered) has a deadline, every write
has one, the receiver waits for a Hello and for each later frame with one. The stream itself has
no gRPC deadline, because it is meant to live as long as both nodes do.

Inbound requests are decoded here (the servicer takes raw bytes), so that bytes that do not
parse are a ``CodecError`` like any other invalid input: the receiver refuses that stream with
INVALID_ARGUMENT, logs and counts it, and goes on serving every other stream.

``on_batch`` is called synchronously for each frame, in the order the sender queued its
messages, so what a stream holds in memory is one frame plus gRPC's flow-control window; the
runtime must hand the items on quickly (to its own bounded inbox) and never block. The node's
gRPC server must accept requests of ``MAX_REQUEST_BYTES`` (its ``max_receive_message_length``),
or a frame carrying one large entry would be refused by gRPC itself, again on every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import grpc

from kv.raft.v1 import raft_pb2, raft_pb2_grpc
from kv_common.cluster_map import ClusterMap
from kv_common.fingerprint import map_fingerprint
from kv_node.replication.chunks import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_REASSEMBLY_BYTES,
    OutgoingSnapshot,
    Reassembler,
    ReassemblyBudget,
    SnapshotDiscarded,
)
from kv_node.replication.codec import CodecError, decode_batch, encode_message_into, parse_request
from kv_raft import Message

__all__ = [
    "SERVICE_NAME",
    "PeerTransport",
    "TransportConfig",
    "TransportStats",
    "raft_node_ids",
]

log = logging.getLogger(__name__)

SERVICE_NAME = raft_pb2.DESCRIPTOR.services_by_name["RaftTransportService"].full_name
STREAM_METHOD = f"/{SERVICE_NAME}/Stream"

DEFAULT_HEARTBEAT_INTERVAL = 0.25
"""Seconds of silence after which a sender sends an empty frame. Four of them fit in
``DEFAULT_DEAD_AFTER``, so one late frame does not make a peer look dead."""
DEFAULT_DEAD_AFTER = 1.0
"""A peer whose frames stop for this long is dead. Below a Raft election timeout (the runtime
picks that), so groups learn of a dead leader no later than an election would."""
DEFAULT_CONNECT_TIMEOUT = 2.0
"""Deadline to connect and get the receiver's Hello."""
DEFAULT_WRITE_TIMEOUT = 5.0
"""A write that waits longer than this on flow control means the peer is stuck: reconnect."""
DEFAULT_BACKOFF_INITIAL = 0.05
DEFAULT_BACKOFF_MAX = 2.0
"""Reconnect delays double from the initial one up to this cap (and stay there for a peer that
refuses our map), plus up to ``BACKOFF_JITTER`` of random extra so that peers spread out."""
BACKOFF_JITTER = 0.2

MAX_QUEUE_MESSAGES = 8192
"""Per peer. About two seconds of a busy node's traffic; beyond it the peer is not keeping up
and Raft is better served by dropping (and probing later) than by a growing backlog."""
MAX_QUEUE_BYTES = 32 * 1024 * 1024
MAX_FRAME_MESSAGES = 1024
MAX_FRAME_BYTES = 1024 * 1024
"""A frame closes at this many messages or bytes (whichever first). Well below gRPC's 4 MiB
default message limit, and small enough that one frame does not hold a peer's stream for long."""
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest single encoded Raft message carried in a Batch (alone in its frame). Appends are
capped far below this by kv_raft's ``max_size_per_msg``; snapshots do not count, they travel in
chunks of ``DEFAULT_CHUNK_BYTES``."""
MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""Largest ``chunk_bytes`` accepted: a chunk plus its header must stay far below a request."""
MAX_QUEUED_SNAPSHOTS = 16
"""Snapshots waiting per peer (one per group). After a long outage every group of a peer may
need one; beyond this many the rest are dropped and their leaders send them again later,
rather than every snapshot being built in memory at once."""
MAX_REQUEST_BYTES = MAX_MESSAGE_BYTES + 64 * 1024
"""Largest inbound request accepted (one maximal message plus framing)."""
INBOUND_STREAMS_PER_PEER = 2
"""A peer's current stream plus the one replacing it after a reconnect; a few more are allowed
for streams that have not said Hello yet."""
SPARE_INBOUND_STREAMS = 4
IDLE_STREAM_FACTOR = 2
"""An inbound stream silent for this many ``dead_after`` is ended (its sender is gone)."""

MAX_SHOWN_CHARS = 1000
"""Longest text from a peer's Hello that we put in a log line (a description of a large
cluster is a few hundred characters; see kv_common.fingerprint)."""

_ESTIMATED_MESSAGE_OVERHEAD = 64
"""Bytes counted per queued message besides its payloads (ids, terms, framing), for the
queue's byte bound; an estimate, so that ``send`` does not encode."""

BatchCallback = Callable[[int, list[tuple[int, Message]]], None]
PeerStateCallback = Callable[[int, bool], None]
DropCallback = Callable[[int, Sequence[tuple[int, Message]]], None]
MismatchCallback = Callable[[int, str], None]
_Call: TypeAlias = "grpc.aio.StreamStreamCall[raft_pb2.StreamRequest, raft_pb2.StreamResponse]"
_Outcome: TypeAlias = Literal["up", "refused", "failed"]
_Context: TypeAlias = "grpc.aio.ServicerContext[bytes, raft_pb2.StreamResponse]"


def raft_node_ids(cluster_map: ClusterMap) -> dict[str, int]:
    """Member id -> Raft node id: 1 + the member's position in the sorted member ids."""
    return {member_id: i + 1 for i, member_id in enumerate(sorted(cluster_map.addresses))}


@dataclass
class TransportStats:
    """Counters (monotonic) for the node's metrics."""

    frames_sent: int = 0
    messages_sent: int = 0
    heartbeats_sent: int = 0
    frames_received: int = 0
    messages_received: int = 0
    messages_dropped: int = 0
    connects: int = 0
    connect_failures: int = 0
    map_mismatches_refused: int = 0
    """Inbound streams we refused because the peer's map differs from ours."""
    map_mismatches_refused_by_peer: int = 0
    """Our streams that a peer refused because its map differs from ours."""
    invalid_streams: int = 0
    """Inbound streams refused for invalid content (no Hello first, bad bytes, bad ids)."""
    inbound_streams_refused: int = 0
    """Inbound streams refused because too many were open."""
    snapshots_sent: int = 0
    """Snapshot messages whose last chunk was written (each also counts in messages_sent)."""
    snapshot_chunks_sent: int = 0
    snapshot_bytes_sent: int = 0
    """Snapshot data written, in chunks (a snapshot cut short by a broken stream included)."""
    snapshots_received: int = 0
    """Snapshot messages reassembled whole and handed on (also counted in messages_received)."""
    snapshot_bytes_received: int = 0
    """Data of the snapshots reassembled whole."""
    snapshot_chunks_received: int = 0
    snapshots_discarded: int = 0
    """Inbound snapshots thrown away part-way: the chunk protocol broken, or the stream ended."""
    peer_restarts: int = 0
    """Peers seen with a new incarnation in their Hello (restarted)."""


@dataclass(frozen=True)
class TransportConfig:
    """The transport's intervals and bounds (defaults: the module constants, documented there).

    Tests shrink the intervals to milliseconds; the node maps its flags onto these fields.
    """

    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    dead_after: float = DEFAULT_DEAD_AFTER
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    backoff_max: float = DEFAULT_BACKOFF_MAX
    max_queue_messages: int = MAX_QUEUE_MESSAGES
    max_queue_bytes: int = MAX_QUEUE_BYTES
    max_frame_messages: int = MAX_FRAME_MESSAGES
    max_frame_bytes: int = MAX_FRAME_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_queued_snapshots: int = MAX_QUEUED_SNAPSHOTS
    max_reassembly_bytes: int = DEFAULT_MAX_REASSEMBLY_BYTES
    """Per peer, as receiver: snapshot bytes being reassembled. As sender: the largest snapshot
    sent at all, and the bytes of snapshots queued (beyond the one in flight)."""

    def validate(self) -> None:
        if not 0 < self.heartbeat_interval < self.dead_after:
            raise ValueError("heartbeat_interval must be positive and below dead_after")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("backoffs must be positive, the initial one at most the cap")
        if min(self.connect_timeout, self.write_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if min(self.max_queue_messages, self.max_frame_messages) <= 0:
            raise ValueError("message bounds must be positive")
        if not 0 < self.max_frame_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"max_frame_bytes must be in 1..{MAX_REQUEST_BYTES}")
        if not 0 < self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
        if min(self.max_queued_snapshots, self.max_reassembly_bytes) <= 0:
            raise ValueError("snapshot bounds must be positive")


def _approximate_size(message: Message) -> int:
    size = _ESTIMATED_MESSAGE_OVERHEAD + len(message.context)
    for entry in message.entries:
        size += len(entry.data) + _ESTIMATED_MESSAGE_OVERHEAD
    if message.snapshot is not None:
        size += len(message.snapshot.data)
    return size


class _Refused(Exception):
    """Ends an inbound stream with a status (raised inside the handler only)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class _Link:
    """Our side of the stream to one peer."""

    peer: int
    member_id: str
    address: str
    queue: deque[tuple[int, Message]]
    wakeup: asyncio.Event
    snapshots: deque[OutgoingSnapshot]
    queued_bytes: int = 0
    snapshot_bytes: int = 0
    """Data of the snapshots queued (the one on the wire included)."""
    chunk_turn: bool = False
    """Whether the next frame is a chunk when both a Batch and a chunk are waiting."""
    snapshot_started: float = 0.0
    connected: bool = False
    last_refusal: str = ""
    channel: grpc.aio.Channel | None = None
    task: asyncio.Task[None] | None = None


class PeerTransport:
    """Both directions of one node's Raft traffic; see the module docstring.

    Call ``start()`` inside the running loop, register the inbound side with
    ``add_to_server(server)`` before that server starts, and ``close()`` at the end. Callbacks
    run on the event loop and must not block; ``on_dropped`` may run inside ``send``.

    Optional callbacks: ``on_dropped(peer, items)`` for messages not carried (for
    ``report_unreachable``), ``on_link_state(peer, connected)`` when our stream to a peer comes
    up or goes down, ``on_map_mismatch(peer, line)`` on every refusal for a different map,
    either side (the line is the one logged, for node status).
    """

    def __init__(
        self,
        node_id: int,
        cluster_map: ClusterMap,
        on_batch: BatchCallback,
        on_peer_state: PeerStateCallback,
        *,
        on_dropped: DropCallback | None = None,
        on_link_state: PeerStateCallback | None = None,
        on_map_mismatch: MismatchCallback | None = None,
        config: TransportConfig | None = None,
        rng: random.Random | None = None,
        dial: Mapping[str, str] | None = None,
    ) -> None:
        """``dial`` overrides where to reach some peers (member id -> host:port), e.g. through
        a proxy; the map's addresses (and so the fingerprint) are unchanged."""
        ids = raft_node_ids(cluster_map)
        members = {raft_id: member_id for member_id, raft_id in ids.items()}
        if node_id not in members:
            raise ValueError(f"node {node_id} is not in the cluster map (ids 1..{len(ids)})")
        self.config = config or TransportConfig()
        self.config.validate()
        self.node_id = node_id
        self.member_id = members[node_id]
        self.address = cluster_map.address_of(self.member_id)
        self._members = members
        self._partitions = cluster_map.partitions
        fingerprint = map_fingerprint(cluster_map)
        self._fingerprint = fingerprint.digest
        self._description = fingerprint.description
        self.incarnation = int.from_bytes(os.urandom(8)) or 1
        """This process's incarnation (random, not from ``rng``: a restart must change it)."""
        self._hello = raft_pb2.Hello(
            node_id=node_id,
            member_id=self.member_id,
            map_fingerprint=fingerprint.digest,
            map_description=fingerprint.description,
            address=self.address,
            incarnation=self.incarnation,
        )
        self._on_batch = on_batch
        self._on_peer_state = on_peer_state
        self._on_dropped = on_dropped
        self._on_link_state = on_link_state
        self._on_map_mismatch = on_map_mismatch
        self._rng = rng or random.Random()
        self.stats = TransportStats()
        self._links = {
            peer: _Link(
                peer,
                member_id,
                (dial or {}).get(member_id) or cluster_map.address_of(member_id),
                deque(),
                asyncio.Event(),
                deque(),
            )
            for peer, member_id in members.items()
            if peer != node_id
        }
        self._budgets = {
            peer: ReassemblyBudget(self.config.max_reassembly_bytes) for peer in self._links
        }
        self._last_seen: dict[int, float] = {}
        self._incarnations: dict[int, int] = {}
        self._alive: set[int] = set()
        self._liveness_changed = asyncio.Event()
        self._inbound_streams = 0
        self._max_inbound_streams = INBOUND_STREAMS_PER_PEER * len(self._links) + (
            SPARE_INBOUND_STREAMS
        )
        self._refusals_logged: dict[int, str] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    # ---- lifecycle

    def start(self) -> None:
        """Open a channel and start a sender per peer, and the liveness watchdog."""
        if self._started:
            raise RuntimeError("PeerTransport already started")
        self._started = True
        for link in self._links.values():
            link.channel = grpc.aio.insecure_channel(
                link.address, options=_channel_options(self.config)
            )
            link.task = asyncio.create_task(self._run_link(link), name=f"raft-send-{link.peer}")
        self._watchdog = asyncio.create_task(self._watch_liveness(), name="raft-liveness")

    async def close(self) -> None:
        """Cancel every task, close every channel; inbound streams end at their next frame."""
        self._closed = True
        tasks = [link.task for link in self._links.values() if link.task is not None]
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._links.values():
            link.task = None
            if link.channel is not None:
                await link.channel.close()
                link.channel = None
        self._watchdog = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve the inbound side on ``server`` (call before the server starts)."""
        handler: grpc.RpcMethodHandler[bytes, raft_pb2.StreamResponse]
        handler = grpc.stream_stream_rpc_method_handler(
            self._serve_stream,
            request_deserializer=None,  # raw bytes: decoded by us, see the module docstring
            response_serializer=raft_pb2.StreamResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": handler}),)
        )

    # ---- what the runtime calls

    def send(self, peer: int, items: Sequence[tuple[int, Message]]) -> None:
        """Queue ``items`` for ``peer``; drop (and report) what cannot be carried now."""
        link = self._links.get(peer)
        if link is None:
            raise ValueError(f"node {peer} is not a peer of node {self.node_id}")
        if not items:
            return
        if not link.connected or self._closed:
            self._drop(link, items)
            return
        if any(message.snapshot is not None for _, message in items):
            for group, message in items:
                if message.snapshot is not None:
                    self._queue_snapshot(link, group, message)
            items = [item for item in items if item[1].snapshot is None]
            if not items:
                return
        room = self.config.max_queue_messages - len(link.queue)
        accepted = 0
        for _, message in items[:room]:
            size = _approximate_size(message)
            if link.queued_bytes + size > self.config.max_queue_bytes:
                break
            link.queued_bytes += size
            accepted += 1
        if accepted == len(items):
            link.queue.extend(items)
        else:
            link.queue.extend(items[:accepted])
            self._drop(link, items[accepted:])
        if accepted:
            link.wakeup.set()

    def alive(self, peer: int) -> bool:
        return peer in self._alive

    def connected(self, peer: int) -> bool:
        """Whether our stream to ``peer`` is up (its Hello answered with the same map)."""
        return self._links[peer].connected

    @property
    def peers(self) -> tuple[int, ...]:
        return tuple(self._links)

    # ---- sending

    def _drop(self, link: _Link, items: Sequence[tuple[int, Message]]) -> None:
        self.stats.messages_dropped += len(items)
        if self._on_dropped is not None and items:
            _call_back(self._on_dropped, link.peer, items)

    def _drop_queue(self, link: _Link) -> None:
        dropped = list(link.queue)
        dropped += [(s.group, s.message) for s in link.snapshots]
        link.queue.clear()
        link.queued_bytes = 0
        link.snapshots.clear()
        link.snapshot_bytes = 0
        self._drop(link, dropped)

    def _queue_snapshot(self, link: _Link, group: int, message: Message) -> None:
        """Queue a SNAPSHOT message to go out in chunks, one snapshot per group (see the module
        docstring); drop it, or the one it replaces, with a reason in the log."""
        assert message.snapshot is not None
        size = len(message.snapshot.data)
        for queued in link.snapshots:
            if queued.group != group:
                continue
            if queued.started:
                log.debug(
                    "group %d: a snapshot to %s is on the wire already", group, link.member_id
                )
                self._drop(link, [(group, message)])
                return
            link.snapshots.remove(queued)
            link.snapshot_bytes -= queued.size
            self._drop(link, [(group, queued.message)])  # replaced by the newer one
            break
        limit = self.config.max_reassembly_bytes
        if size > limit:
            log.error(
                "dropping a %d-byte snapshot of group %d for %s: above the %d-byte limit",
                size,
                group,
                link.member_id,
                limit,
            )
            self._drop(link, [(group, message)])
            return
        full = len(link.snapshots) >= self.config.max_queued_snapshots or (
            link.snapshots and link.snapshot_bytes + size > limit
        )
        if full:
            self._drop(link, [(group, message)])
            return
        try:
            outgoing = OutgoingSnapshot(group, message, self.config.chunk_bytes)
        except CodecError as exc:
            log.error("dropping a snapshot for group %d we cannot encode: %s", group, exc)
            self._drop(link, [(group, message)])
            return
        link.snapshots.append(outgoing)
        link.snapshot_bytes += size
        link.wakeup.set()

    def _set_connected(self, link: _Link, connected: bool) -> None:
        if link.connected == connected:
            return
        link.connected = connected
        if not connected:
            self._drop_queue(link)
        if self._on_link_state is not None:
            _call_back(self._on_link_state, link.peer, connected)

    async def _run_link(self, link: _Link) -> None:
        """Keep one stream to the peer up for as long as the transport lives."""
        backoff = self.config.backoff_initial
        while True:
            outcome: _Outcome = "failed"
            try:
                outcome = await self._session(link)
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as exc:
                self._log_link_failure(link, exc)
            except Exception:
                # A bug of ours: say so, but keep the peer's sender alive.
                log.exception("sender to %s at %s failed", link.member_id, link.address)
            finally:
                if link.connected:  # ended by an error, but it had been up
                    outcome = "up"
                self._set_connected(link, False)
            if outcome == "up":
                backoff = self.config.backoff_initial
            elif outcome == "refused":
                backoff = self.config.backoff_max
            else:
                self.stats.connect_failures += 1
            await asyncio.sleep(backoff * (1 + BACKOFF_JITTER * self._rng.random()))
            backoff = min(backoff * 2, self.config.backoff_max)

    async def _session(self, link: _Link) -> _Outcome:
        """One stream: Hello, then frames until it breaks. "up" if it got as far as streaming,
        "refused" if the peer serves another map (or is another node), "failed" otherwise."""
        assert link.channel is not None
        stub = raft_pb2_grpc.RaftTransportServiceStub(link.channel)
        call: _Call = stub.Stream(wait_for_ready=True)
        call.add_done_callback(lambda _: link.wakeup.set())
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await call.write(raft_pb2.StreamRequest(hello=self._hello))
                reply = await call.read()
            if reply is grpc.aio.EOF or not isinstance(reply, raft_pb2.StreamResponse):
                await self._await_status(call)
                return "failed"
            if reply.hello.map_fingerprint != self._fingerprint:
                code = await self._await_status(call)
                self.stats.map_mismatches_refused_by_peer += 1
                theirs = _shown(reply.hello.map_description)
                line = (
                    f"peer {link.member_id} at {link.address} serves a different cluster map "
                    f"(it refused our stream: {code.name}): theirs {theirs}; "
                    f"ours {self._description}"
                )
                self._log_refusal(link, line)
                self._mismatch(link.peer, line)
                return "refused"
            if reply.hello.node_id != link.peer:
                self._log_refusal(
                    link,
                    f"{link.address} answered as node {reply.hello.node_id} "
                    f"({_shown(reply.hello.member_id)}), "
                    f"not as {link.member_id} (node {link.peer})",
                )
                return "refused"
            self.stats.connects += 1
            self._incarnation_of(link.peer, reply.hello.incarnation)
            link.last_refusal = ""
            self._set_connected(link, True)
            await self._pump(link, call)
            return "up"
        finally:
            call.cancel()

    async def _pump(self, link: _Link, call: _Call) -> None:
        """Send what is queued, or a heartbeat when idle, until the call ends."""
        while not call.done():
            if not link.queue and not link.snapshots:
                link.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.heartbeat_interval):
                        await link.wakeup.wait()
                if call.done():
                    break
            if link.snapshots and (link.chunk_turn or not link.queue):
                link.chunk_turn = False
                await self._send_chunk(link, call)
                continue
            link.chunk_turn = True
            request, count = self._take_frame(link)
            try:
                async with asyncio.timeout(self.config.write_timeout):
                    await call.write(request)
            except BaseException:
                self.stats.messages_dropped += count  # in flight: delivery unknown
                raise
            self.stats.frames_sent += 1
            self.stats.messages_sent += count
            if not count:
                self.stats.heartbeats_sent += 1
        code = await self._await_status(call)
        log.info(
            "stream to %s at %s ended by the peer: %s", link.member_id, link.address, code.name
        )

    async def _send_chunk(self, link: _Link, call: _Call) -> None:
        """Write the next chunk of the first queued snapshot. If the write fails, the snapshot
        stays queued and is dropped with the rest when the link goes down."""
        snapshot = link.snapshots[0]
        loop = asyncio.get_running_loop()
        if not snapshot.started:
            link.snapshot_started = loop.time()
        chunk = snapshot.next_chunk()
        async with asyncio.timeout(self.config.write_timeout):
            await call.write(raft_pb2.StreamRequest(snapshot_chunk=chunk))
        self.stats.frames_sent += 1
        self.stats.snapshot_chunks_sent += 1
        self.stats.snapshot_bytes_sent += len(chunk.data)
        if not snapshot.done:
            return
        link.snapshots.popleft()
        link.snapshot_bytes -= snapshot.size
        self.stats.snapshots_sent += 1
        self.stats.messages_sent += 1
        log.info(
            "sent a snapshot of group %d to %s: %d bytes in %d chunks, %.3fs",
            snapshot.group,
            link.member_id,
            snapshot.size,
            snapshot.chunks_sent,
            loop.time() - link.snapshot_started,
        )

    def _take_frame(self, link: _Link) -> tuple[raft_pb2.StreamRequest, int]:
        """Move up to a frame's worth from the queue into a request (empty: a heartbeat)."""
        request = raft_pb2.StreamRequest(batch=raft_pb2.Batch())
        request.batch.SetInParent()
        out = request.batch.messages
        frame_bytes = 0
        queue = link.queue
        while queue and len(out) < self.config.max_frame_messages:
            group, message = queue[0]
            # Encoded in place, as the frame's next item (no copies); taken out again if the
            # message does not go in this frame.
            encoded = out.add()
            try:
                encoded.group_id = group
                encode_message_into(encoded.message, message)
            except (CodecError, ValueError) as exc:
                del out[-1]
                queue.popleft()
                link.queued_bytes -= _approximate_size(message)
                log.error("dropping a Raft message for group %d we cannot encode: %s", group, exc)
                self._drop(link, [(group, message)])
                continue
            size = encoded.ByteSize()
            if size > MAX_MESSAGE_BYTES:
                del out[-1]
                queue.popleft()
                link.queued_bytes -= _approximate_size(message)
                log.error(
                    "dropping a %d-byte %s for group %d: above the %d-byte limit",
                    size,
                    message.type.name,
                    group,
                    MAX_MESSAGE_BYTES,
                )
                self._drop(link, [(group, message)])
                continue
            if len(out) > 1 and frame_bytes + size > self.config.max_frame_bytes:
                del out[-1]
                break
            queue.popleft()
            link.queued_bytes -= _approximate_size(message)
            frame_bytes += size
        return request, len(out)

    async def _await_status(self, call: _Call) -> grpc.StatusCode:
        """The status the call ended with (UNKNOWN if it does not end within the deadline)."""
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                return await call.code()
        except TimeoutError:
            return grpc.StatusCode.UNKNOWN

    def _log_refusal(self, link: _Link, line: str) -> None:
        if line != link.last_refusal:
            log.error("%s", line)
            link.last_refusal = line

    def _mismatch(self, peer: int, line: str) -> None:
        if self._on_map_mismatch is not None:
            _call_back(self._on_map_mismatch, peer, line)

    def _log_link_failure(self, link: _Link, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            reason = f"{exc.code().name}: {exc.details()}"
        elif isinstance(exc, TimeoutError):
            reason = "timed out"
        else:
            reason = type(exc).__name__
        level = logging.INFO if link.connected else logging.DEBUG
        log.log(level, "stream to %s at %s ended: %s", link.member_id, link.address, reason)

    # ---- receiving

    async def _serve_stream(self, _requests: Any, context: _Context) -> None:
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        if self._inbound_streams >= self._max_inbound_streams:
            self.stats.inbound_streams_refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many Raft streams")
        self._inbound_streams += 1
        refused: _Refused | None = None
        try:
            await self._receive(context)
        except _Refused as exc:
            refused = exc
        except CodecError as exc:
            self.stats.invalid_streams += 1
            log.warning("refused a Raft stream from %s: %s", context.peer(), exc)
            refused = _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TimeoutError:
            refused = _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "stream silent for too long")
        finally:
            self._inbound_streams -= 1
        if refused is not None:
            await context.abort(refused.code, refused.details)

    async def _read(self, context: _Context, timeout: float) -> bytes | None:
        async with asyncio.timeout(timeout):
            data: object = await context.read()  # the stubs leave out EOF
        if data is grpc.aio.EOF:
            return None
        assert isinstance(data, bytes)
        if len(data) > MAX_REQUEST_BYTES:
            raise CodecError(f"a {len(data)}-byte request (limit {MAX_REQUEST_BYTES})")
        return data

    async def _receive(self, context: _Context) -> None:
        data = await self._read(context, self.config.connect_timeout)
        if data is None:
            return
        first = parse_request(data)
        if first.WhichOneof("kind") != "hello":
            raise CodecError("the first request of a stream must be a Hello")
        hello = first.hello
        async with asyncio.timeout(self.config.connect_timeout):
            await context.write(raft_pb2.StreamResponse(hello=self._hello))
        if hello.map_fingerprint != self._fingerprint:
            line = (
                f"peer {_shown(hello.member_id) or '?'} at "
                f"{_shown(hello.address) or context.peer()} "
                f"serves a different cluster map: theirs {_shown(hello.map_description)}; "
                f"ours {self._description}"
            )
            self.stats.map_mismatches_refused += 1
            # Keyed by the peers we know, so that made-up node ids cannot grow the table.
            slot = hello.node_id if hello.node_id in self._links else 0
            if self._refusals_logged.get(slot) != line:
                log.error("%s", line)
                self._refusals_logged[slot] = line
            self._mismatch(hello.node_id, line)
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, line)
        peer = hello.node_id
        if peer not in self._links or self._members[peer] != hello.member_id:
            raise CodecError(
                f"Hello from {_shown(hello.member_id)!r} as node {peer}, "
                "which our map does not have"
            )
        self._refusals_logged.pop(peer, None)
        self._incarnation_of(peer, hello.incarnation)
        self._frame_from(peer)
        reassembler = Reassembler(self._budgets[peer])
        try:
            await self._receive_frames(context, peer, reassembler)
        finally:
            discarded = reassembler.discard_all()
            if discarded:
                self.stats.snapshots_discarded += discarded
                log.warning(
                    "discarded %d snapshot(s) from %s part-way: the stream ended",
                    discarded,
                    self._members[peer],
                )

    async def _receive_frames(self, context: _Context, peer: int, reassembler: Reassembler) -> None:
        idle_timeout = self.config.dead_after * IDLE_STREAM_FACTOR
        while not self._closed:
            data = await self._read(context, idle_timeout)
            if data is None or self._closed:
                return
            request = parse_request(data)
            kind = request.WhichOneof("kind")
            if kind == "snapshot_chunk":
                self._receive_chunk(peer, reassembler, request.snapshot_chunk)
                continue
            if kind != "batch":
                raise CodecError("a second Hello on one stream" if kind else "an empty request")
            items = decode_batch(request.batch)
            for group, message in items:
                if group >= self._partitions:
                    raise CodecError(f"group {group} (the map has {self._partitions})")
                if message.frm != peer or message.to != self.node_id:
                    raise CodecError(
                        f"a message from {message.frm} to {message.to} on the stream from "
                        f"{peer} to {self.node_id}"
                    )
            self.stats.frames_received += 1
            self.stats.messages_received += len(items)
            self._frame_from(peer)
            if items:
                _call_back(self._on_batch, peer, items)

    def _receive_chunk(
        self, peer: int, reassembler: Reassembler, chunk: raft_pb2.SnapshotChunk
    ) -> None:
        """Feed one chunk; hand on the message it completes. A chunk that breaks the protocol
        costs its snapshot, not the stream; one naming a group or nodes the stream cannot
        carry is invalid content like any other (``CodecError``)."""
        if chunk.group_id >= self._partitions:
            raise CodecError(f"group {chunk.group_id} (the map has {self._partitions})")
        self.stats.frames_received += 1
        self.stats.snapshot_chunks_received += 1
        self._frame_from(peer)
        try:
            done = reassembler.feed(chunk)
        except SnapshotDiscarded as exc:
            self.stats.snapshots_discarded += 1
            log.warning("discarded a snapshot from %s: %s", self._members[peer], exc)
            return
        if done is None:
            return
        group, message = done
        if message.frm != peer or message.to != self.node_id:
            raise CodecError(
                f"a snapshot from {message.frm} to {message.to} on the stream from "
                f"{peer} to {self.node_id}"
            )
        assert message.snapshot is not None
        self.stats.snapshots_received += 1
        self.stats.snapshot_bytes_received += len(message.snapshot.data)
        self.stats.messages_received += 1
        log.info(
            "received a snapshot of group %d from %s: %d bytes",
            group,
            self._members[peer],
            len(message.snapshot.data),
        )
        _call_back(self._on_batch, peer, [(group, message)])

    # ---- liveness

    def _incarnation_of(self, peer: int, incarnation: int) -> None:
        """A Hello told ``peer``'s incarnation. A new one while the peer still counts as alive
        is a restart faster than ``dead_after``: report it dead, so that the groups it led
        elect again at once instead of after an election timeout (its next frame revives it).
        0 is a peer too old to say."""
        if incarnation == 0:
            return
        before = self._incarnations.get(peer)
        self._incarnations[peer] = incarnation
        if before is not None and before != incarnation:
            self.stats.peer_restarts += 1
            log.info("peer %s restarted (a new incarnation)", self._members[peer])
            if peer in self._alive:
                self._alive.discard(peer)
                self._liveness_changed.set()
                _call_back(self._on_peer_state, peer, False)

    def _frame_from(self, peer: int) -> None:
        self._last_seen[peer] = asyncio.get_running_loop().time()
        if peer not in self._alive:
            self._alive.add(peer)
            self._liveness_changed.set()
            _call_back(self._on_peer_state, peer, True)

    async def _watch_liveness(self) -> None:
        """Declare peers dead when their frames stop; sleeps until the earliest deadline."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            next_deadline: float | None = None
            for peer in sorted(self._alive):
                deadline = self._last_seen[peer] + self.config.dead_after
                if deadline <= now:
                    self._alive.discard(peer)
                    _call_back(self._on_peer_state, peer, False)
                elif next_deadline is None or deadline < next_deadline:
                    next_deadline = deadline
            self._liveness_changed.clear()
            # A peer that comes alive has the latest deadline of all, so only an empty alive
            # set needs waking up early.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_deadline):
                    await self._liveness_changed.wait()


def _channel_options(config: TransportConfig) -> list[tuple[str, int]]:
    initial_ms = max(1, int(config.backoff_initial * 1000))
    return [
        ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        # Our own backoff paces the attempts; gRPC's (up to 120 s) must not hide a restarted peer.
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.min_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", max(initial_ms, int(config.backoff_max * 1000))),
    ]


def _shown(text: str) -> str:
    """A peer's text as it may appear in our logs: bounded, so that a hostile Hello cannot
    write megabytes into a log line."""
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return text[:MAX_SHOWN_CHARS] + f"... ({len(text)} characters)"


def _call_back(callback: Callable[..., None], *args: Any) -> None:
    """Run a runtime callback; a bug in it is logged, never allowed to kill a transport task."""
    try:
        callback(*args)
    except Exception:
        log.exception("Raft transport callback %r failed", callback)
