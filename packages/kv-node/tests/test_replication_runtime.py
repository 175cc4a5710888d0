"""The runtime's order of work, on three runtimes joined by an in-memory network.

Each node has a real replica store (unflushed: the order is what is tested, not the disk)
whose ``commit`` can be held in its worker thread. What it shows:

- a message that promises durable state (an append or vote acknowledgement, and any message
  of a Ready that writes) never leaves before the sender's write is in its store, checked on
  every message of a whole workload;
- a Ready that writes nothing (a ReadIndex round) sends its messages while another group's
  write is still being committed, so a read never waits for an unrelated fsync.

Waits are on events and conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kv_node.replication.multiraft import MultiRaft
from kv_node.replication.runtime import ReplicationRuntime
from kv_node.replication.storage import CommitResult, GroupWrite, ReplicaStore
from kv_node.store import GetOp, PutOp, ReadResult, WriteResult
from kv_raft import ConfState, Message, MessageType, Role

NODES = (1, 2, 3)
GROUPS = (0, 3)
"""Groups whose preferred leader (``MultiRaft.preferred_leader``) is node 1, so that no other
node campaigns when its links come up."""
MAP_SIZE = 1 << 24
DEADLINE = 20.0
"""Only a failing test waits this long."""
LOOP_TURNS = 50
"""Event-loop iterations that let every task ready to run do so (yields, not a wait)."""
NEVER = 3600.0
"""Tick length: no tick happens during a test, so nothing but the test starts an election."""


class Gate:
    """Holds a worker thread until released; ``entered`` says it is held."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def pass_through(self) -> None:
        self.entered.set()
        if not self.release.wait(DEADLINE):
            raise AssertionError("a held commit was never released")


class HeldStore(ReplicaStore):
    """A replica store whose ``commit`` can be held, in its worker thread: before it writes
    (``hold``), or with every write in the transaction, where the flush would begin
    (``hold_flush``)."""

    hold: Gate | None = None
    hold_flush: Gate | None = None

    def commit(
        self,
        writes: Sequence[GroupWrite],
        on_applied: Callable[[CommitResult], None] | None = None,
    ) -> CommitResult:
        if self.hold is not None:
            self.hold.pass_through()
        flush = self.hold_flush
        if flush is None:
            return super().commit(writes, on_applied)

        def applied_then_held(results: CommitResult) -> None:
            if on_applied is not None:
                on_applied(results)
            flush.pass_through()

        return super().commit(writes, applied_then_held)


class Driver(MultiRaft):
    """Records, for each proposal, whether node 2 was believed alive when it was made."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proposals: list[tuple[int, bool]] = []

    def propose(self, group: int, data: bytes) -> int:
        self.proposals.append((group, self.alive(2)))
        return super().propose(group, data)


class Net:
    """Delivers each sent batch on the next loop iteration, and checks every message against
    what its sender's store holds at the moment it is sent."""

    def __init__(self) -> None:
        self.runtimes: dict[int, ReplicationRuntime] = {}
        self.stores: dict[int, HeldStore] = {}
        self.sent: list[tuple[int, int, Message]] = []  # (sender, group, message)
        self.broken: list[str] = []

    def link(self, sender: int) -> Link:
        return Link(self, sender)

    def check(self, sender: int, group: int, message: Message) -> None:
        """The promise a message makes must already be kept by the sender's store."""
        store = self.stores[sender]
        hard = store.hard_state(group)
        log = store.group(group)
        prevote = message.type in (MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESP)
        if message.term > hard.term and not prevote:  # a pre-vote names the next term
            self.broken.append(f"{sender} sent term {message.term} above stored {hard.term}")
        acked = message.type is MessageType.APPEND_RESP and not message.reject
        if acked and log.last_index() < message.index:
            self.broken.append(f"{sender} acked {group}/{message.index}, stored {log.last_index()}")
        granted = message.type is MessageType.VOTE_RESP and not message.reject
        if granted and hard.vote != message.to:
            self.broken.append(f"{sender} granted a vote it has not stored ({hard.vote})")
        if message.type is MessageType.APPEND and message.entries:
            last = message.entries[-1].index
            if log.last_index() < last:
                self.broken.append(f"{sender} sent {group}/{last}, stored {log.last_index()}")


