"""The SDK's README promises, checked against real in-process nodes through BOTH clients.

Every test here runs twice (the ``flavour`` fixture): with ``AsyncClient``, and with
``Client`` whose blocking calls run in worker threads behind ``await``. So one scenario
table holds the two clients to the same behaviour: retry safety, deadlines, coalescing
with ``metadata=``, and the error classes of the README's table.

Faults come from the nodes themselves (a committer that never answers, or fails) or
from a client-side interceptor that lets a request reach its node and apply, then
loses the answer, which is what a connection reset after the send looks like.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import pytest

from kv_client import (
    NO_RETRY,
    AsyncClient,
    Client,
    ClusterMap,
    CoalesceConfig,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    KvError,
    RetryPolicy,
    StaleMapError,
    TooLargeError,
    UnavailableError,
    Versioned,
    WriteResult,
    batch,
)
from kv_client._transport import CHANNEL_OPTIONS, DEFAULT_TIMEOUT
from kv_node.testing import InProcessCluster

T = TypeVar("T")
E = TypeVar("E", bound=KvError)
Scenario = Callable[[AsyncClient], Awaitable[T]]

HUNG_CALL_TIMEOUT = 1.5
"""Seconds a call waits on a node that never answers: ample for the request to arrive."""

LOST_ANSWER = "Socket closed"
"""What gRPC reports when a connection drops after the request was sent."""


@pytest.fixture(params=["async", "sync"])
def flavour(request: pytest.FixtureRequest) -> str:
    flavour: str = request.param
    return flavour


class Wire:
    """What a client sends, by method; and the first answer of each ``lose`` method lost.

    An answer is lost after the node applied the request, as when a connection
    drops after the send.
    """

    def __init__(self, *lose: str) -> None:
        self.sent: Counter[str] = Counter()
        self.pending = set(lose)
        self.lost: list[str] = []

    def loses(self, method: str | bytes) -> bool:
        """Count a call of ``method``; True when its answer is to be lost."""
        name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
        self.sent[name] += 1
        if name not in self.pending:
            return False
        self.pending.discard(name)
        self.lost.append(name)
        return True


class LostAnswer(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return LOST_ANSWER

    def trailing_metadata(self) -> Any:
        return ()


class SyncTap(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if self.wire.loses(details.method):
            outcome.result()  # the node has answered: the request ran
            raise LostAnswer()
        return outcome


class AsyncTap(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        if self.wire.loses(details.method):
            await call  # the node has answered: the request ran
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=LOST_ANSWER,
            )
        return call


class TappedClient(Client):
    wire = Wire()

    def _open_channel(self, address: str) -> grpc.Channel:
        return grpc.intercept_channel(super()._open_channel(address), SyncTap(self.wire))


class TappedAsyncClient(AsyncClient):
    wire = Wire()

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            address, options=CHANNEL_OPTIONS, interceptors=[AsyncTap(self.wire)]
        )


class ThreadedClient:
    """A ``Client`` seen through ``await``: each call runs in a worker thread."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(attribute, *args, **kwargs)

        return call


def run(
    flavour: str,
    address: str,
    scenario: Scenario[T],
    *,
    wire: Wire | None = None,
    **options: Any,
) -> T:
    """Run ``scenario`` with a client of ``flavour`` bootstrapped from ``address``."""

    async def main() -> T:
        if flavour == "async":
            kind = type("Tapped", (TappedAsyncClient,), {"wire": wire}) if wire else AsyncClient
            async with kind(address, **options) as kv:
                return await scenario(kv)
        sync_kind = type("Tapped", (TappedClient,), {"wire": wire}) if wire else Client
        with sync_kind(address, **options) as client:
            return await scenario(cast(AsyncClient, ThreadedClient(client)))

    return asyncio.run(asyncio.wait_for(main(), timeout=60))


