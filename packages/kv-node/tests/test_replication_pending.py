"""The runtime's promises to callers, rule by rule: writes answered by their own entry's
outcomes (or told their entry was replaced), reads batched per group and answered only once
the applied index reaches their read index."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from kv_node.replication.pending import (
    EntryFailed,
    LeadershipLost,
    ProposalLost,
    Proposals,
    Reads,
)
from kv_node.store import GetOp, PutOp, ReadResult, WriteResult

TIMEOUT = 10.0


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))


def written(version: int) -> WriteResult:
    return WriteResult(succeeded=True, found=False, version=version)


def test_callers_of_one_group_share_one_entry_and_get_their_own_slices() -> None:
    async def scenario() -> None:
        proposals = Proposals()
        first = proposals.queue(7, [PutOp(b"a", b"1"), PutOp(b"b", b"2")])
        second = proposals.queue(7, [GetOp(b"a")])
        other = proposals.queue(8, [PutOp(b"c", b"3")])
        taken = list(proposals.take())
        assert [(group, len(ops)) for group, ops, _ in taken] == [(7, 3), (8, 1)]
        assert list(proposals.take()) == []
        (group, ops, waiters), (_, _, other_waiters) = taken
        assert ops == [PutOp(b"a", b"1"), PutOp(b"b", b"2"), GetOp(b"a")]
        proposals.proposed(group, 12, 3, waiters)
        proposals.proposed(8, 4, 3, other_waiters)
        assert proposals.in_log() == 2
        proposals.applied(7, 12, 3, [written(12), written(12), ReadResult(b"1", 12)])
        assert await first == [written(12), written(12)]
        assert await second == [ReadResult(b"1", 12)]
        assert not other.done()
        proposals.applied(8, 4, 3, [written(4)])
        assert await other == [written(4)]
        assert proposals.in_log() == 0

    run(scenario)


def test_an_entry_is_split_at_the_op_bound() -> None:
    async def scenario() -> None:
        proposals = Proposals(max_entry_ops=3)
        for name in (b"a", b"b", b"c"):
            proposals.queue(1, [PutOp(name, b"v"), PutOp(name + b"2", b"v")])
        sizes = [len(ops) for _, ops, _ in proposals.take()]
        assert sizes == [2, 2, 2]  # a caller's ops are never split across entries

    run(scenario)


def test_a_replaced_entry_fails_its_callers_as_lost() -> None:
    async def scenario() -> None:
        proposals = Proposals()
        future = proposals.queue(1, [PutOp(b"k", b"v")])
        ((group, _, waiters),) = proposals.take()
        proposals.proposed(group, 5, 2, waiters)
        proposals.applied(1, 5, 3, [written(5)])  # another leader's entry at index 5
        with pytest.raises(ProposalLost):
            await future

    run(scenario)


def test_a_caller_that_gave_up_before_the_proposal_is_left_out() -> None:
    async def scenario() -> None:
        proposals = Proposals()
        gone = proposals.queue(1, [PutOp(b"gone", b"v")])
        kept = proposals.queue(1, [PutOp(b"kept", b"v")])
        gone.cancel()
        ((_, ops, waiters),) = proposals.take()
        assert ops == [PutOp(b"kept", b"v")]
        proposals.proposed(1, 2, 1, waiters)
        proposals.applied(1, 2, 1, [written(2)])
        assert await kept == [written(2)]

    run(scenario)


def test_refused_and_shutdown_fail_every_waiting_caller() -> None:
    async def scenario() -> None:
        proposals = Proposals()
        refused = proposals.queue(1, [PutOp(b"k", b"v")])
        ((_, _, waiters),) = proposals.take()
        proposals.refused(waiters, LeadershipLost(1, 2))
        with pytest.raises(LeadershipLost) as raised:
            await refused
        assert raised.value.leader == 2
        queued = proposals.queue(1, [PutOp(b"k", b"v")])
        in_log = proposals.queue(2, [PutOp(b"k", b"v")])
        proposals.proposed(2, 9, 1, [(1, in_log)])
        proposals.fail_all(RuntimeError("stopping"))
        for future in (queued, in_log):
            with pytest.raises(RuntimeError):
                await future

    run(scenario)


def test_reads_are_batched_one_request_per_group() -> None:
    async def scenario() -> None:
        reads = Reads()
        early = [reads.queue(1) for _ in range(3)]
        other_group = reads.queue(2)
        requests = dict(reads.requests())
        assert set(requests) == {1, 2}
        late = reads.queue(1)
        assert list(reads.requests()) == []  # one request per group in flight
        reads.read_state(1, requests[1], index=10, applied=8)
        assert not any(future.done() for future in early)  # applied has not reached 10
        reads.applied(1, 9)
        assert not any(future.done() for future in early)
        reads.applied(1, 10)
        assert all(future.done() for future in early)
        assert not late.done() and not other_group.done()
        ((group, late_request),) = list(reads.requests())
        assert group == 1 and late_request != requests[1]
        reads.read_state(1, late_request, index=10, applied=10)
        assert late.done()
        assert reads.waiting() == 1  # group 2's read

    run(scenario)


def test_a_read_request_lost_with_the_leadership_fails_its_reads_and_frees_the_group() -> None:
    async def scenario() -> None:
        reads = Reads()
        read = reads.queue(1)
        ((_, request_id),) = list(reads.requests())
        reads.leader_changed(1, leader=3)
        with pytest.raises(LeadershipLost) as raised:
            await read
        assert raised.value.leader == 3
        reads.read_state(1, request_id, index=5, applied=5)  # a late answer changes nothing
        again = reads.queue(1)
        assert len(list(reads.requests())) == 1
        assert not again.done()

    run(scenario)


def test_an_unanswered_read_request_is_asked_again_after_the_reissue_ticks() -> None:
    async def scenario() -> None:
        reads = Reads(reissue_ticks=3)
        read = reads.queue(1)
        ((_, first),) = list(reads.requests())
        for _ in range(2):
            reads.tick()
        assert list(reads.requests()) == []
        reads.tick()
        ((_, second),) = list(reads.requests())
        assert second != first
        reads.read_state(1, first, index=4, applied=4)  # the abandoned one: ignored
        assert not read.done()
        reads.read_state(1, second, index=4, applied=4)
        assert read.done()

    run(scenario)


def test_a_read_index_already_applied_is_served_at_once() -> None:
    async def scenario() -> None:
        reads = Reads()
        read = reads.queue(4)
        ((_, request_id),) = list(reads.requests())
        reads.read_state(4, request_id, index=3, applied=7)
        assert read.done() and read.exception() is None

    run(scenario)


def test_an_entry_applied_as_a_failure_fails_its_callers() -> None:
    async def scenario() -> None:
        proposals = Proposals()
        future = proposals.queue(1, [PutOp(b"k", b"v")])
        ((group, _, waiters),) = proposals.take()
        proposals.proposed(group, 3, 1, waiters)
        proposals.failed(1, 3, 1, "the command did not decode")
        with pytest.raises(EntryFailed, match="did not decode"):
            await future
        assert proposals.in_log() == 0

    run(scenario)


def test_two_callers_writing_one_key_never_share_an_entry() -> None:
    """Versions are entry indexes: sharing an entry would give both writes one version.
    A read of the key may join the entry of the write before it."""

    async def scenario() -> None:
        proposals = Proposals()
        proposals.queue(1, [PutOp(b"k", b"first")])
        proposals.queue(1, [PutOp(b"other", b"v")])
        proposals.queue(1, [PutOp(b"k", b"second"), GetOp(b"k")])
        proposals.queue(1, [GetOp(b"k")])
        entries = [[op.key for op in ops] for _, ops, _ in proposals.take()]
        assert entries == [[b"k", b"other"], [b"k", b"k", b"k"]]

    run(scenario)


def test_reads_queued_while_a_request_is_out_are_asked_once_it_is_answered() -> None:
    async def scenario() -> None:
        reads = Reads()
        first = reads.queue(1)
        ((_, request_id),) = list(reads.requests())
        later = reads.queue(1)
        assert list(reads.requests()) == []  # one request in flight per group
        reads.read_state(1, request_id, index=2, applied=2)
        assert first.done() and not later.done()
        ((group, _),) = list(reads.requests())
        assert group == 1

    run(scenario)


def test_busy_groups_and_groups_left_unasked_by_a_caller_stay_due() -> None:
    async def scenario() -> None:
        reads = Reads()
        for group in (1, 2, 3):
            reads.queue(group)
        assert [g for g, _ in reads.requests(busy=lambda group: group == 2)] == [1, 3]
        reads.queue(4)
        requests = reads.requests()
        assert next(requests)[0] == 2
        requests.close()  # stopped early: group 4 was not asked yet
        assert [g for g, _ in reads.requests()] == [4]

    run(scenario)
