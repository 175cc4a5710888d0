"""One node's replication, assembled: replica store, multi-group driver, transport, runtime.

Which groups a node hosts follows from the cluster map alone: partition ``p`` is a Raft group
over ``placement.replicas(p)``, and a member's raft id is its position in the sorted member
ids (``transport.raft_node_ids``). Every node computes the same groups and ids, and peers whose
maps differ refuse each other's streams (``kv_common.fingerprint``), so two nodes never
disagree about who is who.

Start order: the store is opened and every hosted group founded (a no-op after the first
start), the driver is built from what the store holds (``applied`` per group, so no entry is
applied twice after a restart), each group's preferred replica campaigns at once (leaders
spread over the nodes; with PreVote a restarted node cannot disrupt a live leader this way),
then the transport and the runtime start.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kv_common.cluster_map import ClusterMap
from kv_node.replication.multiraft import MultiRaft
from kv_node.replication.runtime import (
    DEFAULT_COMPACT_AFTER,
    DEFAULT_KEEP_AFTER_COMPACT,
    DEFAULT_TICK_SECONDS,
    ReplicationRuntime,
)
from kv_node.replication.storage import ReplicaStore
from kv_node.replication.transport import PeerTransport, TransportConfig, raft_node_ids
from kv_node.store import Op, Outcome
from kv_raft import NO_NODE, ConfState, Message
from kv_raft.types import DEFAULT_ELECTION_TICK, DEFAULT_HEARTBEAT_TICK

HAND_OFF_ELECTION_TIMEOUTS = 2
"""How long a stopping node waits for its leaderships to move: the core abandons a transfer
after one election timeout and the node starts it again, so two allow one retry."""


@dataclass(frozen=True)
class ReplicationConfig:
    tick_seconds: float = DEFAULT_TICK_SECONDS
    election_tick: int = DEFAULT_ELECTION_TICK
    heartbeat_tick: int = DEFAULT_HEARTBEAT_TICK
    transport: TransportConfig = field(default_factory=TransportConfig)
    seed: int | None = None
    """Election jitter seed; None draws one (tests pin it to replay)."""
    dial: dict[str, str] = field(default_factory=dict)
    """Peers reached at another address than the map's (``--peer-via``)."""
    compact_after: int = DEFAULT_COMPACT_AFTER
    keep_after_compact: int = DEFAULT_KEEP_AFTER_COMPACT

    @classmethod
    def for_tick(
        cls, tick_seconds: float, *, dial: dict[str, str] | None = None
    ) -> ReplicationConfig:
        """Transport liveness scaled to the tick: a heartbeat every 2.5 ticks, a peer dead
        after ``election_tick`` ticks of silence (so a dead leader is noticed no later than
        an election timeout would notice it)."""
        transport = TransportConfig(
            heartbeat_interval=2.5 * tick_seconds,
            dead_after=DEFAULT_ELECTION_TICK * tick_seconds,
        )
        return cls(tick_seconds=tick_seconds, transport=transport, dial=dict(dial or {}))


