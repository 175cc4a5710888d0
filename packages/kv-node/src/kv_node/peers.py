"""One pooled gRPC channel per peer, created on first use."""

from __future__ import annotations

import grpc

from kv.v1 import kv_pb2_grpc

RECONNECT_OPTIONS: list[tuple[str, int]] = [
    # gRPC backs off up to 120 s between reconnects by default; a restarted peer
    # would then look dead for minutes. Keep retries frequent and cheap.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Peers:
    def __init__(self, addresses: dict[str, str], *, max_message_bytes: int) -> None:
        self._addresses = addresses
        self._options = [
            *RECONNECT_OPTIONS,
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, kv_pb2_grpc.KVServiceAsyncStub] = {}

    def address(self, node_id: str) -> str:
        return self._addresses[node_id]

    def kv(self, node_id: str) -> kv_pb2_grpc.KVServiceAsyncStub:
        stub = self._stubs.get(node_id)
        if stub is None:
            channel = grpc.aio.insecure_channel(self._addresses[node_id], options=self._options)
            self._channels[node_id] = channel
            stub = self._stubs[node_id] = kv_pb2_grpc.KVServiceStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
