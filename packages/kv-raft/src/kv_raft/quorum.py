"""Majority arithmetic: which index a quorum has, and whether an election is decided.

Membership changes one voter at a time, so any majority of the old configuration overlaps any
majority of the new one and a single majority rule is enough (no joint configurations).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping


class VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


def quorum_size(voters: int) -> int:
    return voters // 2 + 1


def committed_index(voters: Iterable[int], match: Mapping[int, int]) -> int:
    """The largest index that a majority of ``voters`` have durably (0 with no voters)."""
    return quorum_index([match.get(v, 0) for v in voters])


def quorum_index(indexes: list[int]) -> int:
    """The largest index that a majority of these (one per voter) reach; 0 for none.

    Sorts ``indexes`` in place (callers pass a list built for the call)."""
    if not indexes:
        return 0
    indexes.sort()
    return indexes[len(indexes) - quorum_size(len(indexes))]


def vote_result(voters: Iterable[int], votes: Mapping[int, bool]) -> VoteResult:
    granted = rejected = total = 0
    for voter in voters:
        total += 1
        answer = votes.get(voter)
        if answer is True:
            granted += 1
        elif answer is False:
            rejected += 1
    need = quorum_size(total)
    if granted >= need:
        return VoteResult.WON
    if total - rejected < need:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Iterable[int], members: Iterable[int]) -> bool:
    """Do ``members`` include a majority of ``voters``?"""
    voter_set = set(voters)
    return len(voter_set.intersection(members)) >= quorum_size(len(voter_set))