class Link:
    def __init__(self, net: Net, sender: int) -> None:
        self._net = net
        self._sender = sender

    def send(self, peer: int, items: Sequence[tuple[int, Message]]) -> None:
        for group, message in items:
            self._net.check(self._sender, group, message)
            self._net.sent.append((self._sender, group, message))
        runtime = self._net.runtimes[peer]
        asyncio.get_running_loop().call_soon(runtime.on_batch, self._sender, list(items))


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + DEADLINE
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        await asyncio.sleep(0.005)


async def started(tmp_path: Path) -> Net:
    """Three runtimes; node 1 campaigns in every group and leads them all."""
    net = Net()
    voters = ConfState(voters=frozenset(NODES))
    for node in NODES:
        store = HeldStore.open(tmp_path / f"n{node}", map_size=MAP_SIZE, sync=False)
        assert isinstance(store, HeldStore)
        store.bootstrap(dict.fromkeys(GROUPS, voters))
        driver = Driver(
            node,
            dict.fromkeys(GROUPS, NODES),
            {g: store.group(g) for g in GROUPS},
            applied={g: store.applied(g) for g in GROUPS},
        )
        if node == 1:
            for group in GROUPS:
                driver.campaign(group)
        net.stores[node] = store
        net.runtimes[node] = ReplicationRuntime(
            driver=driver, store=store, transport=net.link(node), tick_seconds=NEVER
        )
    for node, runtime in net.runtimes.items():
        runtime.start()
        for peer in NODES:
            if peer != node:
                runtime.on_link_up(peer)  # as the transport does; wakes the runtime
    leader = net.runtimes[1]
    await until(lambda: all(leader._driver.role(g) is Role.LEADER for g in GROUPS), "node 1 leads")
    return net


async def stopped(net: Net) -> None:
    for node, runtime in net.runtimes.items():
        await runtime.stop()
        net.stores[node].close()


def run(tmp_path: Path, scenario: Callable[[Net], object]) -> None:
    async def main() -> None:
        net = await started(tmp_path)
        try:
            await scenario(net)  # type: ignore[misc]
        finally:
            await stopped(net)

    asyncio.run(asyncio.wait_for(main(), DEADLINE * 2))


