"""Raft consensus core for kv, sans-IO: no clock, randomness, threads, sockets or files inside.

The runtime owns all I/O and drives one ``RawNode`` per Raft group:

* ``tick()`` at a fixed cadence (the only notion of time; elections take ``election_tick`` ticks
  plus a random jitter drawn from the injected ``Config.rng``);
* ``step(message)`` for each message received from a peer;
* ``propose(data)``, ``propose_conf_change(cc)``, ``read_index(request_id)`` and
  ``transfer_leadership(to)`` on behalf of clients and operators. A non-leader raises
  ``NotLeader`` carrying the leader it knows of, so the caller can redirect instead of waiting.

After any of these, while ``has_ready()`` is true the runtime takes ``rd = node.ready()`` and must,
in this order:

1. Persist ``rd.snapshot`` (if any), then append ``rd.entries`` (replacing any conflicting suffix),
   then write ``rd.hard_state`` (if not None) -- durably (fsync) when ``rd.must_sync``. Nothing in
   ``rd.messages`` may leave the node before this: a vote or an append acknowledgement promises
   that the state is on disk. If an fsync fails, stop the process (as etcd does): what reached
   the disk is unknown, and going on could break a promise already made.
2. Send ``rd.messages`` (in any order; the network may drop or reorder them anyway).
3. Install ``rd.snapshot`` into the state machine, then apply ``rd.committed_entries`` in order.
   Entries of type CONF_CHANGE carry a ``ConfChange`` that the core itself applies in step 4.
   Serve each ``rd.read_states`` entry once the applied index reaches its ``index``.
4. Call ``node.advance(rd)``. With ``Config.async_apply`` the runtime may apply the committed
   entries later instead (in order) and report each batch with ``node.applied_to(index)``.

What the runtime persisted is exactly what survives a crash; a restarted node is rebuilt from its
``Storage`` (and ``Config.applied`` if the state machine survived too).
"""

from kv_raft.node import NotLeader, ProposalDropped, RawNode
from kv_raft.storage import CompactedError, MemoryStorage, Storage, UnavailableError
from kv_raft.types import (
    NO_NODE,
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)

__all__ = [
    "NO_NODE",
    "CompactedError",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Config",
    "Entry",
    "EntryType",
    "HardState",
    "MemoryStorage",
    "Message",
    "MessageType",
    "NotLeader",
    "ProposalDropped",
    "RawNode",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SoftState",
    "Storage",
    "UnavailableError",
]
