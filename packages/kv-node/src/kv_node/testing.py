"""Nodes served in this process from one background event loop, for tests that need real gRPC.

Cheaper than node processes and easier to inspect (``server.node`` is the live servicer), so the
node's own tests and the SDK's integration tests use it; crash and restart tests use processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from concurrent import futures
from concurrent.futures import Future
from typing import Any

import grpc

from kv.v1 import kv_pb2
from kv_node.config import NodeConfig
from kv_node.server import NodeServer
from kv_node.store.memory import MemoryStore


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server's own bind is the real check)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


HUNG_OWNER_THREADS = 64
"""Calls a ``HungOwner`` can hold at once (more than any test sends it)."""

TEST_SETTINGS: dict[str, Any] = {
    "engine": "memory",
    "replication_factor": 1,
    "max_value_bytes": 1024,
    "max_batch_ops": 50,
    "max_batch_bytes": 16 * 1024,
    "partitions": 256,
    "vnodes": 64,
    "forward_timeout": 2.0,
    "drain_seconds": 0.5,
}
"""Where test nodes differ from ``NodeConfig``'s defaults: small limits that tests can reach,
few partitions, the memory engine (so one copy: replication has its own tests). Any
``NodeConfig`` field can be overridden by name."""


class InProcessCluster:
    """Nodes served from one background event loop, for tests that need real gRPC.

    ``addresses`` maps a node id to a free port, or to an address given in ``addresses``
    (a stand-in server, say); ``settings`` override ``TEST_SETTINGS`` field by field.
    """

    def __init__(
        self,
        ids: list[str],
        *,
        down: tuple[str, ...] = (),
        addresses: dict[str, str] | None = None,
        **settings: Any,
    ) -> None:
        given = addresses or {}
        self.addresses = {
            node_id: given.get(node_id) or f"127.0.0.1:{free_port()}" for node_id in ids
        }
        cluster = ",".join(f"{i}={a}" for i, a in self.addresses.items())
        options = {**TEST_SETTINGS, **settings}
        self.configs: dict[str, NodeConfig] = {
            node_id: NodeConfig(node_id=node_id, cluster=cluster, **options) for node_id in ids
        }
        self.servers: dict[str, NodeServer] = {}
        self._down = down
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the nodes' event loop and wait for its result."""
        return self._submit(coro)

    def _submit(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=20)

    def start(self) -> None:
        self._thread.start()
        for node_id, config in self.configs.items():
            if node_id in self._down:
                continue
            server = NodeServer(config, MemoryStore())
            self._submit(server.start())
            self.servers[node_id] = server

    def stop(self) -> None:
        """Stop every node even if one fails to stop, then the loop."""
        try:
            for server in self.servers.values():
                with contextlib.suppress(Exception):
                    self._submit(server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def owner(self, key: bytes) -> str:
        return next(iter(self.configs.values())).cluster_map.placement.owner_of_key(key)

    def key_owned_by(self, node_id: str, prefix: str = "key") -> bytes:
        for i in range(10_000):
            key = f"{prefix}-{i}".encode()
            if self.owner(key) == node_id:
                return key
        raise AssertionError(f"no key found for {node_id}")


class HungOwner:
    """A gRPC server that accepts every KV call and answers none until the test ends.

    Tests wait on ``wait_holding`` (an event, not a sleep) to know that calls reached it.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self._holding = 0
        self._changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=HUNG_OWNER_THREADS))
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: grpc.unary_unary_rpc_method_handler(
                self._hang,
                request_deserializer=request.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
            for name, request in (
                ("Get", kv_pb2.GetRequest),
                ("Put", kv_pb2.PutRequest),
                ("Delete", kv_pb2.DeleteRequest),
                ("Batch", kv_pb2.BatchRequest),
            )
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("kv.v1.KVService", handlers),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _hang(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._changed:
            self._holding += 1
            self._changed.notify_all()
        try:
            self.release.wait()
            context.abort(grpc.StatusCode.UNAVAILABLE, "hung owner released")
        finally:
            with self._changed:
                self._holding -= 1
                self._changed.notify_all()

    def wait_holding(self, count: int, timeout: float = 30.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._holding >= count, timeout=timeout)

    def stop(self) -> None:
        self.release.set()
        self.server.stop(grace=None)
