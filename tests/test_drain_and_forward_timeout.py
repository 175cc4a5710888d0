"""A node's promises about requests it holds: SIGTERM lets in-flight requests finish within
``--drain-seconds``, and ``--forward-timeout`` bounds a forward when the caller set no deadline.

The held request is a Put sent to n1 for a key that n2 owns, with n2 paused (SIGSTOP): n1
forwards it and waits. That it is in flight is observed, not assumed: the forwarded bytes sit
unread in n2's socket (``/proc/net/tcp*``), since n2 cannot read while paused.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from harness import Cluster, NodeProcess, poll_until, running_cluster
from kv.v1 import kv_pb2, kv_pb2_grpc
from kv_client import Client
from kv_tools import launcher

FORWARDED_TIMEOUT = 30.0  # how long the test waits to see the forward reach the paused owner
ANSWER_TIMEOUT = 30.0
LONG = "60"  # seconds: a drain or forward timeout the test never waits out
SHORT_DRAIN = 1.0
SHORT_FORWARD = 1.0
TCP_ESTABLISHED = "01"


def unread_bytes(port: int) -> int:
    """Bytes received but not yet read on established sockets bound to ``port`` (the server
    may listen dual-stack, so IPv4 connections can show up as IPv4-mapped IPv6)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == TCP_ESTABLISHED and int(local.rsplit(":", 1)[1], 16) == port:
                total += int(queues.split(":")[1], 16)
    return total


def _key_owned_by(cluster: Cluster, node_id: str) -> str:
    with Client(cluster.addresses) as client:
        for i in range(10_000):
            if client.locate(f"k{i}").node_id == node_id:
                return f"k{i}"
    raise AssertionError(f"no key owned by {node_id}")


@contextmanager
def held_put(
    cluster: Cluster, *, timeout: float | None
) -> Iterator[tuple[grpc.Future[kv_pb2.PutResponse], NodeProcess, NodeProcess]]:
    """A Put sent to n1 and forwarded to a paused n2; yields (its future, n1, n2).

    n2 is resumed and the call cancelled however the block ends.
    """
    n1, n2 = cluster.nodes["n1"], cluster.nodes["n2"]
    key = _key_owned_by(cluster, "n2")
    owner_port = int(n2.address.rsplit(":", 1)[1])
    with grpc.insecure_channel(n1.address) as channel:
        stub = kv_pb2_grpc.KVServiceStub(channel)
        # Connect n1 to n2 first, so that the held Put is the only thing n2 leaves unread.
        stub.Put(kv_pb2.PutRequest(key=key.encode(), value=b"warm"), timeout=ANSWER_TIMEOUT)
        n2.pause()
        future = None
        try:
            assert unread_bytes(owner_port) == 0
            request = kv_pb2.PutRequest(key=key.encode(), value=b"held")
            future = stub.Put.future(request, timeout=timeout)
            poll_until(
                lambda: unread_bytes(owner_port) > 0,
                timeout=FORWARDED_TIMEOUT,
                what="n1 to forward the Put to n2",
            )
            assert not future.done()
            yield future, n1, n2
        finally:
            n2.resume()
            if future is not None:
                future.cancel()


def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path) -> None:
    extra = ["--drain-seconds", LONG, "--forward-timeout", LONG]
    with (
        running_cluster(tmp_path, ["n1", "n2"], extra=extra) as cluster,
        held_put(cluster, timeout=ANSWER_TIMEOUT) as (future, n1, n2),
    ):
        launcher.send(n1.running(), signal.SIGTERM)
        n1.wait_for_log("stopping: draining in-flight requests")
        assert n1.running().poll() is None, "n1 must wait for its in-flight request"
        n2.resume()
        answer = future.result(timeout=ANSWER_TIMEOUT)
        assert answer.version > 0
        assert n1.running().wait(timeout=ANSWER_TIMEOUT) == 0, n1.output()
        with Client(n2.address) as kv:
            assert kv.get(_key_owned_by(cluster, "n2")) == b"held"


def test_drain_seconds_bounds_how_long_sigterm_waits(tmp_path: Path) -> None:
    extra = ["--drain-seconds", str(SHORT_DRAIN), "--forward-timeout", LONG]
    with (
        running_cluster(tmp_path, ["n1", "n2"], extra=extra) as cluster,
        held_put(cluster, timeout=ANSWER_TIMEOUT) as (future, n1, _),
    ):
        began = time.monotonic()
        launcher.send(n1.running(), signal.SIGTERM)
        # Well under the forward timeout: the drain, not the forward, ended the wait.
        assert n1.running().wait(timeout=float(LONG) / 2) == 0, n1.output()
        assert time.monotonic() - began >= SHORT_DRAIN
        with pytest.raises(grpc.RpcError):
            future.result(timeout=ANSWER_TIMEOUT)


def test_forward_timeout_applies_when_the_caller_sets_no_deadline(tmp_path: Path) -> None:
    extra = ["--forward-timeout", str(SHORT_FORWARD)]
    with (
        running_cluster(tmp_path, ["n1", "n2"], extra=extra) as cluster,
        held_put(cluster, timeout=None) as (future, _, _),
    ):
        with pytest.raises(grpc.RpcError) as failed:
            future.result(timeout=ANSWER_TIMEOUT)
        error = failed.value
        assert isinstance(error, grpc.Call)
        assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
