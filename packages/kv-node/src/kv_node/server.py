"""Run a node: open the store, serve gRPC, drain and close on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kv.v1 import cluster_pb2, cluster_pb2_grpc, kv_pb2, kv_pb2_grpc
from kv_node.call_guard import CallGuard
from kv_node.config import ConfigError, NodeConfig, parse_address
from kv_node.replication.replica import Replication
from kv_node.servicer import ClusterServicer, KVServicer, Node
from kv_node.store import Store

QUIET_SECONDS = 0.1
QUIET_MAX_SECONDS = 1.0
"""A stopping node keeps refusing SHUTTING_DOWN until no call came for ``QUIET_SECONDS`` (at most
``QUIET_MAX_SECONDS``) before its gRPC server stops: a call that meets gRPC's own stop is
CANCELLED, which its caller cannot tell from one cut short after it ran, while the SDK keeps
away from a node that refused it SHUTTING_DOWN."""

LEADERS_WAIT_SECONDS = 10.0
"""How long a replicated node waits for its partitions' leaders before it reports SERVING."""

SERVICE_NAMES = (
    kv_pb2.DESCRIPTOR.services_by_name["KVService"].full_name,
    cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name,
)


def server_options(config: NodeConfig) -> list[tuple[str, int]]:
    return [
        # A node's port is its identity: with the default (1) a second server
        # binds the same port silently and steals half the connections.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


def check_bindable(address: str, *, what: str = "listen on") -> None:
    """Fail with the OS's reason before gRPC tries, which only logs a C++ error line."""
    host, port = parse_address(address, what="address")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot {what} {address}: {exc.strerror or exc}") from exc


class NodeServer:
    """A started node. ``start`` binds everything or raises ConfigError; ``stop`` drains."""

    def __init__(self, config: NodeConfig, data: Store | Replication) -> None:
        self.config = config
        if isinstance(data, Replication):
            self.node = Node(config, None, data)
            self.node.metrics.watch_replication(data)
        else:
            self.node = Node(config, data)
        self.port = 0

    async def start(self) -> None:
        # Created here, not in __init__: aio objects belong to the running loop.
        self.guard = CallGuard(self.node)
        self.server = grpc.aio.server(
            options=server_options(self.config), interceptors=[self.guard]
        )
        self.health = health.aio.HealthServicer()
        # grpc's health servicer starts by answering SERVING for the whole server (""); a node
        # says so only once it is ready (below, in ``start``), so every name starts NOT_SERVING.
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        kv_pb2_grpc.add_KVServiceServicer_to_server(KVServicer(self.node), self.server)
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(
            ClusterServicer(self.node), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.node.replication is not None:
            self.node.replication.add_to_server(self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        listen = self.config.listen or ""
        check_bindable(listen)
        try:
            self.port = self.server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.listen}: the port is in use or the address "
                "is not local"
            ) from exc
        if self.config.metrics_listen is not None:
            metrics_host, metrics_port = parse_address(
                self.config.metrics_listen, what="metrics address"
            )
            try:
                await self.node.metrics.serve(metrics_host, metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {self.config.metrics_listen}: {exc.strerror}"
                ) from exc
        await self.server.start()
        if self.node.replication is not None:
            # Reported SERVING once every partition here has a leader (or after a bound, when
            # too few peers are up for some to elect one), so that a cluster that says it is
            # up does not begin by refusing writes for an election.
            self.node.replication.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.node.replication.all_led.wait(), LEADERS_WAIT_SECONDS)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        """Hand leaderships off (replicated), refuse new requests, let in-flight ones finish,
        then close the store."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        replication = self.node.replication
        if replication is not None:
            # Before refusing anything: the partitions led here get a new leader while this
            # node still answers, so callers learn it from NOT_LEADER refusals (which never
            # ran) rather than from failed connects and an election timeout after it is gone.
            moved = await replication.hand_off()
            if not moved:
                print(
                    f"kv-node {self.config.node_id}: some leaderships did not move before "
                    "stopping; their partitions elect a leader after it stops",
                    file=sys.stderr,
                    flush=True,
                )
        self.node.draining = True
        if replication is not None:
            # Peers' Raft streams never end by themselves: let the calls in flight finish
            # (they need the runtime), then stop replicating, which ends the streams both
            # ways, so that the server's stop below does not wait out the whole grace.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.guard.idle.wait(), self.config.drain_seconds)
            await self._until_quiet()
            await replication.stop()
        await self.server.stop(self.config.drain_seconds)
        if self.node.committer is not None:
            await self.node.committer.drain()
        await self.node.peers.close()
        await self.node.metrics.close()
        if self.node.store is not None:
            self.node.store.close()

    async def _until_quiet(self) -> None:
        """Wait until callers stopped sending here (see ``QUIET_SECONDS``); every call counts,
        refusals included, so ``requests_served`` still moving means someone still sends."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + QUIET_MAX_SECONDS
        seen = self.node.requests_served
        while loop.time() < give_up:
            await asyncio.sleep(QUIET_SECONDS)
            if self.node.requests_served == seen:
                return
            seen = self.node.requests_served


async def close(data: Store | Replication | None) -> None:
    """Close the node's data: a single-copy store, or replication (runtime, streams, store)."""
    if isinstance(data, Replication):
        await data.stop()
    elif data is not None:
        data.close()


def describe(config: NodeConfig, data: Store | Replication) -> str:
    cluster = config.cluster_map
    where = f" in {config.data_dir}" if config.data_dir else ""
    if isinstance(data, Replication):
        hosted = len(data.driver.groups)
        store_line = f"  store: lmdb replicas{where}, {data.store.count()} records"
        placed = f"replication factor {cluster.replication_factor}, {hosted} replicated here"
    else:
        owned = len(cluster.placement.owned_partitions(config.node_id))
        store_line = f"  store: {data.engine}{where}, {data.count()} keys, revision {data.revision}"
        placed = f"{owned} owned here"
    lines = [
        f"kv-node {config.node_id} listening on {config.listen} (advertised {config.advertise})",
        store_line,
        f"  cluster: {len(cluster.members)} nodes, {cluster.partitions} partitions, {placed}",
    ]
    if config.metrics_listen:
        lines.append(f"  metrics: http://{config.metrics_listen}/metrics")
    return "\n".join(lines)


async def serve(
    config: NodeConfig,
    data: Store | Callable[[], Replication],
    *,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and close.

    ``data`` is a single-copy store, or what builds the replication (inside the event loop,
    where its asyncio parts must be created)."""
    opened = data if not callable(data) else data()
    node_server = NodeServer(config, opened)
    try:
        await node_server.start()
    except BaseException:
        await close(opened)
        raise
    print(describe(config, opened), flush=True)
    if ready is not None:
        ready()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    waits = [asyncio.ensure_future(stopping.wait())]
    if isinstance(opened, Replication):
        waits.append(asyncio.ensure_future(opened.runtime.stopped.wait()))
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    failure = opened.runtime.failure if isinstance(opened, Replication) else None
    if failure is None:
        print(f"kv-node {config.node_id} stopping: draining in-flight requests", file=sys.stderr)
    await node_server.stop()
    if failure is not None:
        raise ReplicationFailed(f"replication stopped: {failure}") from failure
    print(f"kv-node {config.node_id} stopped", file=sys.stderr, flush=True)


class ReplicationFailed(Exception):
    """The replication runtime could not go on (a failed write to the replica store): the
    node exits rather than serve with promises it may have broken."""
