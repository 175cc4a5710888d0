"""The SDK with a node that accepts calls and never answers (a paused leader).

Three fake nodes on 127.0.0.1 serve a replicated map: ``a``, the first replica of the key,
holds every call forever; ``b`` leads the key's partition; ``c`` refuses NOT_LEADER naming
``b``. With a short ``patience``, a read is sent again elsewhere and answered; a put already
sent to ``a`` is waited for (an unconditional write is never sent twice), while the next put
goes to ``b``. Nothing here sleeps: the stuck node is an Event that is never set.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from harness import running_cluster
from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_client import AsyncClient, Client, KvError, RetryPolicy, UnavailableError
from kv_common.cluster_map import ClusterMap, Member
from kv_common.wire import ErrorInfo, Reason, encode_status

PATIENCE = 0.2
CALL_TIMEOUT = 10.0
TEST_TIMEOUT = 30.0
NAMES = ("a", "b", "c")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeNode(kv_pb2_grpc.KVServiceServicer, cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, name: str, cluster_map: ClusterMap, stuck: asyncio.Event) -> None:
        self.name = name
        self.map = cluster_map
        self.stuck = stuck
        self.received: list[str] = []
        self.arrived = asyncio.Event()

    async def _serve(self, kind: str, context: Any) -> None:
        self.received.append(kind)
        self.arrived.set()
        if self.name == "a":
            await self.stuck.wait()  # paused: never answers
        if self.name == "c":
            status = rpc_status.to_status(
                encode_status(
                    grpc.StatusCode.UNAVAILABLE.value[0],
                    "not the leader",
                    ErrorInfo(Reason.NOT_LEADER, {"leader_id": "b", "partition": "0"}),
                )
            )
            await context.abort(status.code, status.details, status.trailing_metadata)

    async def Put(self, request: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        await self._serve("put", context)
        return kv_pb2.PutResponse(succeeded=True, version=len(self.received))

    async def Get(self, request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
        await self._serve("get", context)
        return kv_pb2.GetResponse(found=True, value=b"from-" + self.name.encode(), version=1)

    async def Delete(self, request: kv_pb2.DeleteRequest, context: Any) -> kv_pb2.DeleteResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used here")
        raise AssertionError("abort raises")

    async def Batch(self, request: kv_pb2.BatchRequest, context: Any) -> kv_pb2.BatchResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used here (no coalescing)")
        raise AssertionError("abort raises")

    async def GetNodeStatus(
        self, request: cluster_pb2.GetNodeStatusRequest, context: Any
    ) -> cluster_pb2.GetNodeStatusResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used here")
        raise AssertionError("abort raises")

    async def GetClusterMap(
        self, request: cluster_pb2.GetClusterMapRequest, context: Any
    ) -> cluster_pb2.GetClusterMapResponse:
        return cluster_pb2.GetClusterMapResponse(cluster_map=self.map.to_proto())


def test_a_stuck_replica_does_not_hold_reads_or_later_writes() -> None:
    async def main() -> None:
        members = tuple(Member(name, f"127.0.0.1:{free_port()}") for name in NAMES)
        cluster_map = ClusterMap.build(
            epoch=1, members=members, partitions=16, replication_factor=3, vnodes=8
        )
        key = next(
            f"k{i}"
            for i in range(10_000)
            if cluster_map.placement.replicas_for_key(f"k{i}".encode())[0] == "a"
        )
        stuck = asyncio.Event()
        nodes = {name: FakeNode(name, cluster_map, stuck) for name in NAMES}
        servers = []
        try:
            for member in members:
                server = grpc.aio.server()
                kv_pb2_grpc.add_KVServiceServicer_to_server(nodes[member.node_id], server)
                cluster_pb2_grpc.add_ClusterServiceServicer_to_server(nodes[member.node_id], server)
                server.add_insecure_port(member.address)
                await server.start()
                servers.append(server)
            policy = RetryPolicy(patience=PATIENCE)
            seeds = [members[1].address]
            async with AsyncClient(seeds, timeout=CALL_TIMEOUT, retry=policy) as kv:
                # A read sent to the stuck node is abandoned at its patience, sent again.
                started = time.monotonic()
                assert await kv.get(key) == b"from-b"
                assert nodes["a"].received == ["get"]
                assert time.monotonic() - started < CALL_TIMEOUT / 2

            async with AsyncClient(seeds, timeout=CALL_TIMEOUT, retry=policy) as kv:
                first = asyncio.ensure_future(kv.put(key, "1"))
                await nodes["a"].arrived.wait()
                # Once the first put has outlived its patience, its node is suspect (the
                # condition polled, as the cluster tests' ``until`` does)...
                while not kv._leaders.is_suspect("a", time.monotonic()):
                    assert not first.done()
                    await asyncio.sleep(PATIENCE / 10)
                # ...the second put goes elsewhere, and the first is still waited for:
                # sent once, never abandoned.
                assert await kv.put(key, "2") >= 1
                assert not first.done()
                assert nodes["a"].received == ["get", "put"]
                assert "put" in nodes["b"].received
                stuck.set()  # resumed: the first put is answered
                assert await first >= 1
        finally:
            stuck.set()
            for server in servers:
                await server.stop(None)

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


FROZEN_CALL_TIMEOUT = 20.0
"""Far above keepalive's verdict (a ping a second, 500 ms to answer): only a channel without
keepalive waits for it."""


def test_a_call_to_a_frozen_node_ends_by_keepalive_not_by_its_deadline(tmp_path: Path) -> None:
    """A SIGSTOPped node keeps its socket and never answers, not even gRPC's pings: the call
    in flight fails UNAVAILABLE (outcome unknown) instead of waiting out its deadline, so a
    caller moves on (and, replicated, to another replica)."""
    with running_cluster(tmp_path, ["n1"]) as cluster:
        node = cluster.nodes["n1"]
        with Client(node.address, timeout=FROZEN_CALL_TIMEOUT) as kv:
            kv.put("k", "before")
            node.pause()
            try:
                with pytest.raises(KvError) as failed:
                    kv.put("k", "while frozen")
            finally:
                node.resume()
        assert isinstance(failed.value, UnavailableError), failed.value
        assert not failed.value.never_ran
