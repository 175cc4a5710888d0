"""Just enough HTTP/2 to send a gRPC call that no gRPC library would: a lying length prefix,
a connection that stops half-way through its preface.

Frames are written by hand (RFC 9113 section 4.1); header blocks use only HPACK literals
without indexing and without Huffman coding (RFC 7541 section 6.2.2), which every decoder
must accept. Replies are read as frames only: a test looks at frame types (did the server
end the stream?), never decodes the server's header block.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4

FRAME_HEADER_BYTES = 9


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = bytearray([limit])
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman coding."""
    block = bytearray()
    for name, value in headers:
        block += b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value
    return bytes(block)


def literal_headers(block: bytes) -> dict[bytes, bytes]:
    """The header fields of ``block`` sent as literals with a new name and no Huffman coding
    (how gRPC sends grpc-status and grpc-message); other fields are skipped, not decoded."""
    found: dict[bytes, bytes] = {}
    at = 0
    while at < len(block):
        first = block[at]
        if first & 0x80:  # indexed field: a table entry this helper does not keep
            _, at = _read_hpack_int(block, at, 7)
            continue
        if first & 0xE0 == 0x20:  # dynamic table size update
            _, at = _read_hpack_int(block, at, 5)
            continue
        name_index, at = _read_hpack_int(block, at, 6 if first & 0x40 else 4)
        name = None
        if name_index == 0:
            name, at = _read_hpack_string(block, at)
        value, at = _read_hpack_string(block, at)
        if name is not None and value is not None:
            found[name] = value
    return found


def _read_hpack_string(block: bytes, at: int) -> tuple[bytes | None, int]:
    """A string literal; None for a Huffman-coded one (skipped, not decoded)."""
    huffman = bool(block[at] & 0x80)
    length, at = _read_hpack_int(block, at, 7)
    return (None if huffman else block[at : at + length]), at + length


def _read_hpack_int(block: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[at] & limit
    at += 1
    if value < limit:
        return value, at
    shift = 0
    while True:
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def grpc_request_headers(authority: str, path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


def grpc_message(payload: bytes, *, declared_length: int | None = None) -> bytes:
    """A gRPC length-prefixed message (uncompressed) whose prefix may lie about its length."""
    length = len(payload) if declared_length is None else declared_length
    return struct.pack(">BI", 0, length) + payload


class Connection:
    """One raw HTTP/2 connection: send frames, read frames, answer SETTINGS and PING."""

    def __init__(self, address: str, *, timeout: float) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start(self) -> None:
        self.send(PREFACE + frame(SETTINGS, 0, 0))

    def close(self) -> None:
        self.sock.close()

    def _read_exactly(self, count: int) -> bytes | None:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def next_frame(self) -> Frame | None:
        """The next frame from the server, or None when it closed the connection."""
        head = self._read_exactly(FRAME_HEADER_BYTES)
        if head is None:
            return None
        length = int.from_bytes(head[:3], "big")
        kind, flags, stream = struct.unpack(">BBI", head[3:])
        payload = self._read_exactly(length)
        if payload is None:
            return None
        received = Frame(kind, flags, stream & 0x7FFFFFFF, payload)
        if kind == SETTINGS and not flags & ACK:
            self.send(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.send(frame(PING, ACK, 0, payload))
        return received

    def count_stream_ends(self, streams: int, *, timeout: float) -> int:
        """Read until ``streams`` streams have ended (trailers or reset), the connection ends,
        or ``timeout`` passes; how many ended."""
        ended = 0
        deadline = time.monotonic() + timeout
        while ended < streams and time.monotonic() < deadline:
            try:
                received = self.next_frame()
            except TimeoutError:
                break
            if received is None or received.kind == GOAWAY:
                break
            if received.kind == RST_STREAM or (
                received.kind == HEADERS and received.flags & END_STREAM
            ):
                ended += 1
        return ended

    def wait_stream_end(self, stream: int, *, timeout: float) -> dict[bytes, bytes]:
        """The trailers that ended ``stream``; fails if it was reset, the connection ended,
        or nothing came within ``timeout`` seconds (the socket's own timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                received = self.next_frame()
            except TimeoutError:
                break
            assert received is not None, "the server closed the connection"
            assert received.kind != GOAWAY, f"the server sent GOAWAY {received.payload!r}"
            if received.stream != stream:
                continue
            assert received.kind != RST_STREAM, f"the server reset stream {stream}"
            if received.kind == HEADERS and received.flags & END_STREAM:
                return literal_headers(received.payload)
        raise AssertionError(f"the server did not end stream {stream} in {timeout}s")
