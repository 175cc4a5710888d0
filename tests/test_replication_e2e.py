"""Replicated partitions (``--replication-factor 3``) on real node processes.

Each scenario runs concurrent SDK writers on a 3-node cluster, injects one fault from inside
the load (so writes are provably in flight), records every write's outcome (acknowledged,
failed without running, or unknown), and then checks the history: every acknowledged write
is readable with its value, through every node, and writes are acknowledged again after the
fault. The fuller fault suite (proxies on peer links, rolling restarts, linearizability of
colliding operations) is ``nox -s chaos``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from harness import Cluster, NodeProcess, poll_until, running_cluster
from kv.v1 import kv_pb2, kv_pb2_grpc
from kv_client import AsyncClient, Client, KvError
from kv_common.placement import partition_of
from kv_common.wire import Reason, decode_status_details
from kv_tools import launcher

TICK_MS = 50
"""Elections take 10-20 ticks: 0.5-1 s here."""
PARTITIONS = 16
REPLICATED = [
    "--replication-factor",
    "3",
    "--partitions",
    str(PARTITIONS),
    "--raft-tick-ms",
    str(TICK_MS),
]
WRITERS = 8
ACKS_BEFORE_FAULT = 150
ACKS_AFTER_FAULT = 150
MAX_WRITES_PER_WRITER = 2_000
"""A bound on the load, in case acknowledgements stop coming."""
WRITE_TIMEOUT = 2.0
CATCH_UP_TIMEOUT = 60.0


@dataclass
class History:
    acknowledged: dict[str, bytes] = field(default_factory=dict)
    failed: int = 0
    unknown: int = 0
    acked_after_fault: int = 0
    fault_at: int | None = None
    in_flight_at_fault: int = 0
    in_flight: int = 0
    unexpected: list[BaseException] = field(default_factory=list)


def load_with_fault(addresses: list[str], fault: Callable[[], None]) -> History:
    """Write until ACKS_AFTER_FAULT writes are acknowledged after ``fault`` ran (from inside
    the load, once ACKS_BEFORE_FAULT were acknowledged)."""
    history = History()

    async def writer(worker: int, kv: AsyncClient) -> None:
        for i in range(MAX_WRITES_PER_WRITER):
            if history.acked_after_fault >= ACKS_AFTER_FAULT:
                return
            key, value = f"w{worker}-{i}", f"value-{worker}-{i}".encode()
            history.in_flight += 1
            try:
                await kv.put(key, value, timeout=WRITE_TIMEOUT)
            except KvError as exc:
                # The SDK retries what provably did not run; what is left may or may not
                # have happened (a put in flight on a node that died).
                if exc.never_ran:
                    history.failed += 1
                else:
                    history.unknown += 1
                continue
            except Exception as exc:
                history.unexpected.append(exc)
                return
            finally:
                history.in_flight -= 1
            history.acknowledged[key] = value
            if history.fault_at is not None:
                history.acked_after_fault += 1
            elif len(history.acknowledged) >= ACKS_BEFORE_FAULT:
                history.fault_at = len(history.acknowledged)
                history.in_flight_at_fault = history.in_flight
                fault()

    async def main() -> None:
        async with AsyncClient(addresses, coalesce=None) as kv:
            await asyncio.gather(*(writer(w, kv) for w in range(WRITERS)))

    asyncio.run(main())
    return history


def assert_history(history: History) -> None:
    assert not history.unexpected, f"unexpected errors: {history.unexpected[:3]!r}"
    assert history.fault_at is not None, "the fault was never injected"
    assert history.in_flight_at_fault >= WRITERS - 1, "writes were in flight at the fault"
    assert history.acked_after_fault >= ACKS_AFTER_FAULT, (
        f"only {history.acked_after_fault} writes acknowledged after the fault "
        f"({history.failed} failed, {history.unknown} unknown)"
    )


DIRECT_ATTEMPTS = 50


def read_directly(node: NodeProcess, key: str) -> bytes | None:
    """A Get sent to one node as grpcurl would (no SDK routing): it forwards to the leader.

    A node that does not know the leader yet (just resumed, or an election) refuses with
    NOT_LEADER, which never ran: asked again, as a client would, a bounded number of times.
    """
    with grpc.insecure_channel(node.address) as channel:
        stub = kv_pb2_grpc.KVServiceStub(channel)
        for attempt in range(DIRECT_ATTEMPTS):
            try:
                reply = stub.Get(kv_pb2.GetRequest(key=key.encode()), timeout=WRITE_TIMEOUT)
            except grpc.RpcError as exc:
                trailers = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
                info = decode_status_details(tuple(trailers or ()))
                if info is None or info.reason != Reason.NOT_LEADER:
                    raise
                if attempt + 1 == DIRECT_ATTEMPTS:
                    raise
                time.sleep(TICK_MS / 1000)
                continue
            return reply.value if reply.found else None
    raise AssertionError("unreachable")


def assert_all_readable(cluster: Cluster, acknowledged: dict[str, bytes]) -> None:
    with Client(cluster.addresses) as kv:
        missing = [key for key, value in acknowledged.items() if kv.get(key) != value]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    for node in cluster.nodes.values():
        sample = list(acknowledged.items())[:: max(1, len(acknowledged) // 20)]
        wrong = [key for key, value in sample if read_directly(node, key) != value]
        assert not wrong, f"through {node.node_id}: {wrong[:5]}"


def keys_on(node: NodeProcess) -> int:
    with Client(node.address) as kv:
        return kv.node_status(node.address).keys_stored


def test_kill_9_of_a_replica_under_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    with running_cluster(tmp_path, ["n1", "n2", "n3"], extra=REPLICATED) as cluster:
        victim = cluster.nodes["n1"]
        history = load_with_fault(cluster.addresses, victim.kill)
        assert_history(history)
        assert victim.running().wait(timeout=launcher.STOP_TIMEOUT) < 0
        survivors = [n for n in cluster.nodes.values() if n is not victim]
        with Client([n.address for n in survivors]) as kv:
            missing = [k for k, v in history.acknowledged.items() if kv.get(k) != v]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        # The node restarts on its data, catches up, and serves everything again.
        victim.start()
        victim.wait_ready()
        expected = keys_on(survivors[0])
        poll_until(
            lambda: keys_on(victim) == expected,
            timeout=CATCH_UP_TIMEOUT,
            what=f"{victim.node_id} to catch up to {expected} keys",
        )
        assert_all_readable(cluster, history.acknowledged)


def test_a_paused_replica_misses_nothing_and_serves_no_stale_read(tmp_path: Path) -> None:
    with running_cluster(tmp_path, ["n1", "n2", "n3"], extra=REPLICATED) as cluster:
        # Pause the leader of the probe's partition: each partition's first leader is its
        # preferred replica, the founders sorted, rotated by the partition number.
        founders = sorted(cluster.nodes)
        paused = cluster.nodes[founders[partition_of(b"probe", PARTITIONS) % len(founders)]]
        with Client(cluster.addresses) as kv:
            kv.put("probe", "before")
        history = load_with_fault(cluster.addresses, paused.pause)
        assert_history(history)
        with Client(cluster.addresses) as kv:
            kv.put("probe", "during")
        # Resumed after many election timeouts, it may still believe it leads some
        # partitions: a read through it must see the write made while it slept.
        paused.resume()
        assert read_directly(paused, "probe") == b"during"
        assert_all_readable(cluster, history.acknowledged)


def test_a_node_says_serving_only_once_its_partitions_have_leaders(tmp_path: Path) -> None:
    """Alone, a node of a 3-node cluster has no quorum, so no leaders: it answers status
    calls but its health check says NOT_SERVING (for up to the node's leader wait); with a
    second node up every partition elects a leader and both say SERVING."""
    cluster = Cluster(tmp_path, ["n1", "n2", "n3"], extra=REPLICATED)
    first, second = cluster.nodes["n1"], cluster.nodes["n2"]
    try:
        first.start()
        with Client([first.address], timeout=1.0) as client:

            def answers() -> bool:
                try:
                    client.node_status(first.address)
                except KvError:
                    return False
                return True

            poll_until(answers, timeout=CATCH_UP_TIMEOUT, what="n1 to answer status calls")
        assert not launcher.reports_serving(first.address)
        second.start()
        first.wait_ready()
        second.wait_ready()
        with Client([first.address, second.address], timeout=WRITE_TIMEOUT) as kv:
            kv.put("after-ready", b"v")
            assert kv.get("after-ready") == b"v"
    finally:
        cluster.stop()


RESTART_ACKS = 50
"""Writes acknowledged after each restart before the next node is stopped."""


def acked_at_least(history: History, count: int) -> Callable[[], bool]:
    return lambda: len(history.acknowledged) >= count


def test_a_rolling_restart_under_load_fails_no_write(tmp_path: Path) -> None:
    """SIGTERM and restart every node in turn under SDK writes: none fails and none is left
    unknown. A stopping node hands its leaderships off before it refuses anything, refuses what
    it no longer leads as NOT_LEADER naming the new leader, and a call that reaches it while it
    stops (SHUTTING_DOWN) or after (a refused connect) never ran and goes to another replica.
    The load runs on its own thread: restarts must happen on this one (the launcher ties each
    node's parent-death signal to the thread that started it)."""
    with running_cluster(tmp_path, ["n1", "n2", "n3"], extra=REPLICATED) as cluster:
        history = History()
        stop = threading.Event()

        async def writer(worker: int, kv: AsyncClient) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                key, value = f"r{worker}-{i}", f"value-{worker}-{i}".encode()
                try:
                    await kv.put(key, value, timeout=WRITE_TIMEOUT)
                except KvError as exc:
                    if exc.never_ran:
                        history.failed += 1
                    else:
                        history.unknown += 1
                        history.unexpected.append(exc)
                    continue
                history.acknowledged[key] = value

        async def load() -> None:
            async with AsyncClient(cluster.addresses) as kv:
                await asyncio.gather(*(writer(w, kv) for w in range(WRITERS)))

        thread = threading.Thread(target=lambda: asyncio.run(load()), name="rolling-load")
        thread.start()
        try:
            poll_until(
                acked_at_least(history, ACKS_BEFORE_FAULT),
                timeout=CATCH_UP_TIMEOUT,
                what="writes acknowledged before the restarts",
            )
            for node in cluster.nodes.values():
                node.terminate()
                node.start()
                node.wait_ready()
                poll_until(
                    acked_at_least(history, len(history.acknowledged) + RESTART_ACKS),
                    timeout=CATCH_UP_TIMEOUT,
                    what=f"writes acknowledged after {node.node_id} restarted",
                )
        finally:
            stop.set()
            thread.join(CATCH_UP_TIMEOUT)
        assert not thread.is_alive(), "the load did not stop"
        assert (history.failed, history.unknown) == (0, 0), (
            f"{history.failed} failed, {history.unknown} unknown: {history.unexpected[:3]!r}"
        )
        assert_all_readable(cluster, history.acknowledged)


def test_a_clients_batches_follow_the_leaders_after_a_kill(tmp_path: Path) -> None:
    """One long-lived client: its batches go to each partition's leader (from the map it
    fetched); after kill -9 of the node leading most of them, the same client's batches reach
    every key again (the dead node is avoided, what never ran is resent), without a new client
    or a single call to teach it the new leaders."""
    with running_cluster(tmp_path, ["n1", "n2", "n3"], extra=REPLICATED) as cluster:
        values = {f"batch-{i}": f"value-{i}".encode() for i in range(200)}
        with Client(cluster.addresses, timeout=WRITE_TIMEOUT) as kv:
            kv.put_many(list(values.items()))
            led = kv.cluster_map().leaders
            busiest = max(set(led), key=led.count)
            assert busiest in cluster.nodes, led
            cluster.nodes[busiest].kill()
            for _ in range(3):
                assert kv.get_many(list(values)) == list(values.values())
