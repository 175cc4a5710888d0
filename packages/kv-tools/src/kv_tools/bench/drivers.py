"""Drivers: one async interface over every system the bench can load.

``setup`` connects (and checks the target answers), ``put``/``get`` are one operation in one
request, ``batch`` is many operations in one request (returns how many of them failed), and
``close`` releases connections. ``run`` picks unary or batch by the number of operations.

* ``StubDriver``   kv.v1 through a raw generated stub on one channel: the echo server, or a
                   kv node that forwards whatever it does not own ("via one node").
* ``SdkDriver``    kv through ``kv_client.AsyncClient``: routes each key to its owner.
* ``EtcdDriver``   etcd v3's gRPC KV API over one member or round-robin over several, messages
                   encoded by hand (``etcd_wire``).
* ``RedisDriver``  Redis through redis-py's asyncio client; batches are pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kv.v1 import kv_pb2, kv_pb2_grpc
from kv_client import AsyncClient, KvError
from kv_client.batch import Get, Put
from kv_tools.bench import etcd_wire
from kv_tools.bench.workload import PUT, Op

DEFAULT_TIMEOUT = 10.0
# The bench's own channels (echo, one node, etcd): quick reconnects, large messages, and
# never through an http_proxy of the environment (every target is on 127.0.0.1).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class DriverError(Exception):
    """A target that cannot be driven (not reachable, or answers wrongly)."""


class Driver:
    """The interface every target implements."""

    name = "driver"

    async def setup(self) -> None:
        """Connect and check that the target answers."""

    async def put(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    async def get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    async def batch(self, ops: Sequence[Op]) -> int:
        """Run ``ops`` in one request; returns how many of them failed."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""

    async def run(self, ops: Sequence[Op]) -> int:
        if len(ops) == 1:
            op = ops[0]
            if op.kind == PUT:
                await self.put(op.key, op.value)
            else:
                await self.get(op.key)
            return 0
        return await self.batch(ops)


def _batch_request(ops: Sequence[Op]) -> kv_pb2.BatchRequest:
    return kv_pb2.BatchRequest(
        operations=[
            kv_pb2.Operation(put=kv_pb2.PutRequest(key=op.key, value=op.value))
            if op.kind == PUT
            else kv_pb2.Operation(get=kv_pb2.GetRequest(key=op.key))
            for op in ops
        ]
    )


def _failed(response: kv_pb2.BatchResponse, expected: int) -> int:
    if len(response.results) != expected:
        raise DriverError(f"batch of {expected} got {len(response.results)} results")
    return sum(1 for r in response.results if r.WhichOneof("result") == "error")


