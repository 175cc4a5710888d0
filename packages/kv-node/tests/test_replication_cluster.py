"""Three nodes' replication in one process, on real parts: LMDB replica stores in temporary
directories, gRPC transports on 127.0.0.1, the runtime's own loop and clock (short ticks).

What it shows end to end: every partition elects a leader; a write is acknowledged by the
leader with the Raft index as its version and is then on every replica; a replica that does
not lead refuses with the leader it knows; when the node leading the most partitions stops,
the others take over every partition it led, every acknowledged write is still there, and
writes go on; the stopped node restarts on its data and catches up.

Waits are on conditions with deadlines (``until``), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from kv_common.cluster_map import ClusterMap, Member
from kv_node.replication.pending import LeadershipLost
from kv_node.replication.replica import Replication, ReplicationConfig
from kv_node.replication.transport import TransportConfig
from kv_node.store import GetOp, PutOp, ReadResult, WriteResult

PARTITIONS = 8
MAP_SIZE = 1 << 26
DEADLINE = 30.0
"""Only a failing test waits this long for a condition."""
CONFIG = ReplicationConfig(
    tick_seconds=0.02,
    election_tick=10,
    transport=TransportConfig(
        heartbeat_interval=0.05, dead_after=0.3, connect_timeout=1.0, backoff_max=0.2
    ),
    seed=7,
)


COMPACT_AFTER = 20
COMPACTING = dataclasses.replace(CONFIG, compact_after=COMPACT_AFTER, keep_after_compact=5)
"""Logs compacted after a few entries, so that a stopped node falls behind compaction."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + DEADLINE
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        await asyncio.sleep(0.01)


class Cluster:
    def __init__(
        self, root: Path, names: tuple[str, ...], config: ReplicationConfig = CONFIG
    ) -> None:
        self.root = root
        self.config = config
        self.map = ClusterMap.build(
            epoch=1,
            members=tuple(Member(name, f"127.0.0.1:{free_port()}") for name in names),
            partitions=PARTITIONS,
            replication_factor=3,
            vnodes=16,
        )
        self.nodes: dict[str, Replication] = {}
        self.servers: dict[str, grpc.aio.Server] = {}

    async def start(self, name: str) -> Replication:
        replication = Replication.open(
            name, self.map, self.root / name, map_size=MAP_SIZE, config=self.config
        )
        server = grpc.aio.server()
        replication.add_to_server(server)
        server.add_insecure_port(self.map.address_of(name))
        await server.start()
        replication.start()
        self.nodes[name] = replication
        self.servers[name] = server
        return replication

    async def stop(self, name: str) -> None:
        replication = self.nodes.pop(name)
        server = self.servers.pop(name)
        await server.stop(None)
        await replication.stop()

    async def stop_all(self) -> None:
        for name in list(self.nodes):
            await self.stop(name)

    def leader_of(self, group: int) -> Replication | None:
        """The running node that leads ``group`` and is known as leader by every running node."""
        claims = {node.leader(group) for node in self.nodes.values()}
        if len(claims) != 1:
            return None
        (leader,) = claims
        return self.nodes.get(leader) if leader is not None else None

    def leaders_per_node(self) -> Counter[str]:
        leaders = [self.leader_of(group) for group in range(PARTITIONS)]
        return Counter(leader.member_id for leader in leaders if leader is not None)

    def all_led(self) -> bool:
        return all(self.leader_of(group) is not None for group in range(PARTITIONS))


def run(
    tmp_path: Path,
    scenario: Callable[[Cluster], Awaitable[None]],
    config: ReplicationConfig = CONFIG,
) -> None:
    async def main() -> None:
        cluster = Cluster(tmp_path, ("n1", "n2", "n3"), config)
        try:
            for name in ("n1", "n2", "n3"):
                await cluster.start(name)
            await until(cluster.all_led, "every partition led")
            await scenario(cluster)
        finally:
            await cluster.stop_all()

    asyncio.run(asyncio.wait_for(main(), DEADLINE * 4))


def applied_on(nodes: list[Replication], group: int, index: int) -> Callable[[], bool]:
    return lambda: all(node.store.applied(group) >= index for node in nodes)


def key_in(group: int, cluster: Cluster, tag: str) -> bytes:
    placement = cluster.map.placement
    return next(
        key
        for key in (f"{tag}-{i}".encode() for i in range(100_000))
        if placement.partition_of(key) == group
    )


