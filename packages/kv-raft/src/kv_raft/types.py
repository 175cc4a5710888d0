"""Values that cross the boundary of the Raft core.

Everything here is a frozen dataclass so that a batch handed to the runtime can never be changed
behind the core's back, and so that a later issue can map each type one-to-one onto protobuf.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from kv_raft.faults import Bug

NO_NODE = 0
"""Node ids are positive; 0 means "nobody" (no vote cast, no known leader)."""


class EntryType(enum.Enum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


class MessageType(enum.Enum):
    APPEND = 0
    APPEND_RESP = 1
    VOTE = 2
    VOTE_RESP = 3
    PRE_VOTE = 4
    PRE_VOTE_RESP = 5
    HEARTBEAT = 6
    HEARTBEAT_RESP = 7
    SNAPSHOT = 8
    TIMEOUT_NOW = 9


RESPONSE_TYPES = frozenset(
    {
        MessageType.APPEND_RESP,
        MessageType.VOTE_RESP,
        MessageType.PRE_VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
    }
)


@dataclass(frozen=True, slots=True)
class ConfState:
    """Membership: voters decide elections and commits; learners only receive the log."""

    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""

    @property
    def is_empty(self) -> bool:
        return self.meta.index == 0


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft RPC. Field meanings follow etcd's raftpb.Message.

    ``index``/``log_term`` are the entry preceding ``entries`` for APPEND, the candidate's last
    entry for (PRE_)VOTE, and the follower's match (or the rejected index) for APPEND_RESP. On a
    rejected APPEND_RESP, ``reject_hint`` and ``log_term`` let the leader skip a term at once.
    ``context`` carries a ReadIndex request id on heartbeats, or ``CAMPAIGN_TRANSFER`` on votes.
    """

    type: MessageType
    to: int
    frm: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


CAMPAIGN_TRANSFER = b"transfer"
"""Vote context marking an election started by leadership transfer; it may break a leader lease."""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it leaves the node."""

    term: int = 0
    vote: int = NO_NODE
    commit: int = 0


class Role(enum.Enum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile, informational: who leads and what this node is. Never persisted."""

    leader: int
    role: Role


class ConfChangeType(enum.Enum):
    ADD_NODE = 0
    ADD_LEARNER = 1
    REMOVE_NODE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One server at a time: a learner is added, catches up, then is promoted with ADD_NODE."""

    type: ConfChangeType
    node_id: int

    def encode(self) -> bytes:
        return f"{self.type.value}:{self.node_id}".encode()

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        kind, node = data.decode().split(":")
        return cls(ConfChangeType(int(kind)), int(node))


@dataclass(frozen=True, slots=True)
class ReadState:
    """A read may be served once the local applied index reaches ``index``."""

    index: int
    request_id: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the runtime; see the contract in ``kv_raft`` (package docstring).

    ``hard_state`` is None when unchanged. ``must_sync`` says whether the write must be fsynced
    (it is False only when nothing durable changed except the commit index).
    """

    soft_state: SoftState | None
    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    committed_entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    read_states: tuple[ReadState, ...]
    must_sync: bool

    @property
    def is_empty(self) -> bool:
        return (
            self.soft_state is None
            and self.hard_state is None
            and not self.entries
            and self.snapshot is None
            and not self.committed_entries
            and not self.messages
            and not self.read_states
        )


# Defaults chosen as in etcd: a heartbeat every tick, elections after 10-20 ticks.
DEFAULT_ELECTION_TICK = 10
DEFAULT_HEARTBEAT_TICK = 1
# At most this many bytes of entries in one APPEND (always at least one entry).
DEFAULT_MAX_SIZE_PER_MSG = 64 * 1024
# Flow control towards one follower: unacknowledged APPENDs and their bytes.
DEFAULT_MAX_INFLIGHT_MSGS = 256
DEFAULT_MAX_INFLIGHT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    """Per-node settings. ``rng`` is the only source of randomness (election jitter)."""

    id: int
    rng: random.Random
    election_tick: int = DEFAULT_ELECTION_TICK
    heartbeat_tick: int = DEFAULT_HEARTBEAT_TICK
    applied: int = 0
    max_size_per_msg: int = DEFAULT_MAX_SIZE_PER_MSG
    max_inflight_msgs: int = DEFAULT_MAX_INFLIGHT_MSGS
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    pre_vote: bool = True
    check_quorum: bool = True
    async_apply: bool = False
    """When True, ``advance`` only hands committed entries out; the runtime applies them later
    and reports with ``RawNode.applied_to`` (configuration changes take effect then)."""
    bugs: frozenset[Bug] = frozenset()
    """Planted bugs (tests only); see ``kv_raft.faults``."""

    def validate(self) -> None:
        if self.id <= NO_NODE:
            raise ValueError("node id must be positive")
        if self.heartbeat_tick <= 0:
            raise ValueError("heartbeat_tick must be positive")
        if self.election_tick <= self.heartbeat_tick:
            raise ValueError("election_tick must be greater than heartbeat_tick")
        if self.max_inflight_msgs <= 0 or self.max_inflight_bytes <= 0:
            raise ValueError("inflight limits must be positive")


def entry_size(entry: Entry) -> int:
    """Bytes an entry counts for in size limits (payload only, as etcd does)."""
    return len(entry.data)
