"""The node under attack, and what it must still hold after every attack.

A ``Target`` is a real ``kv-node`` process on the lmdb engine (plus, for routing attacks, a
second one), reached over raw gRPC so that tests can send any bytes. Every reply the tests see
goes through ``Ledger.observe``, which decodes the request and the reply the way a client
would and keeps what the node acknowledged: a key's value and version, or its absence. A call
whose outcome is unknown (cancelled, timed out) leaves its keys "maybe": either as before or
as written, never anything else.

``check_intact`` is the after-every-attack check (health, then every key read back), and
``crash_and_check`` the final one of a module: kill -9, restart on the same data directory,
and every acknowledged write is still there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import Cluster
from kv.v1 import cluster_pb2, kv_pb2
from kv_common.cluster_map import ClusterMap, Limits
from kv_common.wire import ERROR_DOMAIN, ErrorInfo, decode_status_details
from kv_tools.launcher import cluster_spec

CALL_TIMEOUT = 10.0
"""Generous: the suite shares two cores with other work; a hostile test never waits on speed."""

GET_FRAMING_BYTES = 16
"""More than the tags and lengths a Get adds around its key inside a Batch."""

KIB = 1024

UNKNOWN_OUTCOME = (
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
)
"""Codes after which a write may or may not have been applied (the ledger keeps both)."""

UNKNOWN_OUTCOME_CODES = frozenset(code.value[0] for code in UNKNOWN_OUTCOME)

Value = tuple[bytes, int] | None
"""What the ledger knows of a key: its value and version, or None for absent."""


def method(name: str) -> str:
    service = "ClusterService" if name in ("GetClusterMap", "GetNodeStatus") else "KVService"
    return f"/kv.v1.{service}/{name}"


KV_METHODS = ("Put", "Get", "Delete", "Batch")
ALL_METHODS = (*KV_METHODS, "GetClusterMap", "GetNodeStatus")


def rss_anon_kib(pid: int) -> int:
    """The process's anonymous resident memory: its heap, without LMDB's file-backed map,
    whose pages count as resident while the data file is cached and say nothing of leaks."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def error_info(error: grpc.RpcError) -> ErrorInfo | None:
    assert isinstance(error, grpc.Call)
    return decode_status_details(tuple(error.trailing_metadata() or ()))


@dataclass
class Ledger:
    """What the node acknowledged, key by key, as a client decoding its replies knows it."""

    known: dict[bytes, Value] = field(default_factory=dict)
    maybe: dict[bytes, list[Value]] = field(default_factory=dict)
    """Keys whose last write has an unknown outcome: any of these (the state before it first)."""

    def acked(self, key: bytes, value: Value) -> None:
        self.known[key] = value
        self.maybe.pop(key, None)

    def unknown(self, key: bytes, value: Value) -> None:
        """A write of ``value`` to ``key`` that may or may not have been applied."""
        before = self.maybe.get(key) or [self.known.get(key)]
        self.maybe[key] = [*before, value]
        self.known.pop(key, None)

    def observe(self, name: str, request: bytes, reply: bytes | None) -> None:
        """Record the writes in one call's request, acknowledged if ``reply`` is given."""
        if name == "Batch":
            batch = kv_pb2.BatchRequest.FromString(request)
            results = kv_pb2.BatchResponse.FromString(reply).results if reply is not None else None
            for index, operation in enumerate(batch.operations):
                kind = operation.WhichOneof("op")
                result = results[index] if results is not None else None
                if result is not None and result.WhichOneof("result") == "error":
                    if result.error.code not in UNKNOWN_OUTCOME_CODES:
                        continue  # refused: nothing written
                    result = None  # the owner may have applied it
                if kind == "put":
                    self._put(operation.put, result.put if result is not None else None)
                elif kind == "delete":
                    self._delete(operation.delete, result.delete if result is not None else None)
        elif name == "Put":
            put = kv_pb2.PutRequest.FromString(request)
            self._put(put, kv_pb2.PutResponse.FromString(reply) if reply is not None else None)
        elif name == "Delete":
            delete = kv_pb2.DeleteRequest.FromString(request)
            reply_message = kv_pb2.DeleteResponse.FromString(reply) if reply is not None else None
            self._delete(delete, reply_message)

    def _put(self, put: kv_pb2.PutRequest, reply: kv_pb2.PutResponse | None) -> None:
        if not put.key:
            return
        if reply is None:
            self.unknown(put.key, (put.value, -1))
        elif reply.succeeded:
            self.acked(put.key, (put.value, reply.version))

    def _delete(self, delete: kv_pb2.DeleteRequest, reply: kv_pb2.DeleteResponse | None) -> None:
        if not delete.key:
            return
        if reply is None:
            self.unknown(delete.key, None)
        elif reply.succeeded:
            self.acked(delete.key, None)

    def mismatches(self, read: dict[bytes, Value]) -> list[str]:
        """Every key whose read-back value the ledger does not allow (version -1: any)."""
        wrong = []
        for key, expected in self.known.items():
            if read[key] != expected:
                wrong.append(f"{key!r}: read {read[key]!r}, acknowledged {expected!r}")
        for key, options in self.maybe.items():
            got = read[key]
            if not any(_allows(option, got) for option in options):
                wrong.append(f"{key!r}: read {got!r}, expected one of {options!r}")
        return wrong

    def keys(self) -> list[bytes]:
        return [*self.known, *self.maybe]