class StubDriver(Driver):
    """kv.v1 over one channel to one address, no routing."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = f"stub:{address}"
        self._address = address
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: kv_pb2_grpc.KVServiceAsyncStub | None = None

    async def setup(self) -> None:
        self._channel = grpc.aio.insecure_channel(self._address, options=CHANNEL_OPTIONS)
        self._stub = kv_pb2_grpc.KVServiceStub(self._channel)
        try:
            await self._stub.Get(
                kv_pb2.GetRequest(key=b"bench-probe"), timeout=self._timeout, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise DriverError(f"{self._address} does not answer kv.v1 Get: {exc}") from None

    def _kv(self) -> kv_pb2_grpc.KVServiceAsyncStub:
        if self._stub is None:
            raise DriverError("driver used before setup()")
        return self._stub

    async def put(self, key: bytes, value: bytes) -> None:
        await self._kv().Put(kv_pb2.PutRequest(key=key, value=value), timeout=self._timeout)

    async def get(self, key: bytes) -> bytes | None:
        response = await self._kv().Get(kv_pb2.GetRequest(key=key), timeout=self._timeout)
        return response.value if response.found else None

    async def batch(self, ops: Sequence[Op]) -> int:
        response = await self._kv().Batch(_batch_request(ops), timeout=self._timeout)
        return _failed(response, len(ops))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None


class SdkDriver(Driver):
    """kv through the SDK's ``AsyncClient`` (direct routing to each key's owner).

    Batches go through the SDK's ``batch``; ``coalesce=False`` turns the SDK's request
    coalescing off.
    """

    def __init__(
        self, addresses: str, *, timeout: float = DEFAULT_TIMEOUT, coalesce: bool = True
    ) -> None:
        self.name = f"sdk:{addresses}"
        self._addresses = addresses
        self._timeout = timeout
        self._coalesce = coalesce
        self._client: AsyncClient | None = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise DriverError("driver used before setup()")
        return self._client

    async def setup(self) -> None:
        if self._coalesce:
            self._client = AsyncClient(self._addresses, timeout=self._timeout)
        else:
            self._client = AsyncClient(self._addresses, timeout=self._timeout, coalesce=None)
        try:
            await self._client.cluster_map(refresh=True)
            await self._client.get(b"bench-probe")
        except KvError as exc:
            raise DriverError(f"the SDK cannot reach {self._addresses}: {exc}") from None

    async def put(self, key: bytes, value: bytes) -> None:
        await self.client.put(key, value)

    async def get(self, key: bytes) -> bytes | None:
        return await self.client.get(key)

    async def batch(self, ops: Sequence[Op]) -> int:
        results = await self.client.batch(
            [Put(op.key, op.value) if op.kind == PUT else Get(op.key) for op in ops]
        )
        return sum(1 for r in results if isinstance(r, Exception))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        self._client = None


class EtcdDriver(Driver):
    """etcd v3 KV over gRPC: Put, Range (linearizable), and Txn for batches.

    With several members the calls are spread over them round-robin on one channel
    (gRPC's ``round_robin`` policy over every member's address), which is what etcd's own
    Go client (clientv3) does with several endpoints: followers forward proposals and ask
    the leader for a read index themselves, so the comparison pays etcd's internal hop as a
    user's client would. A Txn holds at most 128 operations by default, and keys are
    deduplicated because etcd rejects a txn that writes one key twice.

    ``leader_only`` sends every call to the member that leads when ``setup`` runs (asked with
    Maintenance/Status), sparing etcd the follower's hop: the best case for etcd, to show
    what the round-robin spread costs it.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        leader_only: bool = False,
    ) -> None:
        if not addresses:
            raise DriverError("etcd driver without an address")
        self.name = ("etcd-leader:" if leader_only else "etcd:") + ",".join(addresses)
        self._addresses = list(addresses)
        self._timeout = timeout
        self._leader_only = leader_only
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    async def _leader(self) -> str:
        """The address of the member that every member's Status names as leader."""
        ids: dict[int, str] = {}
        leaders: set[int] = set()
        for address in self._addresses:
            async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                status: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    "/etcdserverpb.Maintenance/Status"
                )
                try:
                    reply: bytes = await status(
                        etcd_wire.STATUS_REQUEST, timeout=self._timeout, wait_for_ready=True
                    )
                except grpc.RpcError as exc:
                    raise DriverError(f"etcd at {address} does not answer Status: {exc}") from None
            ids[etcd_wire.member_id(reply)] = address
            leaders.add(etcd_wire.status_leader(reply))
        leader = leaders.pop() if len(leaders) == 1 else 0
        if leader not in ids:
            raise DriverError(f"etcd members do not agree on a leader among them: {leaders}")
        return ids[leader]

    async def setup(self) -> None:
        if self._leader_only:
            self._addresses = [await self._leader()]
        if len(self._addresses) == 1:
            channel = grpc.aio.insecure_channel(self._addresses[0], options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(
                "ipv4:" + ",".join(self._addresses),
                options=[*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")],
            )
        self._channel = channel
        for method in ("Put", "Range", "Txn"):
            self._calls[method] = channel.unary_unary(f"/etcdserverpb.KV/{method}")
        try:
            await self._call("Range")(
                etcd_wire.range_request(b"bench-probe"), timeout=self._timeout, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise DriverError(f"etcd at {self.name} does not answer Range: {exc}") from None

    def _call(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        if method not in self._calls:
            raise DriverError("driver used before setup()")
        return self._calls[method]

    async def put(self, key: bytes, value: bytes) -> None:
        await self._call("Put")(etcd_wire.put_request(key, value), timeout=self._timeout)

    async def get(self, key: bytes) -> bytes | None:
        return etcd_wire.range_value(await self.range(key))

    async def range(self, key: bytes) -> bytes:
        """The raw RangeResponse (its header names the member that answered)."""
        return await self._call("Range")(etcd_wire.range_request(key), timeout=self._timeout)

    async def batch(self, ops: Sequence[Op]) -> int:
        unique = list({(op.kind, op.key): op for op in ops}.values())
        await self._call("Txn")(etcd_wire.txn_request(unique), timeout=self._timeout)
        return 0

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._calls = {}


class RedisDriver(Driver):
    """Redis through redis-py's asyncio client: SET/GET, batches as non-transactional
    pipelines of the same size."""

    def __init__(self, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = f"redis:{host}:{port}"
        self._host = host
        self._port = port
        self._timeout = timeout
        self._redis: Redis | None = None

    def _client(self) -> Redis:
        if self._redis is None:
            raise DriverError("driver used before setup()")
        return self._redis

    async def setup(self) -> None:
        self._redis = Redis(host=self._host, port=self._port, socket_timeout=self._timeout)
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise DriverError(f"redis at {self._host}:{self._port}: {exc}") from None

    async def put(self, key: bytes, value: bytes) -> None:
        await self._client().set(key, value)

    async def get(self, key: bytes) -> bytes | None:
        value = await self._client().get(key)
        return value.encode() if isinstance(value, str) else value

    async def batch(self, ops: Sequence[Op]) -> int:
        async with self._client().pipeline(transaction=False) as pipe:
            for op in ops:
                if op.kind == PUT:
                    pipe.set(op.key, op.value)
                else:
                    pipe.get(op.key)
            results = await pipe.execute(raise_on_error=False)
        return sum(1 for r in results if isinstance(r, Exception))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        self._redis = None
