"""Measure what idle Raft groups cost one node, with and without sleeping groups.

Run: ``python packages/kv-node/tests/measure_idle_groups.py [--groups 4096] [--ticks 100]``
(not collected by pytest). Three ``MultiRaft`` drivers, RF 3 on 3 nodes, so every node hosts
every group, exchange messages in memory; the runtime persists into ``MemoryStorage``. The CPU
time of everything done for node 1 (its ticks, steps, collects, persists, advances) is measured
with ``time.process_time`` around each call, then scaled to 10 ticks per second. It leaves out
what a real node adds per message (encoding, gRPC, the LMDB write), so the un-slept figure is a
lower bound. The numbers are recorded in docs/decisions/0004-idle-groups.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

from kv_node.replication.multiraft import GroupMessage, MultiRaft
from kv_raft import ConfState, MemoryStorage, Role

TICKS_PER_SECOND = 10
NODES = (1, 2, 3)
MEASURED = 1
MAX_ROUNDS_PER_TICK = 50
WARMUP_TICKS = 3  # past the elections' own messages before measuring


class Bench:
    def __init__(self, groups: int, *, quiescence: bool, preferred: bool) -> None:
        voters = frozenset(NODES)
        self.groups = groups
        self.storages = {
            (n, g): MemoryStorage(ConfState(voters)) for n in NODES for g in range(groups)
        }
        self.drivers = {
            n: MultiRaft(
                n,
                dict.fromkeys(range(groups), voters),
                {g: self.storages[n, g] for g in range(groups)},
                seed=1,
                quiescence=quiescence,
            )
            for n in NODES
        }
        self.down: set[int] = set()
        self.cpu = 0.0  # process seconds spent on node MEASURED
        self.messages = 0  # messages node MEASURED sent
        self.inbox: list[tuple[int, GroupMessage]] = []
        if preferred:
            for n in NODES:
                self._timed(n, self.drivers[n].campaign_preferred)

    def _timed(self, node: int, work: Callable[[], object]) -> None:
        if node != MEASURED:
            work()
            return
        start = time.process_time()
        work()
        self.cpu += time.process_time() - start

    def _cycle(self, node: int) -> bool:
        driver = self.drivers[node]
        worked = [False]

        def run() -> None:
            cycle = driver.collect()
            if cycle.is_empty:
                return
            worked[0] = True
            for item in cycle.readies:
                storage, rd = self.storages[node, item.group], item.ready
                storage.append(rd.entries)
                if rd.hard_state is not None:
                    storage.set_hard_state(rd.hard_state)
            for dst, messages in cycle.outbox.items():
                if node == MEASURED:
                    self.messages += len(messages)
                if dst not in self.down:
                    self.inbox.extend((dst, gm) for gm in messages)
            driver.advance(cycle)

        self._timed(node, run)
        return worked[0]

    def _deliver(self) -> bool:
        inbox, self.inbox = self.inbox, []
        for node in NODES:
            if node in self.down:
                continue
            driver = self.drivers[node]
            mine = [gm for dst, gm in inbox if dst == node]

            def step(driver: MultiRaft = driver, mine: list[GroupMessage] = mine) -> None:
                for gm in mine:
                    driver.step(gm.group, gm.message)

            self._timed(node, step)
        return bool(inbox)

    def tick(self) -> None:
        for node in NODES:
            if node not in self.down:
                self._timed(node, self.drivers[node].tick)
        for _ in range(MAX_ROUNDS_PER_TICK):
            worked = False
            for node in NODES:
                if node not in self.down:
                    worked |= self._cycle(node)
            if not self._deliver() and not worked:
                return
        raise AssertionError("did not settle within one tick")

    def run_until(self, done: Callable[[], bool], max_ticks: int) -> int:
        for ticks in range(max_ticks + 1):
            if done():
                return ticks
            self.tick()
        raise AssertionError(f"not done after {max_ticks} ticks")

    def all_led(self) -> bool:
        live = [n for n in NODES if n not in self.down]
        for g in range(self.groups):
            leaders = [n for n in live if self.drivers[n].role(g) is Role.LEADER]
            if len(leaders) != 1 or any(self.drivers[n].leader(g) != leaders[0] for n in live):
                return False
        return True

    def all_asleep(self) -> bool:
        return all(self.drivers[n].awake_count == 0 for n in NODES if n not in self.down)

    def take_cpu(self) -> float:
        cpu, self.cpu = self.cpu, 0.0
        return cpu


def per_second(cpu: float, ticks: int) -> float:
    """Cores used at TICKS_PER_SECOND, from ``cpu`` seconds over ``ticks`` ticks."""
    return cpu / ticks * TICKS_PER_SECOND


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=4096)
    parser.add_argument("--ticks", type=int, default=100)
    args = parser.parse_args()
    groups, ticks = args.groups, args.ticks
    rows: list[tuple[str, str]] = []

    for preferred in (False, True):
        bench = Bench(groups, quiescence=True, preferred=preferred)
        wall = time.perf_counter()
        elected = bench.run_until(bench.all_led, max_ticks=100)
        wall = time.perf_counter() - wall
        how = "preferred leaders campaign at once" if preferred else "election timeouts"
        rows.append(
            (
                f"elect {groups} groups ({how})",
                f"{elected} ticks, node 1 CPU {bench.take_cpu():.2f} s, "
                f"whole in-process cluster {wall:.2f} s",
            )
        )

    awake = Bench(groups, quiescence=False, preferred=True)
    awake.run_until(awake.all_led, max_ticks=100)
    for _ in range(WARMUP_TICKS):
        awake.tick()
    awake.take_cpu()
    awake.messages = 0
    for _ in range(ticks):
        awake.tick()
    rows.append(
        (
            "(a) idle, every group ticked",
            f"{per_second(awake.take_cpu(), ticks):.1%} of a core at {TICKS_PER_SECOND} ticks/s, "
            f"{awake.messages * TICKS_PER_SECOND // ticks} messages/s sent",
        )
    )
    del awake

    bench = Bench(groups, quiescence=True, preferred=True)
    bench.run_until(bench.all_led, max_ticks=100)
    settle = bench.run_until(bench.all_asleep, max_ticks=100)
    bench.take_cpu()
    bench.messages = 0
    for _ in range(ticks):
        bench.tick()
    rows.append(
        (
            "(b) idle, groups asleep",
            f"{per_second(bench.take_cpu(), ticks):.3%} of a core at {TICKS_PER_SECOND} ticks/s, "
            f"{bench.messages} messages sent (all asleep {settle} ticks after the election)",
        )
    )

    bench.down.add(3)
    for n in (1, 2):
        bench._timed(n, partial(bench.drivers[n].peer_alive, 3, False))
    failover = bench.run_until(bench.all_led, max_ticks=100)
    back_asleep = bench.run_until(bench.all_asleep, max_ticks=100)
    rows.append(
        (
            "(c) node 3 dies: its groups re-elected",
            f"{failover} ticks to every group led, {back_asleep} more to all asleep; "
            f"node 1 CPU {bench.take_cpu():.2f} s in all",
        )
    )
    bench.down.discard(3)
    for n in (1, 2):
        bench._timed(n, partial(bench.drivers[n].peer_alive, 3, True))
        bench.drivers[3].peer_alive(n, True)
    asleep = bench.run_until(lambda: bench.all_led() and bench.all_asleep(), max_ticks=200)
    rows.append(
        (
            "(d) node 3 resumes: deposed, caught up",
            f"{asleep} ticks to all led and asleep; node 1 CPU {bench.take_cpu():.2f} s in all",
        )
    )

    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