@pytest.fixture
def writes(cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every single-key write the nodes apply (``Node.write``), in order."""
    applied: list[object] = []
    for server in cluster.servers.values():
        node = server.node
        original = node.write

        async def write(ops: Any, _original: Any = original) -> Any:
            applied.extend(ops)
            return await _original(ops)

        monkeypatch.setattr(node, "write", write)
    return applied


def stale_map(real: ClusterMap) -> ClusterMap:
    """An older map with a very different ring: most keys route to the wrong node."""
    return ClusterMap.build(
        epoch=0,
        members=real.members,
        partitions=real.partitions,
        replication_factor=1,
        vnodes=1,
    )


def raises(kind: type[E]) -> Callable[[Awaitable[Any]], Awaitable[E]]:
    """Await a call that must fail with ``kind``; the error."""

    async def check(call: Awaitable[Any]) -> E:
        with pytest.raises(kind) as info:
            await call
        return info.value

    return check


# -- the same surface, both clients


def test_the_surface(flavour: str, cluster: InProcessCluster) -> None:
    async def scenario(kv: AsyncClient) -> None:
        assert await kv.get("missing") is None
        assert await kv.get_versioned("missing") is None
        version = await kv.put(b"bin\x00key", b"\x00\xff")
        assert await kv.get_versioned(b"bin\x00key") == Versioned(b"\x00\xff", version)
        created = await kv.put_if_absent("x", "1")
        assert created.succeeded and created.version > version
        assert await kv.put_if_absent("x", "2") == WriteResult(False, created.version)
        swapped = await kv.put_if_version("x", "3", created.version)
        assert swapped.succeeded and await kv.get("x") == b"3"
        assert await kv.put_if_version("x", "4", created.version) == WriteResult(
            False, swapped.version
        )
        assert await kv.delete_if_version("x", created.version) == WriteResult(
            False, swapped.version
        )
        assert (await kv.delete_if_version("x", swapped.version)).succeeded
        assert await kv.delete("x") is False
        await kv.put("y", "1")
        assert await kv.delete("y") is True
        location = await kv.locate("y")
        assert location.node_id == cluster.owner(b"y")
        assert location.address == cluster.addresses[location.node_id]
        assert [m.node_id for m in (await kv.cluster_map()).members] == ["a", "b", "c"]
        assert (await kv.node_status(cluster.addresses["c"])).node_id == "c"

    run(flavour, cluster.addresses["b"], scenario)


def test_batch_returns_every_result_type_in_place(
    flavour: str, cluster_with_c_down: InProcessCluster
) -> None:
    cluster = cluster_with_c_down
    on_b = [cluster.key_owned_by("b", prefix=f"r{i}") for i in range(5)]
    on_c = cluster.key_owned_by("c")

    async def scenario(kv: AsyncClient) -> list[batch.Result]:
        first = await kv.put_many({on_b[0]: "a", on_b[1]: "b", on_b[2]: "c"})
        results = await kv.batch(
            [
                batch.Get(on_b[0]),
                batch.Get(on_b[3]),
                batch.Put(on_b[1], "x", if_version=0),
                batch.Put(on_b[2], "y", if_version=first[2]),
                batch.Delete(on_b[0]),
                batch.Put(on_c, "down"),
                batch.Put(on_b[4], "v" * 2000),
            ]
        )
        assert results[0] == Versioned(b"a", first[0])
        assert results[1] is None
        assert results[2] == WriteResult(False, first[1])
        assert isinstance(results[3], WriteResult) and results[3].succeeded
        assert isinstance(results[4], WriteResult) and results[4].succeeded
        assert isinstance(results[5], UnavailableError)
        assert isinstance(results[6], TooLargeError)
        assert results[6].limit == 1024, "the node's limit, from the refusal's metadata"
        assert await kv.get(on_b[0]) is None
        with pytest.raises(UnavailableError):
            await kv.get_many([on_b[1], on_c])
        return results

    run(flavour, cluster.addresses["a"], scenario, timeout=3.0)


def test_calls_that_find_the_map_stale_together_share_one_refresh(
    flavour: str, cluster: InProcessCluster
) -> None:
    wire = Wire()

    async def scenario(kv: AsyncClient) -> None:
        real = await kv.cluster_map()
        stale = stale_map(real)
        kv._maps.current = stale
        moved = [
            key
            for key in (f"sf-{i}" for i in range(400))
            if stale.owner_of(key.encode()) != real.owner_of(key.encode())
        ][:30]
        assert len(moved) == 30
        assert await asyncio.gather(*(kv.get(key) for key in moved)) == [None] * 30
        assert kv._maps.current.epoch == real.epoch

    run(flavour, cluster.addresses["a"], scenario, wire=wire, coalesce=None)
    assert wire.sent["Get"] > 30, "some gets were refused for the stale map, then resent"
    assert wire.sent["GetClusterMap"] == 2, "one to bootstrap, one shared refresh"


def test_a_stale_map_is_refreshed_and_the_write_resent(
    flavour: str, cluster: InProcessCluster, writes: list[object]
) -> None:
    keys = [f"moved-{i}" for i in range(40)]

    async def scenario(kv: AsyncClient) -> None:
        real = await kv.cluster_map()
        kv._maps.current = stale_map(real)
        for key in keys:
            await kv.put(key, "v")
        assert (await kv.cluster_map()).epoch == real.epoch
        assert await kv.get_many(keys) == [b"v"] * len(keys)

    run(flavour, cluster.addresses["a"], scenario, coalesce=None)
    assert len(writes) == len(keys), "each put applied once: a stale-map refusal never ran"
    assert all(s.node.requests_forwarded == 0 for s in cluster.servers.values())


# -- promise 3: retry safety


def test_a_put_whose_answer_was_lost_is_not_resent(
    flavour: str, cluster: InProcessCluster, writes: list[object]
) -> None:
    wire = Wire("Put")

    async def scenario(kv: AsyncClient) -> None:
        error = await raises(UnavailableError)(kv.put("ambiguous", "1"))
        assert LOST_ANSWER in error.message and error.reason is None
        assert await kv.get("ambiguous") == b"1", "it did apply: the outcome was unknown"

    run(flavour, cluster.addresses["a"], scenario, wire=wire)
    assert wire.lost == ["Put"]
    assert len(writes) == 1, "never sent twice"


def test_a_delete_whose_answer_was_lost_is_not_resent(
    flavour: str, cluster: InProcessCluster, writes: list[object]
) -> None:
    wire = Wire("Delete")

    async def scenario(kv: AsyncClient) -> None:
        await kv.put("doomed", "1")
        await raises(UnavailableError)(kv.delete("doomed"))
        assert await kv.get("doomed") is None

    run(flavour, cluster.addresses["a"], scenario, wire=wire)
    assert wire.lost == ["Delete"]
    assert len(writes) == 2, "one put, one delete: never sent twice"


def test_a_retried_conditional_write_reports_its_own_version(
    flavour: str, cluster: InProcessCluster, writes: list[object]
) -> None:
    wire = Wire("Put")

    async def scenario(kv: AsyncClient) -> None:
        result = await kv.put_if_absent("cas", "mine")
        current = await kv.get_versioned("cas")
        assert current is not None and current.value == b"mine"
        assert result == WriteResult(False, current.version), (
            "the first attempt applied; the retry sees the version it wrote itself"
        )

    run(flavour, cluster.addresses["a"], scenario, wire=wire)
    assert wire.lost == ["Put"]
    assert len(writes) == 2, "a conditional write is retried"


def test_no_retry_gives_up_after_one_attempt(flavour: str, cluster: InProcessCluster) -> None:
    async def scenario(kv: AsyncClient) -> None:
        real = await kv.cluster_map()
        stale = stale_map(real)
        kv._maps.current = stale
        key = next(
            f"k{i}"
            for i in range(1000)
            if stale.owner_of(f"k{i}".encode()) != real.owner_of(f"k{i}".encode())
        )
        error = await raises(StaleMapError)(kv.get(key))
        assert error.retriable and error.invalid_metadata and error.reason == "STALE_MAP"
        assert kv._maps.current is stale, "no retry, so no refresh either"

    run(flavour, cluster.addresses["a"], scenario, retry=NO_RETRY)


def test_default_retry_and_timeout(flavour: str, cluster: InProcessCluster) -> None:
    async def scenario(kv: AsyncClient) -> None:
        assert kv._retry == RetryPolicy() == RetryPolicy(4, 0.05, 1.0, 2.0)
        assert kv._timeout == DEFAULT_TIMEOUT == 5.0

    run(flavour, cluster.addresses["a"], scenario)


# -- promise 4: the timeout includes retries; DeadlineExceededError from a real call


def test_retries_stop_at_the_calls_timeout(
    flavour: str, cluster_with_c_down: InProcessCluster
) -> None:
    cluster = cluster_with_c_down
    on_c = cluster.key_owned_by("c")
    budget = 0.5
    endless = RetryPolicy(max_attempts=100_000, initial_backoff=0.01, multiplier=1.0)

    async def scenario(kv: AsyncClient) -> float:
        await kv.cluster_map()
        start = time.monotonic()
        await raises(UnavailableError)(kv.get(on_c))
        return time.monotonic() - start

    elapsed = run(flavour, cluster.addresses["a"], scenario, timeout=budget, retry=endless)
    # Unbounded, these retries would take over 1000 s; the margin is for a loaded machine.
    assert elapsed < budget + 5.0


def test_a_node_that_never_answers_gives_deadline_exceeded(
    flavour: str, cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = cluster.key_owned_by("b")
    hung: list[object] = []

    async def never(op: Any) -> Any:
        hung.append(op)
        await asyncio.Event().wait()

    monkeypatch.setattr(cluster.servers["b"].node, "write", never)

    async def scenario(kv: AsyncClient) -> None:
        await kv.cluster_map()  # so that the whole budget goes to the put
        error = await raises(DeadlineExceededError)(kv.put(key, "v", timeout=HUNG_CALL_TIMEOUT))
        assert not error.retriable and error.reason is None

    run(flavour, cluster.addresses["a"], scenario)
    assert len(hung) == 1, "an unknown outcome is not resent"


# -- promise 8: calls with metadata= are never coalesced


def test_calls_with_metadata_are_never_coalesced(flavour: str, cluster: InProcessCluster) -> None:
    eager = CoalesceConfig(max_in_flight=1)

    async def scenario(kv: AsyncClient) -> None:
        mine = [("x-request-id", "42")]
        await asyncio.gather(*(kv.put(f"md-{i}", "v", metadata=mine) for i in range(60)))
        assert await kv.get("md-0", metadata=mine) == b"v"
        assert kv._lanes == {}, "no call with its own metadata entered a lane"
        await asyncio.gather(*(kv.put(f"plain-{i}", "v") for i in range(60)))
        assert kv._lanes, "the same calls without metadata do"

    run(flavour, cluster.addresses["a"], scenario, coalesce=eager)


def test_concurrent_calls_are_coalesced_by_default(flavour: str, cluster: InProcessCluster) -> None:
    async def scenario(kv: AsyncClient) -> None:
        assert kv._coalesce == CoalesceConfig(
            max_in_flight=2, max_ops=1000, max_bytes=2 * 1024 * 1024
        )
        await asyncio.gather(*(kv.put(f"co-{i}", str(i)) for i in range(120)))
        values = await asyncio.gather(*(kv.get(f"co-{i}") for i in range(120)))
        assert values == [str(i).encode() for i in range(120)]
        assert kv._lanes, "single-key calls went through lanes"

    run(flavour, cluster.addresses["a"], scenario)


# -- promise 9: every error class of the README's table, from a real node where one can


def test_invalid_arguments_are_refused_before_the_network(
    flavour: str, cluster: InProcessCluster
) -> None:
    """No node can produce one through the SDK: it refuses the same inputs first."""

    async def scenario(kv: AsyncClient) -> None:
        for call in (kv.put("", "v"), kv.get("k" * 4097), kv.put(3, "v")):  # type: ignore[arg-type]
            error = await raises(InvalidArgumentError)(call)
            assert not error.retriable and error.reason is None
        assert kv._maps.current is None, "nothing was sent, not even a map request"

    run(flavour, cluster.addresses["a"], scenario)


def test_too_large_from_a_node_carries_its_limit(flavour: str, cluster: InProcessCluster) -> None:
    async def scenario(kv: AsyncClient) -> None:
        error = await raises(TooLargeError)(kv.put("big", "v" * 2000))
        assert not error.retriable
        assert (error.reason, error.limit) == ("VALUE_TOO_LARGE", 1024)

    run(flavour, cluster.addresses["a"], scenario)


def test_a_down_owner_is_unavailable_and_named(
    flavour: str, cluster_with_c_down: InProcessCluster
) -> None:
    cluster = cluster_with_c_down
    on_b, on_c = cluster.key_owned_by("b"), cluster.key_owned_by("c")

    async def scenario(kv: AsyncClient) -> None:
        error = await raises(UnavailableError)(kv.get(on_c))
        assert error.retriable and "node 'c'" in error.message
        await raises(UnavailableError)(kv.put(on_c, "v"))
        await kv.put(on_b, "v")
        assert await kv.get(on_b) == b"v"

    run(flavour, cluster.addresses["a"], scenario, timeout=3.0)


def test_an_unexpected_node_failure_is_internal(
    flavour: str, cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = cluster.key_owned_by("c")
    failures: list[object] = []

    async def broken(op: Any) -> Any:
        failures.append(op)
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(cluster.servers["c"].node, "write", broken)

    async def scenario(kv: AsyncClient) -> None:
        error = await raises(InternalError)(kv.put(key, "v"))
        assert not error.retriable

    run(flavour, cluster.addresses["a"], scenario)
    assert len(failures) == 1


def test_no_seed_answers(flavour: str) -> None:
    async def scenario(kv: AsyncClient) -> None:
        error = await raises(UnavailableError)(kv.get("k"))
        assert "no node answered" in error.message

    run(flavour, "127.0.0.1:1", scenario, timeout=1.0)
