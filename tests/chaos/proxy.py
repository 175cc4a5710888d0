"""A TCP proxy between two kv processes that a fault test can cut, heal and slow down.

Node-to-node links go through these proxies (``--peer-via``) while clients keep the real
addresses, so a test can partition one node from its peers without touching the clients.

The proxy runs its own asyncio loop on a daemon thread, so synchronous test code (the fault
schedule, which must stay on the thread that spawned the nodes) drives it with plain calls that
return once the change has taken effect: after ``cut()`` returns, no byte crosses the proxy.

Two ways to cut, because peers see them differently:
- ``RESET``: every connection is aborted with a TCP RST and new ones are reset on accept; the
  peer learns at once (like a crashed host that rebooted, or a firewall REJECT).
- ``BLACKHOLE``: connections stay open but nothing is forwarded either way, and new ones are
  accepted and then starved; the peer learns only by its own timeouts (like a pulled cable,
  or a firewall DROP). ``heal()`` lets the held bytes through again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

CHUNK_BYTES = 64 * 1024
"""Largest read per hop: with one chunk held per direction, a connection buffers at most this
(plus the kernel's socket buffers), however fast one side writes."""
WRITE_HIGH_WATER = 256 * 1024
"""Bytes queued towards a slow reader before the proxy stops reading from the other side."""
CONTROL_TIMEOUT = 10.0
"""How long a control call (cut, heal, stop) may wait for the proxy's loop."""
LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, zero seconds: close() sends RST instead of FIN."""

T = TypeVar("T")


class CutMode(enum.Enum):
    RESET = "reset"
    BLACKHOLE = "blackhole"


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort a connection with RST (not FIN), so the peer sees a reset, not an orderly close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    writer.transport.abort()


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target`` ("host:port") until ``stop``."""

    def __init__(self, target: str, *, name: str = "") -> None:
        host, port = target.rsplit(":", 1)
        self.target_host, self.target_port = host, int(port)
        self.name = name or f"proxy->{target}"
        self.port = 0
        self.connections_accepted = 0
        self.bytes_forwarded = 0
        self._mode: CutMode | None = None
        self._latency = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._open: asyncio.Event | None = None  # set while forwarding is allowed

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cut_mode(self) -> CutMode | None:
        return self._mode

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._start())
        return self

    def cut(self, mode: CutMode = CutMode.RESET) -> None:
        """Stop all traffic now; see the module docstring for the two modes."""
        self._call(self._cut(mode))

    def heal(self) -> None:
        """Forward again (held bytes of blackholed connections go through)."""
        self._call(self._heal())

    def set_latency(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds`` (0 turns it off)."""
        self._call(self._set_latency(seconds))

    def stop(self) -> None:
        """Close the listener and every connection, and end the loop thread. Idempotent."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        # Port 0: the kernel picks a free port and we hold it from this moment (no race).
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self, mode: CutMode) -> None:
        assert self._open is not None
        self._mode = mode
        self._open.clear()
        if mode is CutMode.RESET:
            for link in list(self._links):
                self._drop(link, reset=True)

    async def _heal(self) -> None:
        assert self._open is not None
        self._mode = None
        self._open.set()

    async def _set_latency(self, seconds: float) -> None:
        self._latency = max(0.0, seconds)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._drop(link, reset=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _drop(self, link: _Link, *, reset: bool) -> None:
        self._links.discard(link)
        for task in link.tasks:
            task.cancel()
        for writer in link.writers():
            if reset:
                _reset(writer)
            else:
                writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self.connections_accepted += 1
        if self._mode is CutMode.RESET:
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._open.wait()  # a blackholed connection waits here for heal()
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except (OSError, asyncio.CancelledError):
            self._drop(link, reset=True)
            return
        if link not in self._links:  # cut or stopped while connecting
            _reset(up_writer)
            return
        link.upstream = up_writer
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            sink.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            link.tasks.append(asyncio.create_task(self._pump(link, source, sink)))

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        """Copy one direction; a closed side closes the whole link (half-close is not needed)."""
        assert self._open is not None
        try:
            while True:
                await self._open.wait()
                data = await source.read(CHUNK_BYTES)
                if not data:
                    break
                if self._latency:
                    await asyncio.sleep(self._latency)
                # Read before a cut, sent after it: hold it until heal (or drop with the link).
                await self._open.wait()
                sink.write(data)
                self.bytes_forwarded += len(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        if link in self._links:
            self._drop(link, reset=False)


__all__ = ["CutMode", "Proxy"]