def test_writes_are_replicated_and_non_leaders_refuse_with_the_leader(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leaders = cluster.leaders_per_node()
        assert len(leaders) == 3, f"leaders spread over the nodes: {leaders}"
        for group in range(PARTITIONS):
            leader = cluster.leader_of(group)
            assert leader is not None
            key = key_in(group, cluster, "k")
            (put,) = await leader.write(group, [PutOp(key, b"v1")])
            assert isinstance(put, WriteResult) and put.succeeded
            index = put.version
            # The same entry is applied on every replica, with the Raft index as version (the
            # leader's too: it answers once the entry is committed, before its own flush).
            await until(
                applied_on(list(cluster.nodes.values()), group, index),
                f"group {group} applied everywhere",
            )
            for node in cluster.nodes.values():
                assert node.store.get(group, key) == (b"v1", index)
            assert await leader.read(group, key) == (b"v1", index)
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            with pytest.raises(LeadershipLost) as refused:
                await follower.write(group, [PutOp(key, b"v2")])
            assert follower.members[refused.value.leader] == leader.member_id
            with pytest.raises(LeadershipLost):
                await follower.read(group, key)
            # A conditional write against the version just written, and a read in the entry.
            cas, get = await leader.write(group, [PutOp(key, b"v3", if_version=index), GetOp(key)])
            assert isinstance(cas, WriteResult) and cas.succeeded and cas.version > index
            assert get == ReadResult(b"v3", cas.version)

    run(tmp_path, scenario)


def test_losing_the_busiest_leader_keeps_every_write_and_partition(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        acknowledged: dict[int, tuple[bytes, bytes, int]] = {}
        for group in range(PARTITIONS):
            leader = cluster.leader_of(group)
            assert leader is not None
            key = key_in(group, cluster, "before")
            (put,) = await leader.write(group, [PutOp(key, b"acked")])
            assert isinstance(put, WriteResult)
            acknowledged[group] = (key, b"acked", put.version)
        victim, led = cluster.leaders_per_node().most_common(1)[0]
        await cluster.stop(victim)
        await until(cluster.all_led, f"every partition led again after {victim} stopped")
        for group, (key, value, version) in acknowledged.items():
            leader = cluster.leader_of(group)
            assert leader is not None and leader.member_id != victim
            assert await leader.read(group, key) == (value, version)
            (put,) = await leader.write(group, [PutOp(key, b"after")])
            assert isinstance(put, WriteResult) and put.version > version
            acknowledged[group] = (key, b"after", put.version)
        assert led >= 1
        # The stopped node restarts on its data and catches up with what it missed.
        restarted = await cluster.start(victim)
        for group, (key, value, version) in acknowledged.items():
            await until(
                applied_on([restarted], group, version),
                f"{victim} caught up on group {group}",
            )
            assert restarted.store.get(group, key) == (value, version)

    run(tmp_path, scenario)


def test_a_node_behind_compaction_catches_up_by_snapshot(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        group = 0
        leader = cluster.leader_of(group)
        assert leader is not None
        behind = next(n for n in cluster.nodes.values() if n is not leader)
        name = behind.member_id
        stopped_at = behind.store.applied(group)
        await cluster.stop(name)
        written: dict[bytes, tuple[bytes, int]] = {}
        for i in range(3 * COMPACT_AFTER):
            key = key_in(group, cluster, f"c{i % 7}")
            (put,) = await leader.write(group, [PutOp(key, b"%d" % i)])
            assert isinstance(put, WriteResult)
            written[key] = (b"%d" % i, put.version)
        # The leader's log no longer holds what the stopped node lacks.
        assert leader.store.group(group).first_index() > stopped_at + 1
        assert leader.runtime.stats.compactions > 0
        restarted = await cluster.start(name)
        last = max(version for _, version in written.values())
        await until(applied_on([restarted], group, last), f"{name} caught up on group {group}")
        for key, found in written.items():
            assert restarted.store.get(group, key) == found
        assert leader.transport.stats.snapshots_sent > 0

    run(tmp_path, scenario, config=COMPACTING)


def test_a_stopping_node_hands_its_leaderships_off_and_names_the_new_leaders(
    tmp_path: Path,
) -> None:
    """What a SIGTERM does before the node stops: every partition it leads moves to another
    replica while it still answers, writes acknowledged before stay, and what it is asked
    meanwhile is refused naming the replica taking over (the caller goes there at once)."""

    async def scenario(cluster: Cluster) -> None:
        name, _ = cluster.leaders_per_node().most_common(1)[0]
        victim = cluster.nodes[name]
        led = [g for g in range(PARTITIONS) if cluster.leader_of(g) is victim]
        acked = {}
        for group in led:
            key = key_in(group, cluster, "before")
            (put,) = await victim.write(group, [PutOp(key, b"acked")])
            assert isinstance(put, WriteResult)
            acked[group] = (key, put.version)
        victim.runtime.hand_off()
        # Queued after the hand-off began: refused, never run, naming the replica taking over.
        with pytest.raises(LeadershipLost) as refused:
            await victim.write(led[0], [PutOp(acked[led[0]][0], b"during")])
        assert refused.value.leader not in (0, victim.raft_id)
        assert await victim.hand_off()
        await until(cluster.all_led, "every partition led by one node all agree on")
        for group, (key, version) in acked.items():
            leader = cluster.leader_of(group)
            assert leader is not None and leader is not victim
            assert await leader.read(group, key) == (b"acked", version)
            with pytest.raises(LeadershipLost) as refused:
                await victim.write(group, [PutOp(key, b"after")])
            assert victim.member_of(refused.value.leader) == leader.member_id

    run(tmp_path, scenario)
