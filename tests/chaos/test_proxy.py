"""The fault proxy forwards, and its cuts really cut: plain sockets and a real gRPC call.

A blackholed connection is shown to carry nothing by a bounded wait that must come back
empty (absence has no event to wait for); everything else waits on the bytes themselves.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from chaos.proxy import CutMode, Proxy

from kv_client import Client, DeadlineExceededError, UnavailableError
from kv_node.testing import InProcessCluster

pytestmark = pytest.mark.chaos

IO_TIMEOUT = 5.0
SILENCE = 0.5  # how long a blackholed connection must stay silent to pass


class EchoServer:
    """Echoes every byte back; one thread per connection; closes everything on stop."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass

    def stop(self) -> None:
        # shutdown, not just close: it wakes the threads blocked in accept() and recv().
        for sock in [self._listener, *self._conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._accepter.join(IO_TIMEOUT)
        for thread in self._threads:
            thread.join(IO_TIMEOUT)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[Proxy]:
    with Proxy(echo.address) as running:
        yield running


def connect(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def send_and_receive(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return sock.recv(65536)


def dial_and_exchange(proxy: Proxy, payload: bytes) -> bytes:
    with connect(proxy) as sock:
        return send_and_receive(sock, payload)


def test_forwards_both_ways_and_large_payloads(proxy: Proxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the proxy ever buffers
    with connect(proxy) as sock:
        assert round_trip(sock, b"hello") == b"hello"
        assert round_trip(sock, payload) == payload
    assert proxy.bytes_forwarded >= 2 * (len(payload) + 5)


def test_reset_cut_resets_open_connections_and_new_ones(proxy: Proxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock, b"before") == b"before"
        proxy.cut(CutMode.RESET)
        with pytest.raises(ConnectionResetError):
            send_and_receive(sock, b"after")
    with pytest.raises(ConnectionResetError):  # in connect, or at the first read
        dial_and_exchange(proxy, b"x")
    proxy.heal()
    with connect(proxy) as healed:
        assert round_trip(healed, b"healed") == b"healed"


def test_blackhole_holds_bytes_silently_until_heal(proxy: Proxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock, b"before") == b"before"
        proxy.cut(CutMode.BLACKHOLE)
        sock.sendall(b"held")
        sock.settimeout(SILENCE)
        with pytest.raises(TimeoutError):
            sock.recv(10)  # no reset, no data: silence
        with connect(proxy) as fresh:
            fresh.settimeout(SILENCE)
            fresh.sendall(b"new")
            with pytest.raises(TimeoutError):
                fresh.recv(10)
            proxy.heal()
            fresh.settimeout(IO_TIMEOUT)
            assert fresh.recv(10) == b"new"
        sock.settimeout(IO_TIMEOUT)
        assert sock.recv(10) == b"held"


def test_latency_delays_but_delivers(proxy: Proxy) -> None:
    proxy.set_latency(0.05)
    with connect(proxy) as sock:
        assert round_trip(sock, b"slow") == b"slow"


def test_stop_closes_every_connection(echo: EchoServer) -> None:
    proxy = Proxy(echo.address).start()
    with connect(proxy) as sock:
        assert round_trip(sock, b"x") == b"x"
        proxy.stop()
        with pytest.raises(ConnectionResetError):
            send_and_receive(sock, b"y")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT)
    proxy.stop()  # idempotent


def answers_within(kv: Client, address: str, timeout: float) -> str:
    """The node id from the first node status that answers before ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return kv.node_status(address, timeout=max(deadline - time.monotonic(), 0.01)).node_id
        except UnavailableError:
            if time.monotonic() >= deadline:
                raise


def test_grpc_through_the_proxy_and_its_cuts() -> None:
    nodes = InProcessCluster(["a"])
    try:
        nodes.start()
        with Proxy(nodes.addresses["a"]) as proxy:
            with Client(proxy.address, timeout=2.0) as kv:
                assert kv.node_status(proxy.address).node_id == "a"
                proxy.cut(CutMode.RESET)
                with pytest.raises(UnavailableError):
                    kv.node_status(proxy.address, timeout=2.0)
            proxy.heal()
            # A fresh channel: the old one sits in gRPC's reconnect backoff after the reset.
            # gRPC may still hand it the old subchannel, in backoff, for a moment: the healed
            # link must answer within IO_TIMEOUT, not at the first attempt.
            with Client(proxy.address, timeout=2.0) as kv:
                assert answers_within(kv, proxy.address, IO_TIMEOUT) == "a"
                proxy.cut(CutMode.BLACKHOLE)
                # The deadline, or the SDK's keepalive (a ping unanswered for 500 ms ends the
                # connection: UNAVAILABLE), whichever comes first: either way, no answer.
                with pytest.raises((DeadlineExceededError, UnavailableError)):
                    kv.node_status(proxy.address, timeout=SILENCE)
                proxy.heal()
                assert kv.node_status(proxy.address, timeout=IO_TIMEOUT).node_id == "a"
    finally:
        nodes.stop()
