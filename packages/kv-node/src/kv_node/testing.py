"""Nodes served in this process from one background event loop, for tests that need real gRPC.

Cheaper than node processes and easier to inspect (``server.node`` is the live servicer), so the
node's own tests and the SDK's integration tests use it; crash and restart tests use processes.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import Future
from typing import Any

from kv_node.config import NodeConfig, build_config
from kv_node.server import NodeServer
from kv_node.store.memory import MemoryStore


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server's own bind is the real check)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class InProcessCluster:
    """Nodes served from one background event loop, for tests that need real gRPC."""

    def __init__(self, ids: list[str], *, down: tuple[str, ...] = (), **settings: Any) -> None:
        self.addresses = {node_id: f"127.0.0.1:{free_port()}" for node_id in ids}
        cluster = ",".join(f"{i}={a}" for i, a in self.addresses.items())
        self.configs: dict[str, NodeConfig] = {}
        for node_id in ids:
            options: dict[str, Any] = {
                "listen": None,
                "advertise": None,
                "engine": "memory",
                "data_dir": None,
                "metrics_listen": None,
                "max_value_bytes": 1024,
                "max_batch_ops": 50,
                "max_batch_bytes": 16 * 1024,
                "partitions": 256,
                "vnodes": 64,
                "forward_timeout": 2.0,
                "drain_seconds": 0.5,
                "lmdb_map_size": 1 << 24,
            }
            options.update(settings)
            self.configs[node_id] = build_config(node_id=node_id, cluster=cluster, **options)
        self.servers: dict[str, NodeServer] = {}
        self._down = down
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

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
        for server in self.servers.values():
            self._submit(server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def owner(self, key: bytes) -> str:
        return next(iter(self.configs.values())).cluster.placement.owner_of_key(key)

    def key_owned_by(self, node_id: str, prefix: str = "key") -> bytes:
        for i in range(10_000):
            key = f"{prefix}-{i}".encode()
            if self.owner(key) == node_id:
                return key
        raise AssertionError(f"no key found for {node_id}")
