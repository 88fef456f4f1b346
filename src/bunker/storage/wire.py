"""The `bunker serve` protocol's codec: handshake and length-prefixed frames (docs/format.md,
"The serve protocol").

Both sides of a connection use this module: the client (storage/remote.py) and the server
(node/serve.py). Everything read here is untrusted: every length is checked against a limit
before any memory is allocated for it, and a peer that breaks a rule gets a ProtocolError (a clear
message, the connection is closed) — never a crash, a hang on a bogus length, or unbounded memory.

Layout (all integers big-endian):

- hello, each side once (client first): MAGIC (8 bytes), u16 lowest and u16 highest protocol
  version spoken, u32 length of a msgpack map (at most MAX_META), the map.
- frame: u32 body length, u32 request id, u8 op (request) or status (reply), u16 length of the
  msgpack meta map at the start of the body; the rest of the body is raw payload (object bytes).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from bunker import encoding
from bunker.errors import BunkerError, ExitCode, StorageError

MAGIC = b"\x89BKSV\r\n\x1a"  # a high byte and CR LF: a stream mangled as text fails at once
VERSION_MIN = 1
VERSION_MAX = 1

MAX_META = 0xFFFF  # the u16 meta length
MAX_PAYLOAD = 64 << 20  # the largest object one request moves (bunker's objects stay far below it)
MAX_FRAME = MAX_PAYLOAD + MAX_META
LIST_PAGE = 20000  # names per LIST reply (about 2 MB); the client asks for the next page

_HELLO = struct.Struct(">8sHHI")
_HEADER = struct.Struct(">IIBH")
HEADER_SIZE = _HEADER.size

# request ops
PUT, GET, LIST, DELETE, STAT, PING = 1, 2, 3, 4, 5, 6
OPS = {PUT: "PUT", GET: "GET", LIST: "LIST", DELETE: "DELETE", STAT: "STAT", PING: "PING"}

# reply statuses
OK = 0  # done; the meta and payload carry the answer
MISSING = 1  # the object does not exist
EXISTS = 2  # put not done: the name exists (create-if-absent, or an append-only server)
REFUSED = 3  # the server does not allow this (append-only; bytes that do not match a hash name)
INVALID = 4  # a malformed request (bad name, bad field, unknown op, too large)
FAILED = 5  # the server's storage failed (disk full, permissions); meta m/h say what and what next
PROTOCOL = 6  # request id 0 only: the connection is broken off, meta m says why
TOO_LARGE = 7  # a GET whose answer would exceed MAX_PAYLOAD; meta s is the object's size
# FAILED's meta ``k``: what kind of failure (absent, or a kind this side does not know: a plain
# storage failure)
KIND_FULL = "full"  # the server's disk is full (ENOSPC, EDQUOT): no point retrying, nor spooling
KIND_NODE_FULL = "node-full"  # a node's store is full of data not yet recorded upstream: spool, warn
KIND_REFUSED = "refused"  # the server's disk refuses writes (read-only, permissions): spool, but err
STATUSES = {
    OK: "ok",
    MISSING: "missing",
    EXISTS: "exists",
    REFUSED: "refused",
    INVALID: "invalid",
    FAILED: "failed",
    PROTOCOL: "protocol error",
    TOO_LARGE: "too large",
}


class ProtocolError(StorageError):
    """The peer broke the protocol (garbage, an oversized length, a truncated frame, a wrong
    magic). The connection cannot be used any more."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (or it dropped); ``clean``: at a frame boundary."""

    def __init__(self, message: str, clean: bool) -> None:
        super().__init__(message, "")
        self.clean = clean


class Stream(Protocol):
    """A byte stream: a pipe pair, a socket or a subprocess's stdin/stdout."""

    def readinto(self, buf: memoryview) -> int: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...