class Replication:
    """Everything a node needs to serve replicated partitions; see the module docstring."""

    def __init__(
        self,
        member_id: str,
        cluster_map: ClusterMap,
        store: ReplicaStore,
        config: ReplicationConfig,
    ) -> None:
        ids = raft_node_ids(cluster_map)
        if member_id not in ids:
            raise ValueError(f"{member_id!r} is not a member of the cluster map")
        self.member_id = member_id
        self.raft_id = ids[member_id]
        self.cluster_map = cluster_map
        self.members = {raft_id: member for member, raft_id in ids.items()}
        placement = cluster_map.placement
        groups = {
            p: tuple(ids[replica] for replica in placement.replicas(p))
            for p in placement.partitions_by_node()[member_id]
        }
        store.bootstrap({g: ConfState(voters=frozenset(voters)) for g, voters in groups.items()})
        self.store = store
        seed = config.seed if config.seed is not None else random.SystemRandom().getrandbits(32)
        self.driver = MultiRaft(
            self.raft_id,
            groups,
            {g: store.group(g) for g in groups},
            seed=seed,
            election_tick=config.election_tick,
            heartbeat_tick=config.heartbeat_tick,
            applied={g: store.applied(g) for g in groups},
        )
        self.transport = PeerTransport(
            self.raft_id,
            cluster_map,
            self._on_batch,
            self._on_peer_state,
            config=config.transport,
            rng=random.Random(seed),
            dial=config.dial,
            on_link_state=self._on_link_state,
        )
        self.runtime = ReplicationRuntime(
            driver=self.driver,
            store=store,
            transport=self.transport,
            tick_seconds=config.tick_seconds,
            on_leader_change=self._on_leader_change,
            compact_after=config.compact_after,
            keep_after_compact=config.keep_after_compact,
        )
        self._hand_off_seconds = (
            HAND_OFF_ELECTION_TIMEOUTS * config.election_tick * config.tick_seconds
        )
        self._leaderless = set(groups)
        self.all_led = asyncio.Event()
        """Set once every hosted group has known a leader (readiness at start)."""

    @classmethod
    def open(
        cls,
        member_id: str,
        cluster_map: ClusterMap,
        path: Path,
        *,
        map_size: int,
        config: ReplicationConfig | None = None,
    ) -> Replication:
        store = ReplicaStore.open(path, map_size=map_size)
        try:
            return cls(member_id, cluster_map, store, config or ReplicationConfig())
        except BaseException:
            store.close()
            raise

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve the peers' Raft streams on ``server`` (before it starts)."""
        self.transport.add_to_server(server)

    def start(self) -> None:
        """Start replicating (inside the running event loop)."""
        self.driver.campaign_preferred()
        self.transport.start()
        self.runtime.start()

    async def stop(self) -> None:
        """Stop the runtime (its callers are failed), then the transport; close the store."""
        await self.runtime.stop()
        await self.transport.close()
        self.store.close()

    # -- requests --------------------------------------------------------------------------------
    def group_of(self, key: bytes) -> int:
        return self.cluster_map.placement.partition_of(key)

    def hosts(self, group: int) -> bool:
        return group in self.driver.groups

    async def write(self, group: int, ops: list[Op]) -> list[Outcome]:
        return await self.runtime.write(group, ops)

    async def read(self, group: int, key: bytes) -> tuple[bytes, int] | None:
        return await self.runtime.read(group, key)

    def member_of(self, raft_id: int) -> str | None:
        """The member id of raft id ``raft_id``; None for ``NO_NODE`` (or an unknown id)."""
        return self.members.get(raft_id)

    async def hand_off(self) -> bool:
        """Hand every leadership held here to another replica, before this node stops; wait
        for it at most ``HAND_OFF_ELECTION_TIMEOUTS`` election timeouts. The node keeps serving
        meanwhile: what it no longer leads it refuses as NOT_LEADER naming the new leader (and
        during a transfer, the replica taking over), so callers move before it goes away,
        instead of after a failed connect and an election. True when everything moved."""
        if self.runtime.stopped.is_set():
            return False  # a failed cycle ended the runtime: nothing can move any more
        self.runtime.hand_off()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.runtime.handed_off.wait(), self._hand_off_seconds)
        return self.runtime.handed_off.is_set()

    def leader(self, group: int) -> str | None:
        """The member this node believes leads ``group``; None when it knows of none."""
        raft_id = self.runtime.leader(group)
        return None if raft_id == NO_NODE else self.members.get(raft_id)

    # -- transport callbacks -----------------------------------------------------------------------
    def _on_batch(self, peer: int, items: list[tuple[int, Message]]) -> None:
        self.runtime.on_batch(peer, items)

    def _on_peer_state(self, peer: int, alive: bool) -> None:
        self.runtime.on_peer_state(peer, alive)

    def _on_link_state(self, peer: int, connected: bool) -> None:
        if connected:
            self.runtime.on_link_up(peer)

    def _on_leader_change(self, group: int, leader: int) -> None:
        if leader != NO_NODE and self._leaderless:
            self._leaderless.discard(group)
            if not self._leaderless:
                self.all_led.set()