def _allows(option: Value, got: Value) -> bool:
    """An unknown put is recorded with version -1: its value must match, any version will do."""
    if option is None or got is None:
        return option == got
    return option[0] == got[0] and option[1] in (-1, got[1])


class Target:
    """Real nodes on lmdb, a raw channel to each, and the ledger of what they acknowledged."""

    def __init__(
        self,
        root: Path,
        ids: Sequence[str],
        extra: Sequence[str] = (),
        stand_ins: dict[str, str] | None = None,
    ) -> None:
        """``stand_ins`` maps members that are not started to the address of a stand-in
        server (a ``HungOwner``, say) that the started nodes forward to."""
        self.cluster = Cluster(root, list(ids), extra=list(extra))
        if stand_ins:
            nodes = self.cluster.nodes
            spec = cluster_spec({i: stand_ins.get(i) or n.address for i, n in nodes.items()})
            for node in nodes.values():
                node.cluster = spec
            for node_id in stand_ins:
                del nodes[node_id]
        self.ledger = Ledger()
        self._channels: dict[str, grpc.Channel] = {}
        self._limits: Limits | None = None

    def start(self) -> None:
        self.cluster.start()

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self.cluster.stop()

    def address(self, node_id: str | None = None) -> str:
        return self.cluster.nodes[node_id or self.first].address

    @property
    def first(self) -> str:
        return next(iter(self.cluster.nodes))

    def pid(self, node_id: str | None = None) -> int:
        return self.cluster.nodes[node_id or self.first].running().pid

    def channel(self, node_id: str | None = None) -> grpc.Channel:
        node_id = node_id or self.first
        if node_id not in self._channels:
            self._channels[node_id] = grpc.insecure_channel(self.address(node_id))
        return self._channels[node_id]

    def raw(
        self, name: str, node_id: str | None = None
    ) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
        """A call that sends and returns bytes as they are: no serializer in between."""
        return self.channel(node_id).unary_unary(method(name))

    def call(
        self,
        name: str,
        request: bytes,
        *,
        node_id: str | None = None,
        timeout: float = CALL_TIMEOUT,
        metadata: tuple[tuple[str, str | bytes], ...] | None = None,
        compression: grpc.Compression | None = None,
        channel: grpc.Channel | None = None,
    ) -> bytes:
        """Send ``request`` (on ``channel`` if given) and record what the node acknowledged;
        a refusal is raised."""
        call = channel.unary_unary(method(name)) if channel else self.raw(name, node_id)
        try:
            reply = call(request, timeout=timeout, metadata=metadata, compression=compression)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() in UNKNOWN_OUTCOME:
                self._record(name, request, None)
            raise
        self._record(name, request, reply)
        return reply

    def _record(self, name: str, request: bytes, reply: bytes | None) -> None:
        try:
            self.ledger.observe(name, request, reply)
        except Exception:
            # The node refused or ignored a request that does not decode: nothing written.
            if reply is not None:
                raise

    def put(self, key: bytes, value: bytes, *, node_id: str | None = None) -> int:
        reply = kv_pb2.PutResponse.FromString(
            self.call(
                "Put",
                kv_pb2.PutRequest(key=key, value=value).SerializeToString(),
                node_id=node_id,
            )
        )
        assert reply.succeeded
        return reply.version

    def read(self, keys: Sequence[bytes], node_id: str | None = None) -> dict[bytes, Value]:
        """Read ``keys`` with as few Batch calls as the node's published limits allow."""
        found: dict[bytes, Value] = {}
        for chunk in self._chunks(keys):
            request = kv_pb2.BatchRequest(
                operations=[kv_pb2.Operation(get=kv_pb2.GetRequest(key=k)) for k in chunk]
            )
            reply = kv_pb2.BatchResponse.FromString(
                self.raw("Batch", node_id)(request.SerializeToString(), timeout=CALL_TIMEOUT)
            )
            for key, result in zip(chunk, reply.results, strict=True):
                assert result.WhichOneof("result") == "get", result
                got = result.get
                found[key] = (got.value, got.version) if got.found else None
        return found

    def _chunks(self, keys: Sequence[bytes]) -> Iterator[list[bytes]]:
        if self._limits is None:
            self._limits = self.cluster_map().limits
        most_ops, most_bytes = self._limits.max_batch_ops, self._limits.max_batch_bytes
        chunk: list[bytes] = []
        size = 0
        for key in keys:
            cost = len(key) + GET_FRAMING_BYTES
            if chunk and (len(chunk) == most_ops or size + cost > most_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append(key)
            size += cost
        if chunk:
            yield chunk

    def settle(self, name: str, request: bytes, future: grpc.Future[bytes]) -> bytes | None:
        """Wait for a call started with ``raw(name).future``; record it; its reply or None."""
        try:
            reply = future.result(timeout=CALL_TIMEOUT)
        except grpc.FutureCancelledError:
            self._record(name, request, None)
            return None
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() in UNKNOWN_OUTCOME:
                self._record(name, request, None)
                return None
            raise
        self._record(name, request, reply)
        return reply

    def cluster_map(self) -> ClusterMap:
        reply = cluster_pb2.GetClusterMapResponse.FromString(
            self.raw("GetClusterMap")(
                cluster_pb2.GetClusterMapRequest().SerializeToString(), timeout=CALL_TIMEOUT
            )
        )
        return ClusterMap.from_proto(reply.cluster_map)

    def healthy(self, node_id: str | None = None) -> bool:
        health = health_pb2_grpc.HealthStub(self.channel(node_id))
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def check_intact(self) -> None:
        """Every node answers health checks, and every key reads back as acknowledged."""
        for node_id, node in self.cluster.nodes.items():
            assert node.running().poll() is None, f"node {node_id} died: {node.output()[-2000:]}"
            assert self.healthy(node_id), f"node {node_id} is not SERVING"
        read = self.read(self.ledger.keys())
        wrong = self.ledger.mismatches(read)
        assert not wrong, f"{len(wrong)} keys differ from the ledger: {wrong[:5]}"

    def crash_and_check(self) -> None:
        """kill -9 every node, restart each on its data directory, and check the ledger."""
        assert self.ledger.known, "nothing acknowledged: the final check would prove nothing"
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for node in self.cluster.nodes.values():
            node.kill()
        for node in self.cluster.nodes.values():
            node.start()
        for node in self.cluster.nodes.values():
            node.wait_ready()
        self.check_intact()


@contextmanager
def hostile_target(
    root: Path,
    ids: Sequence[str] = ("n1",),
    extra: Sequence[str] = (),
    stand_ins: dict[str, str] | None = None,
) -> Iterator[Target]:
    """A started target with a few writes to its first node acknowledged, stopped however
    it ends."""
    target = Target(root, ids, extra, stand_ins)
    try:
        target.start()
        cluster_map = target.cluster_map()
        seeds = (b"seed/%d" % i for i in range(SEED_WRITES * len(ids) * 10))
        mine = [k for k in seeds if cluster_map.owner_of(k)[0] == target.first]
        for key in mine[:SEED_WRITES]:
            target.put(key, b"seed-value-" + key)
        yield target
    finally:
        target.stop()


SEED_WRITES = 20
"""Writes made before any attack, so that "earlier writes read back intact" always has some."""


def is_kv_refusal(error: grpc.RpcError) -> bool:
    """A refusal of the node's own: it carries an ErrorInfo of domain kv.v1."""
    assert isinstance(error, grpc.Call)
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return ERROR_DOMAIN.encode() in value
    return False


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll a condition another process makes true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