def test_no_message_leaves_before_the_state_it_promises_is_stored(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        leader = net.runtimes[1]
        for round_number in range(20):
            writes = [
                leader.write(g, [PutOp(f"k{round_number}-{g}".encode(), b"v")]) for g in GROUPS
            ]
            reads = [leader.read(g, f"k{round_number}-{g}".encode()) for g in GROUPS]
            outcomes = await asyncio.gather(*writes)
            assert all(isinstance(out[0], WriteResult) for out in outcomes)
            assert all(value is not None for value in await asyncio.gather(*reads))
        kinds = {message.type for _, _, message in net.sent}
        assert {MessageType.APPEND, MessageType.APPEND_RESP, MessageType.VOTE_RESP} <= kinds
        assert net.broken == []

    run(tmp_path, scenario)


def test_a_read_index_round_leaves_while_another_groups_write_is_held(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        leader = net.runtimes[1]
        store = net.stores[1]
        await leader.write(3, [PutOp(b"warm", b"v")])
        gate = store.hold = Gate()
        before = len(net.sent)
        # Both are queued before the runtime's next cycle, so that cycle holds group 3's
        # entry (a write) and group 0's ReadIndex round (nothing to write).
        write = asyncio.ensure_future(leader.write(3, [PutOp(b"x", b"1")]))
        read = asyncio.ensure_future(leader.read(0, b"warm"))
        try:
            assert await asyncio.to_thread(gate.entered.wait, DEADLINE), "the write was not held"
            held = [(g, m) for sender, g, m in net.sent[before:] if sender == 1]
            assert any(g == 0 and m.type is MessageType.HEARTBEAT and m.context for g, m in held), (
                "the read's heartbeat round waited for group 3's write"
            )
            # (An entry-less append of the previous cycle, carrying the warm write's commit,
            # may leave now: that cycle's flush ran as the warm write was answered.)
            assert not [m for g, m in held if g == 3 and m.entries], "group 3 sent too soon"
        finally:
            store.hold = None
            gate.release.set()
        done = (await write)[0]
        assert isinstance(done, WriteResult) and done.succeeded
        assert await read is None  # "warm" is in group 3, not 0
        assert net.broken == []

    run(tmp_path, scenario)


def test_gets_alone_are_read_by_read_index_and_among_writes_through_the_log(
    tmp_path: Path,
) -> None:
    async def scenario(net: Net) -> None:
        leader = net.runtimes[1]
        log = net.stores[1].group(0)
        (put,) = await leader.write(0, [PutOp(b"a", b"1")])
        assert isinstance(put, WriteResult)
        last = log.last_index()
        got = await leader.write(0, [GetOp(b"a"), GetOp(b"absent")])
        assert got == [ReadResult(b"1", put.version), ReadResult(None, 0)]
        assert log.last_index() == last, "gets alone took a log entry"
        # A get among writes sees the writes before it, so it goes through the log.
        mixed = await leader.write(0, [PutOp(b"a", b"2"), GetOp(b"a")])
        assert log.last_index() == last + 1
        assert isinstance(mixed[0], WriteResult)
        assert mixed[1] == ReadResult(b"2", mixed[0].version)

    run(tmp_path, scenario)


def test_a_writer_is_answered_while_the_flush_of_its_apply_runs(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        leader = net.runtimes[1]
        store = net.stores[1]
        await leader.write(0, [PutOp(b"warm", b"v")])
        write = asyncio.ensure_future(leader.write(0, [PutOp(b"a", b"1")]))
        # Hold the leader's flushes from now on: the one that appends the entry, and the one
        # that applies it once a follower acknowledged it.
        gate = store.hold_flush = Gate()
        try:
            while not write.done():
                assert await asyncio.to_thread(gate.entered.wait, DEADLINE), "no flush began"
                gate.entered.clear()
                await asyncio.wait([write], timeout=DEADLINE)  # the flush is still held
                if not write.done():
                    gate.release.set()  # the append's flush; the apply comes later
                    gate = store.hold_flush = Gate()
            done = write.result()[0]
            assert isinstance(done, WriteResult) and done.succeeded
            # Answered, yet the apply is not committed: a read must not see it yet.
            assert store.applied(0) < done.version
            assert store.get(0, b"a") is None
        finally:
            store.hold_flush = None
            gate.release.set()
        assert await leader.read(0, b"a") == (b"1", done.version)

    run(tmp_path, scenario)


def test_the_next_cycle_is_gathered_while_a_write_is_flushed(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        leader = net.runtimes[1]
        store = net.stores[1]
        await leader.write(3, [PutOp(b"b", b"1")])
        gate = store.hold = Gate()
        write = asyncio.ensure_future(leader.write(0, [PutOp(b"a", b"1")]))
        try:
            assert await asyncio.to_thread(gate.entered.wait, DEADLINE), "the write was not held"
            # Group 0's write is out; group 3 is not busy, so a read of it goes its whole
            # ReadIndex round meanwhile.
            assert await leader.read(3, b"b") is not None
            assert not write.done()
            before = len(net.sent)
            second = asyncio.ensure_future(leader.write(3, [PutOp(b"b", b"2")]))
            await until(lambda: leader._driver.busy(3), "group 3's entry collected")
            # ... but its write waits for the one that is out: nothing of it has left.
            assert not [m for s, g, m in net.sent[before:] if s == 1 and g == 3 and m.entries]
        finally:
            store.hold = None
            gate.release.set()
        assert isinstance((await write)[0], WriteResult)
        assert isinstance((await second)[0], WriteResult)
        assert await leader.read(3, b"b") == (b"2", (await second)[0].version)
        assert net.broken == []

    run(tmp_path, scenario)


def test_a_peer_death_is_applied_before_the_next_write_even_under_load(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        leader = net.runtimes[1]
        store = net.stores[1]
        gate = store.hold = Gate()
        first = asyncio.ensure_future(leader.write(0, [PutOp(b"a", b"1")]))
        try:
            assert await asyncio.to_thread(gate.entered.wait, DEADLINE), "the write was not held"
            leader.on_peer_state(2, False)
            # Another write is queued behind the liveness change, while the first is out;
            # the loop runs everything ready (no clock involved) before the release.
            second = asyncio.ensure_future(leader.write(3, [PutOp(b"b", b"1")]))
            for _ in range(LOOP_TURNS):
                await asyncio.sleep(0)
        finally:
            store.hold = None
            gate.release.set()
        assert isinstance((await first)[0], WriteResult)
        assert isinstance((await second)[0], WriteResult)
        driver = leader._driver
        assert isinstance(driver, Driver)
        assert driver.proposals[-1] == (3, False), "proposed before node 2's death applied"

    run(tmp_path, scenario)
