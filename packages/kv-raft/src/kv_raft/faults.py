"""Known bugs that a test can plant in the core or the simulated runtime, one at a time.

They exist to prove that the simulator catches real mistakes: a test passes one in
``Config.bugs`` (the core) or ``SimConfig.bug`` (the simulator hands it to every node), runs the
simulator over a bounded number of seeds and asserts that the expected check fails. Nothing is
global: a node built without bugs cannot be affected by a test running next to it.
"""

from __future__ import annotations

import enum


class Bug(enum.Enum):
    # -- elections and commitment ------------------------------------------------------------
    COUNT_STALE_VOTES = "a candidate counts vote grants sent for an earlier term"
    COMMIT_PREVIOUS_TERM = "a leader commits an earlier-term entry by counting replicas (§5.4.2)"
    FORGET_VOTE_PERSIST = "the vote is not part of the persisted hard state"
    SKIP_LOG_MATCH_CHECK = "a follower appends without checking its log matches at (index, term)"
    # -- durability ------------------------------------------------------------------------------
    VOTE_WITHOUT_SYNC = "must_sync is false when only the term or vote changed"
    # -- reads -----------------------------------------------------------------------------------
    READ_INDEX_NO_CONFIRM = "a leader answers ReadIndex at once, without a heartbeat round"
    READ_BEFORE_TERM_COMMIT = "a new leader serves ReadIndex before an entry of its term commits"
    # -- membership ------------------------------------------------------------------------------
    CONF_CHANGE_WHILE_PENDING = "a leader accepts a conf change before applying the previous one"
    # -- follower commit -------------------------------------------------------------------------
    HEARTBEAT_COMMIT_UNCAPPED = "a heartbeat carries the full commit index, not capped at match"
    # -- time ------------------------------------------------------------------------------------
    SNAPSHOT_NEVER_RETRIED = "a snapshot unanswered for an election timeout is never sent again"


def parse_bug(name: str) -> Bug:
    """The bug called ``name`` (as on the command line); ValueError lists the known ones."""
    try:
        return Bug[name]
    except KeyError:
        known = ", ".join(b.name for b in Bug)
        raise ValueError(f"unknown bug {name!r}; known: {known}") from None
