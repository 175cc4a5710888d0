"""Conditional writes are atomic per key: a compare-and-swap race on real nodes, checked.

Writers on several threads (each with its own client, so their calls really race on the wire)
read a key's version and try to replace it with a value of their own. Every call and return is
recorded and the history goes through the same linearizability checker the Raft simulator uses.

The checker's register compares values, the node compares versions. Every value written is
unique, so a version names exactly one value and "if the version is still v" is the same
condition as "if the value is still the one written at v".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from harness import Cluster
from kv_client import Client, KvError
from kv_raft.sim.linearizability import Op, check_history

WRITERS = 6
ROUNDS = 40
KEYS = ("race-a", "race-b")
CALL_TIMEOUT = 5.0


@dataclass
class Recorder:
    """Every operation's call and return, in one monotonic clock."""

    ops: list[Op]
    lock: threading.Lock

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)


def now() -> int:
    return time.monotonic_ns()


def writer(client_id: int, address: str, recorder: Recorder, failures: list[BaseException]) -> None:
    try:
        with Client(address, timeout=CALL_TIMEOUT, coalesce=None) as kv:
            for round_ in range(ROUNDS):
                key = KEYS[round_ % len(KEYS)]
                call = now()
                item = kv.get_versioned(key)
                seen = None if item is None else item.value.decode()
                recorder.add(Op(client_id, key, "get", None, None, seen, call, now()))
                new = f"w{client_id}-{round_}"
                call = now()
                try:
                    if item is None:
                        result = kv.put_if_absent(key, new)
                    else:
                        result = kv.put_if_version(key, new, item.version)
                except KvError:
                    # Outcome unknown: the write may or may not have applied.
                    recorder.add(Op(client_id, key, "cas", new, seen, None, call, None))
                    continue
                recorder.add(Op(client_id, key, "cas", new, seen, result.succeeded, call, now()))
    except BaseException as exc:  # surfaced to the test, which fails on any of them
        failures.append(exc)


def test_compare_and_swap_race_is_linearizable(three_nodes: Cluster) -> None:
    recorder = Recorder([], threading.Lock())
    failures: list[BaseException] = []
    addresses = three_nodes.addresses
    threads = [
        threading.Thread(target=writer, args=(i, addresses[i % len(addresses)], recorder, failures))
        for i in range(WRITERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert failures == []

    cas = [op for op in recorder.ops if op.kind == "cas"]
    wins = [op for op in cas if op.output is True]
    losses = [op for op in cas if op.output is False]
    assert len(cas) == WRITERS * ROUNDS
    # The race must be real: some swaps won and some lost to a concurrent writer.
    assert wins and losses, (len(wins), len(losses))

    result = check_history(recorder.ops)
    assert result.ok, result.message

    # And the final value of each key is the last successful swap's.
    with Client(addresses[0]) as kv:
        for key in KEYS:
            final = kv.get(key)
            assert final is not None
            assert any(op.value == final.decode() for op in wins if op.key == key)