class FdStream:
    """Two file descriptors (stdin/stdout of `serve --stdio`, or of an ssh child process)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd

    def readinto(self, buf: memoryview) -> int:
        return os.readv(self.rfd, [buf])

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def close(self) -> None:
        for fd in {self.rfd, self.wfd}:
            with contextlib.suppress(OSError):
                os.close(fd)


class SocketStream:
    """A connected stream socket (unix or inherited from inetd/systemd)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def readinto(self, buf: memoryview) -> int:
        return self.sock.recv_into(buf)

    def write(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def read_exact(stream: Stream, n: int, what: str, *, at_boundary: bool = False) -> bytearray:
    """Read exactly ``n`` bytes (``n`` was checked against a limit by the caller)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if k <= 0:
            clean = at_boundary and got == 0
            where = "" if clean else f" in the middle of {what} ({got} of {n} bytes)"
            raise ConnectionClosed(f"the connection was closed{where}", clean)
        got += k
    return buf


# ------------------------------------------------------------------------------------- hello


def encode_hello(fields: Mapping[str, Any], vmin: int = VERSION_MIN, vmax: int = VERSION_MAX) -> bytes:
    """The hello block: magic, the version range spoken, a msgpack map."""
    meta = encoding.pack(dict(fields))
    if len(meta) > MAX_META:
        raise ValueError("hello too large")
    return _HELLO.pack(MAGIC, vmin, vmax, len(meta)) + meta


@dataclass(frozen=True)
class Hello:
    """What a peer's hello says."""

    vmin: int
    vmax: int
    fields: dict[str, Any]


def read_hello(stream: Stream, peer: str) -> Hello:
    """Read and check the peer's hello; ``peer`` names it in messages ("the server")."""
    head = bytes(read_exact(stream, _HELLO.size, "the handshake", at_boundary=True))
    magic, vmin, vmax, n = _HELLO.unpack(head)
    if magic != MAGIC:
        shown = head[:24].decode("ascii", "backslashreplace")
        raise ProtocolError(
            f"{peer} does not speak the bunker serve protocol (it began with {shown!r})",
            "the far side is not `bunker serve`, or something (a shell startup file, a banner) writes to its "
            "output before bunker does",
        )
    if n > MAX_META:
        raise ProtocolError(f"{peer} sent a handshake of {n} bytes (at most {MAX_META})", "")
    meta = read_exact(stream, n, "the handshake")
    return Hello(vmin, vmax, decode_meta(meta, f"the handshake of {peer}"))


def choose_version(mine: tuple[int, int], theirs: tuple[int, int]) -> int:
    """The highest version both sides speak, or 0 when the ranges do not overlap."""
    top = min(mine[1], theirs[1])
    return top if top >= max(mine[0], theirs[0]) else 0


# ------------------------------------------------------------------------------------ frames


@dataclass
class Frame:
    """One request or reply: ``code`` is an op (request) or a status (reply)."""

    rid: int
    code: int
    meta: dict[str, Any]
    payload: memoryview


def encode_header(rid: int, code: int, meta: bytes, payload_len: int) -> bytes:
    """The frame header followed by the meta bytes (the payload is written after it)."""
    return _HEADER.pack(len(meta) + payload_len, rid, code, len(meta)) + meta


def write_frame(
    stream: Stream, rid: int, code: int, meta: Mapping[str, Any], payload: bytes | memoryview = b""
) -> None:
    """Write one frame; the caller holds the stream's write lock. Small frames go out in one write."""
    m = encoding.pack(dict(meta)) if meta else b""
    if len(m) > MAX_META:
        raise ValueError("frame meta too large")
    head = encode_header(rid, code, m, len(payload))
    if len(payload) < 65536:
        stream.write(head + bytes(payload))
    else:
        stream.write(head)
        stream.write(payload)


def read_header(stream: Stream, max_frame: int, peer: str) -> tuple[int, int, int, int]:
    """Read a frame header: (body length, request id, code, meta length), checked against
    ``max_frame``. Raises ConnectionClosed at a clean end of the stream."""
    head = bytes(read_exact(stream, HEADER_SIZE, "a frame header", at_boundary=True))
    length, rid, code, meta_len = _HEADER.unpack(head)
    if length > max_frame:
        raise ProtocolError(
            f"{peer} sent a frame of {length} bytes, more than the limit of {max_frame}",
            "the far side is broken or hostile, or not the same protocol version",
        )
    if meta_len > length:
        raise ProtocolError(f"{peer} sent a frame whose meta ({meta_len} bytes) is longer than its body ({length})", "")
    return length, rid, code, meta_len


def read_body(stream: Stream, rid: int, code: int, length: int, meta_len: int, peer: str) -> Frame:
    """Read a frame's body (after read_header) and decode its meta."""
    body = read_exact(stream, length, "a frame")
    view = memoryview(body)
    meta = decode_meta(view[:meta_len], f"a frame from {peer}") if meta_len else {}
    return Frame(rid, code, meta, view[meta_len:])


def decode_meta(data: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    """Decode a msgpack map with text keys from untrusted bytes."""
    try:
        value = encoding.unpack(bytes(data))
    except encoding.FormatError as exc:
        raise ProtocolError(f"{what} is malformed: {exc}", "") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"{what} is malformed: not a map of named fields", "")
    return value


def text(value: Any, limit: int = 2000) -> str:
    """A message from the peer, fit to print: a string, control characters replaced, bounded."""
    s = value if isinstance(value, str) else ""
    s = "".join(c if c.isprintable() or c == "\n" else "?" for c in s[:limit])
    return s


def usage(message: str, hint: str) -> BunkerError:
    """A mistake in the command line or URL."""
    return BunkerError(message, hint, exit_code=ExitCode.USAGE)
