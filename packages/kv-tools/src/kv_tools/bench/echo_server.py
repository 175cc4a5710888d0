"""The echo target: kv.v1's services with no store behind them.

It answers every KVService call at once with a response of the same shape a node sends
(Put: succeeded, version 1; Get: found, a fixed value; Batch: one result per operation), and
ClusterService with a one-member map pointing at itself, so the SDK can drive it too. It is
the floor for "what does gRPC + protobuf + asyncio cost on this machine": a node can be
compared against it, one ratio per configuration.

Run it in its own process (its own GIL and core, like a node):
``python -m kv_tools.bench.echo_server --listen 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_common.placement import DEFAULT_PARTITIONS, DEFAULT_VNODES

Context = grpc.aio.ServicerContext[Any, Any]

ECHO_NODE_ID = "echo"


class EchoKV(kv_pb2_grpc.KVServiceServicer):
    def __init__(self, value: bytes) -> None:
        self._put = kv_pb2.PutResponse(succeeded=True, version=1)
        self._get = kv_pb2.GetResponse(found=True, value=value, version=1)
        self._delete = kv_pb2.DeleteResponse(succeeded=True, found=True, version=1)
        self._results = {
            "put": kv_pb2.OperationResult(put=self._put),
            "get": kv_pb2.OperationResult(get=self._get),
            "delete": kv_pb2.OperationResult(delete=self._delete),
        }
        self._invalid = kv_pb2.OperationResult(
            error=kv_pb2.OperationError(code=3, message="operation sets no put, get or delete")
        )

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        return self._put

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        return self._get

    async def Delete(
        self, request: kv_pb2.DeleteRequest, context: Context
    ) -> kv_pb2.DeleteResponse:
        return self._delete

    async def Batch(self, request: kv_pb2.BatchRequest, context: Context) -> kv_pb2.BatchResponse:
        results = self._results
        invalid = self._invalid
        return kv_pb2.BatchResponse(
            results=[results.get(op.WhichOneof("op") or "", invalid) for op in request.operations]
        )


class EchoCluster(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, address: str) -> None:
        self._address = address

    async def GetClusterMap(
        self, request: cluster_pb2.GetClusterMapRequest, context: Context
    ) -> cluster_pb2.GetClusterMapResponse:
        return cluster_pb2.GetClusterMapResponse(
            cluster_map=cluster_pb2.ClusterMap(
                epoch=1,
                members=[cluster_pb2.Member(id=ECHO_NODE_ID, address=self._address)],
                partition_count=DEFAULT_PARTITIONS,
                replication_factor=1,
                vnodes=DEFAULT_VNODES,
            )
        )

    async def GetNodeStatus(
        self, request: cluster_pb2.GetNodeStatusRequest, context: Context
    ) -> cluster_pb2.GetNodeStatusResponse:
        return cluster_pb2.GetNodeStatusResponse(
            node_id=ECHO_NODE_ID, address=self._address, engine="echo"
        )


async def start_echo(listen: str, value_size: int = 100) -> tuple[grpc.aio.Server, str]:
    """Start an echo server in this event loop; returns it and its host:port.

    ``listen`` may use port 0 to pick a free port.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    host = listen.rsplit(":", 1)[0]
    port = server.add_insecure_port(listen)
    address = f"{host}:{port}"
    kv_pb2_grpc.add_KVServiceServicer_to_server(EchoKV(b"v" * value_size), server)
    cluster_pb2_grpc.add_ClusterServiceServicer_to_server(EchoCluster(address), server)
    await server.start()
    return server, address


async def _serve(listen: str, value_size: int) -> None:
    server, address = await start_echo(listen, value_size)
    print(f"echo server listening on {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kv_tools.bench.echo_server")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 picks one)")
    p.add_argument("--value-size", type=int, default=100, help="bytes of the value Get returns")
    args = p.parse_args(argv)
    asyncio.run(_serve(args.listen, args.value_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
