"""Acknowledged writes survive kill -9 and SIGTERM; versions keep growing across a crash.

The load is sequenced by its own events, never by sleeps: the signal is sent from inside the
load, at the moment a set number of writes has been acknowledged, while every other writer has
a write outstanding. Each acknowledged write is recorded; any error other than the node going
away, or any error before the signal, fails the test.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from harness import NodeProcess, running_cluster
from kv_client import NO_RETRY, AsyncClient, Client, KvError, UnavailableError
from kv_tools import launcher

WRITERS = 16
ACKS_BEFORE_SIGNAL = 400  # enough for the node to be busy committing when the signal lands
MAX_WRITES_PER_WRITER = 5_000  # a bound, in case the signal never fires
WRITE_TIMEOUT = 10.0


@dataclass
class Load:
    acknowledged: dict[str, bytes] = field(default_factory=dict)
    in_flight: int = 0
    signalled: bool = False
    in_flight_at_signal: int = 0
    acked_after_signal: int = 0
    unexpected: list[BaseException] = field(default_factory=list)


def _node_going_away(error: KvError) -> bool:
    """The errors a writer may see once the node is killed or stops taking new requests.

    A draining node refuses new calls with CANCELLED (the SDK reports it as InternalError);
    a dead one cannot be reached (UNAVAILABLE).
    """
    return isinstance(error, UnavailableError) or error.code == grpc.StatusCode.CANCELLED


def _load_and_signal(node: NodeProcess, signum: int) -> Load:
    """Write from WRITERS concurrent writers until the node is gone; send ``signum`` to it
    from inside the load once ACKS_BEFORE_SIGNAL writes are acknowledged."""
    load = Load()
    process = node.running()

    async def writer(worker: int, kv: AsyncClient) -> None:
        for i in range(MAX_WRITES_PER_WRITER):
            key, value = f"w{worker}-{i}", f"value-{worker}-{i}".encode()
            load.in_flight += 1
            try:
                await kv.put(key, value, timeout=WRITE_TIMEOUT)
            except KvError as exc:
                if not (load.signalled and _node_going_away(exc)):
                    load.unexpected.append(exc)
                return  # the node is going away: this write's outcome is unknown
            except Exception as exc:
                load.unexpected.append(exc)
                return
            finally:
                load.in_flight -= 1
            load.acknowledged[key] = value
            if load.signalled:
                load.acked_after_signal += 1
            elif len(load.acknowledged) >= ACKS_BEFORE_SIGNAL:
                load.signalled = True
                load.in_flight_at_signal = load.in_flight
                launcher.send(process, signum)

    async def main() -> None:
        # No retries (a write after the node is gone fails at once) and no coalescing
        # (each put is its own request, so "in flight" means sent).
        async with AsyncClient(node.address, retry=NO_RETRY, coalesce=None) as kv:
            await asyncio.gather(*(writer(w, kv) for w in range(WRITERS)))

    asyncio.run(main())
    return load


def _assert_all_present(node: NodeProcess, acknowledged: dict[str, bytes]) -> None:
    node.start()
    node.wait_ready()
    with Client(node.address) as kv:
        missing = [key for key, value in acknowledged.items() if kv.get(key) != value]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def _check_load(load: Load) -> None:
    assert not load.unexpected, f"unexpected errors: {load.unexpected[:3]!r}"
    assert load.signalled, "the signal was never sent"
    # Every other writer had a write outstanding when the signal was sent.
    assert load.in_flight_at_signal >= WRITERS - 1, load.in_flight_at_signal


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    with running_cluster(tmp_path, ["n1"]) as cluster:
        node = cluster.nodes["n1"]
        load = _load_and_signal(node, signal.SIGKILL)
        _check_load(load)
        assert node.running().wait(timeout=launcher.STOP_TIMEOUT) == -signal.SIGKILL
        _assert_all_present(node, load.acknowledged)


def test_sigterm_drains_and_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    with running_cluster(tmp_path, ["n1"]) as cluster:
        node = cluster.nodes["n1"]
        load = _load_and_signal(node, signal.SIGTERM)
        _check_load(load)
        # Draining: the writes in flight when SIGTERM was sent are still acknowledged.
        assert load.acked_after_signal > 0
        assert node.running().wait(timeout=launcher.STOP_TIMEOUT) == 0, node.output()
        assert "kv-node n1 stopped" in node.output()
        _assert_all_present(node, load.acknowledged)


def test_versions_keep_growing_across_kill_9_and_restart(tmp_path: Path) -> None:
    with running_cluster(tmp_path, ["n1"]) as cluster:
        node = cluster.nodes["n1"]
        with Client(node.address) as kv:
            versions = [kv.put("counter", str(i)) for i in range(5)]
            deleted_at = kv.put("gone", "soon")
            assert kv.delete("gone")
            highest = max(*versions, deleted_at)
        node.kill()
        node.start()
        node.wait_ready()
        with Client(node.address) as kv:
            found = kv.get_versioned("counter")
            assert found is not None and found.version == versions[-1]
            after_counter = kv.put("counter", "after")
            after_gone = kv.put("gone", "again")
            fresh = kv.put("fresh", "key")
        assert after_counter > highest
        assert after_gone > highest
        assert fresh > max(after_counter, after_gone)
