"""Test-only switches that plant known bugs in the core.

They exist to prove that the simulator catches real mistakes: each test turns one on, runs the
simulator over a bounded number of seeds and asserts that an invariant breaks. All are off by
default and nothing outside tests may turn them on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# A candidate counts vote grants sent for an earlier term.
COUNT_STALE_VOTES = False
# A leader commits an entry of an earlier term by counting replicas (ignores Raft §5.4.2).
COMMIT_PREVIOUS_TERM = False
# The vote is not part of the persisted hard state, so a restart forgets it.
FORGET_VOTE_PERSIST = False
# A leader answers ReadIndex at once, without a heartbeat round confirming it still leads.
READ_INDEX_NO_CONFIRM = False
# A follower accepts APPEND without checking that its log matches at (index, log_term).
SKIP_LOG_MATCH_CHECK = False

NAMES = (
    "COUNT_STALE_VOTES",
    "COMMIT_PREVIOUS_TERM",
    "FORGET_VOTE_PERSIST",
    "READ_INDEX_NO_CONFIRM",
    "SKIP_LOG_MATCH_CHECK",
)


def set_fault(name: str, on: bool) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(NAMES)}")
    globals()[name] = on


@contextmanager
def planted(name: str | None) -> Iterator[None]:
    """Turn one fault on for the duration of a block (no-op for None)."""
    if name is None:
        yield
        return
    set_fault(name, True)
    try:
        yield
    finally:
        set_fault(name, False)
