"""What one node can say about its Raft groups, read from the driver when someone asks.

Operators ask rarely (a scrape every few seconds, a ``kv cluster status``), and the request
path must not pay for their questions. So nothing here is counted as it happens: one pass over
the hosted groups' cores (a few thousand attribute reads) answers every question at once, on
the event loop that owns the driver, between two runtime cycles.

The numbers are this node's view. ``without_leader`` counts groups whose leader this node does
not know, which is also what it would refuse with ``NOT_LEADER`` and no hint. "Behind" is what
the code knows cheaply: a leader's progress tracks each follower's match index, so a leader
counts the followers whose log lacks entries it has committed (a dead or slow replica, or one
being sent a snapshot); a follower cannot tell how far behind its leader it is. ``apply_lag``
is committed minus applied, summed over groups: every group's committed entries are applied
in the same transaction, so the node-wide backlog is what the next cycle has to do, and it is
non-zero only while a cycle is in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kv_node.replication.multiraft import MultiRaft
from kv_raft import NO_NODE, Role


@dataclass(frozen=True, slots=True)
class GroupsOverview:
    hosted: int
    led: int
    without_leader: int
    replicas_behind: int
    apply_lag: int
    """Committed but not yet applied entries, summed over hosted groups."""


def overview(driver: MultiRaft) -> GroupsOverview:
    """One pass over every hosted group of ``driver``."""
    me = driver.id
    led = without_leader = behind = lag = 0
    for group in driver.groups:
        node = driver.raw_node(group)
        leader = node.leader
        committed = node.committed
        lag += committed - node.applied
        if leader == NO_NODE:
            without_leader += 1
        elif leader == me and node.role is Role.LEADER:
            led += 1
            for peer, progress in node.prs.items():
                if peer != me and progress.match < committed:
                    behind += 1
    return GroupsOverview(
        hosted=len(driver.groups),
        led=led,
        without_leader=without_leader,
        replicas_behind=behind,
        apply_lag=lag,
    )


def leader_ids(driver: MultiRaft, members: Mapping[int, str], partitions: int) -> list[str]:
    """Per partition, the member this node knows as its leader, or "" (also for the
    partitions it does not host: it has no view of those)."""
    leaders = [""] * partitions
    for group in driver.groups:
        leader = driver.leader(group)
        if leader != NO_NODE:
            leaders[group] = members.get(leader, "")
    return leaders
