"""Remote backend: a repository offered by `bunker serve`, reached over ssh or a unix socket.

``ssh://[user@]host[:port]/path`` starts ``<remote-path> serve --stdio --repo /path`` on the
server through the OpenSSH client (``/~/path``: below the login directory); ``unix:///path.sock``
connects to a running ``bunker serve --socket``. The protocol is storage/wire.py's.

- One connection per backend, shared by every thread: each request carries an id, a reader
  thread hands each reply to the thread that waits for it, so the backup's upload threads and
  restore's reader threads have requests in flight together.
- Each request is bounded by BUNKER_STORAGE_TIMEOUT (twice that for object bytes). A dropped or
  silent connection is closed; every waiting request then reconnects (one new connection) and is
  retried with exponential backoff and jitter, BUNKER_STORAGE_RETRIES times (the S3 backend's
  settings). What still fails is a StorageError naming the object, the server and the next step.
  A put retried after its first attempt landed is harmless (same bytes); a retried
  create-if-absent then reports "exists", which is true.
- A server whose disk is full answers FAILED with the kind "full": that is RepositoryFull (the
  run stops with the next step: free space on the server's disk), not a StorageError, so a
  backup does not spool as if the server could not be reached.
- A server whose disk refuses writes (read-only, permissions) answers FAILED with the kind
  "refused", and an append-only server REFUSED: both are StorageRefused (storage/refused.py), so
  a backup keeps its data in the spool and ends at level err.
- An append-only server never replaces an object: a put of an existing name returns False
  (nothing written), a delete outside ``sessions/`` raises ServerRefused.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, DeletedUpstream, ExitCode, ObjectMissing, RequestedUpstream, StorageError
from bunker.storage import wire
from bunker.storage.backend import (
    STRAYS_SHOWN,
    Backend,
    Capabilities,
    ObjectInfo,
    Strays,
    validate_prefix,
)
from bunker.storage.full import server_disk_full
from bunker.storage.object_store import MAX_RETRY_DELAY, RetryPolicy
from bunker.storage.prefixes import MAX_SHOWN, printable
from bunker.storage.refused import NodeStoreFull, StorageRefused
from bunker.storage.remote_link import Lost, Opener, RemoteLocation, opener_for, parse_remote_url
from bunker.storage.remote_node import NodeQueries

__all__ = ["RemoteBackend", "ServerRefused", "open_remote", "parse_remote_url"]


class ServerRefused(StorageRefused):
    """The server does not allow the operation (append-only, or bytes that do not match a name):
    it answered, so the repository was reached and refuses (a backup spools, at level err)."""


class _Waiter:
    __slots__ = ("event", "frame", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.frame: wire.Frame | None = None
        self.error: BaseException | None = None


def _again(exc: BaseException) -> BaseException:
    """A fresh copy of a connection's failure for one more waiting thread (one exception object
    raised in several threads would share and tangle its traceback)."""
    if isinstance(exc, Lost):
        return Lost(*exc.args, no_answer=exc.no_answer)
    if type(exc) in (wire.ProtocolError, BunkerError, StorageError):
        assert isinstance(exc, BunkerError)
        return type(exc)(exc.message, exc.hint, exit_code=exc.exit_code)
    return exc


class Connection:
    """One handshaken connection: a write lock, a reader thread, the requests in flight."""

    def __init__(self, stream: wire.Stream, describe_loss: Callable[[], str], max_frame: int) -> None:
        self.stream = stream
        self._describe_loss = describe_loss  # () -> str: what the transport says (ssh's stderr)
        self.max_frame = max_frame
        self._wlock = threading.Lock()
        self._plock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self.dead: BaseException | None = None
        self._reader = threading.Thread(target=self._read_loop, name="bunker-remote-reader", daemon=True)
        self._reader.start()

    def request(self, op: int, meta: dict[str, Any], payload: bytes | memoryview, timeout: float) -> wire.Frame:
        """Send one request and wait for its reply. Raises Lost (retry on a new connection) or
        ProtocolError (the server broke the protocol)."""
        w = _Waiter()
        with self._plock:
            if self.dead is not None:
                raise _again(self.dead)
            rid = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            self._pending[rid] = w
        try:
            with self._wlock:
                wire.write_frame(self.stream, rid, op, meta, payload)
        except OSError as exc:
            self.fail(Lost(f"the connection broke while sending ({exc.strerror or exc}){self._describe_loss()}"))
        if not w.event.wait(timeout):
            self.fail(Lost(f"no answer in time (BUNKER_STORAGE_TIMEOUT allows {timeout:g} s)"))
        if w.error is not None:
            raise _again(w.error)
        assert w.frame is not None
        return w.frame

    def fail(self, error: BaseException) -> None:
        """Mark the connection dead, wake every waiting request with ``error``, close the stream."""
        with self._plock:
            if self.dead is None:
                self.dead = error
            waiters = list(self._pending.values())
            self._pending.clear()
        for w in waiters:
            if w.error is None and w.frame is None:
                w.error = self.dead
            w.event.set()
        self.stream.close()

    def _read_loop(self) -> None:
        try:
            while True:
                length, rid, code, meta_len = wire.read_header(self.stream, self.max_frame, "the server")
                frame = wire.read_body(self.stream, rid, code, length, meta_len, "the server")
                if rid == 0:
                    raise wire.ProtocolError(
                        f"the server closed the connection: {wire.text(frame.meta.get('m'))}",
                        "this is a bug in bunker (or the two sides run incompatible versions); please report it",
                    )
                with self._plock:
                    w = self._pending.pop(rid, None)
                if w is None:
                    raise wire.ProtocolError(f"the server answered request {rid}, which was never sent", "")
                w.frame = frame
                w.event.set()
        except wire.ConnectionClosed as exc:
            self.fail(Lost(f"{exc.message}{self._describe_loss()}"))
        except wire.ProtocolError as exc:
            self.fail(exc)
        except OSError as exc:
            self.fail(Lost(f"the connection failed ({exc.strerror or exc}){self._describe_loss()}"))
        except BaseException as exc:  # never leave a waiting thread hanging
            self.fail(Lost(f"{type(exc).__name__}: {exc}"))

    def close(self) -> None:
        """Close the stream; the reader thread ends."""
        self.fail(Lost("the connection was closed by this side"))


class RemoteBackend(NodeQueries, Backend):
    """A repository served by `bunker serve` (see the module docstring)."""

    def __init__(self, loc: RemoteLocation, *, create: bool = False, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.loc = loc
        self.url = loc.url
        self.endpoint = loc.where
        self._policy = RetryPolicy.from_env(env)
        self._opener: Opener = opener_for(loc, env, self._policy.timeout)
        self._create = create
        self._lock = threading.Lock()
        self._current = _Current()
        self.append_only = False
        self.server_version = ""
        self.server_repo = ""  # the repository directory on the server, as its hello says
        self.server_node = ""  # the node's name when the server is a node (docs/hierarchy.md)
        self._answered = False  # a server answered once: a refused connection then gets every retry
        self._finalizer = weakref.finalize(self, self._current.close, self._opener)
        try:
            self._call("open the repository", "", wire.PING, {})
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the interface

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        if len(data) > wire.MAX_PAYLOAD:
            raise BunkerError(
                f"cannot store {name}: it is {len(data)} bytes, more than a bunker server takes in one object "
                f"({wire.MAX_PAYLOAD})",
                "this is a bug in bunker (its objects stay far below that); please report it",
            )
        f = self._call("write", name, wire.PUT, {"n": name, "x": if_absent}, data, io=True)
        if f.code == wire.OK:
            return True
        if f.code == wire.EXISTS:
            return False
        raise self._status_error(f, "write", name)

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        meta: dict[str, Any] = {"n": name, "o": offset, "l": length}
        f = self._call("read", name, wire.GET, meta, io=True)
        if f.code == wire.OK:
            return bytes(f.payload)
        if f.code == wire.MISSING:
            if f.meta.get("w") == "gone":
                raise DeletedUpstream(name, str(f.meta.get("node", "")), str(f.meta.get("why", "")))
            if f.meta.get("w") == "requested":
                route = f.meta.get("route")
                raise RequestedUpstream(
                    name,
                    str(f.meta.get("node", "")),
                    str(f.meta.get("why", "")),
                    [str(r) for r in route] if isinstance(route, list) else [],
                )
            raise ObjectMissing(name)
        if f.code == wire.TOO_LARGE and isinstance(f.meta.get("s"), int):
            return self._get_pieces(name, offset, length, f.meta["s"])
        raise self._status_error(f, "read", name)

    def _get_pieces(self, name: str, offset: int, length: int | None, size: int) -> bytes:
        """An answer larger than one frame, in ranges of MAX_PAYLOAD."""
        start = max(0, size + offset) if offset < 0 else min(offset, size)
        end = size if length is None else min(size, start + length)
        parts = []
        for pos in range(start, end, wire.MAX_PAYLOAD):
            parts.append(self._get(name, pos, min(wire.MAX_PAYLOAD, end - pos)))
        return b"".join(parts)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        after = ""
        while True:
            f = self._call("list", prefix, wire.LIST, {"p": prefix, "a": after})
            if f.code != wire.OK:
                raise self._status_error(f, "list", prefix)
            try:
                rows = encoding.unpack(f.payload)
                page = [ObjectInfo(prefix + r[0], int(r[1]), float(r[2])) for r in rows]
                if any(not isinstance(r[0], str) or i.name <= after for r, i in zip(rows, page, strict=True)):
                    raise ValueError("names out of order")
            except (encoding.FormatError, TypeError, ValueError, IndexError) as exc:
                raise wire.ProtocolError(f"the server sent a malformed listing of {prefix} ({exc})", "") from None
            yield from page  # names are validated again by Backend.list
            if not f.meta.get("more") or not page:
                return
            after = page[-1].name

    def strays(self, prefix: str) -> Strays:
        """The server's own report (LIST with ``j``). A server that predates it sends none, and
        one of an older version may not know a reserved prefix: nothing to report then (its
        listings leave out what it does not know, too)."""
        f = self._call("list", validate_prefix(prefix), wire.LIST, {"p": prefix, "j": True})
        if f.code == wire.INVALID:
            return Strays()
        if f.code != wire.OK:
            raise self._status_error(f, "list", prefix)
        shown, count = f.meta.get("j"), f.meta.get("jn")
        if not isinstance(shown, list) or not isinstance(count, int):
            return Strays()
        names = tuple(printable(wire.text(n, MAX_SHOWN)) for n in shown[:STRAYS_SHOWN])
        return Strays(names, max(count, len(names)))

    def _delete(self, name: str) -> None:
        f = self._call("delete", name, wire.DELETE, {"n": name})
        if f.code != wire.OK:
            raise self._status_error(f, "delete", name)

    def _stat(self, name: str) -> ObjectInfo | None:
        f = self._call("stat", name, wire.STAT, {"n": name})
        if f.code == wire.MISSING:
            return None
        size, mtime = f.meta.get("s"), f.meta.get("t")
        if f.code != wire.OK:
            raise self._status_error(f, "stat", name)
        if not isinstance(size, int) or not isinstance(mtime, (int, float)):
            raise wire.ProtocolError(f"the server sent a malformed answer for {name}", "")
        return ObjectInfo(name, size, float(mtime))

    def capabilities(self) -> Capabilities:
        return Capabilities(create_if_absent=True, server_side_time=True, range_merge_gap=1 << 20, remote=True)

    def close(self) -> None:
        """Close the connection (and end the ssh process)."""
        self._finalizer()

    # ------------------------------------------------------------------ connections and retries

    def _connection(self) -> Connection:
        with self._lock:
            conn = self._current.conn
            if conn is not None and conn.dead is None:
                return conn
            stream, describe, fields = self._opener.open(create=self._create)
            self._create = False  # made by the first connection: a later one must not recreate it
            self.append_only = fields.get("append_only") is True
            self.server_version = wire.text(fields.get("server"), 100)
            self.server_repo = wire.text(fields.get("repo"), 1000)
            self.server_node = wire.text(fields.get("node"), 100) if fields.get("node") else ""
            max_frame = fields.get("max_frame")
            limit = max_frame if isinstance(max_frame, int) and 0 < max_frame <= wire.MAX_FRAME else wire.MAX_FRAME
            self._current.conn = conn = Connection(stream, describe, limit)
            self._answered = True
            return conn

    def _call(
        self,
        what: str,
        name: str,
        op: int,
        meta: dict[str, Any],
        payload: bytes | memoryview = b"",
        *,
        io: bool = False,
    ) -> wire.Frame:
        timeout = self._policy.timeout * (2 if io else 1)
        attempt = quick = 0
        started = time.monotonic()
        while True:
            conn: Connection | None = None
            try:
                conn = self._connection()
                return conn.request(op, meta, payload, timeout)
            except Lost as exc:
                if conn is not None:
                    conn.fail(exc)
                if exc.no_answer and not self._answered:
                    # nothing listens (a stopped server): a short try, not the backoff for a
                    # server that stumbles; then it is unreachable and a backup spools
                    delay = self._policy.no_answer_delay(quick, started)
                    if delay is None:
                        raise self._unreachable(exc, what, name, time.monotonic() - started) from None
                    time.sleep(delay)
                    quick += 1
                    continue
                if attempt >= self._policy.retries:
                    raise self._unreachable(exc, what, name) from None
                time.sleep(self._delay(attempt))
                attempt += 1

    def _delay(self, attempt: int) -> float:
        first = self._policy.first_delay
        return min(first * 2.0**attempt, max(first, MAX_RETRY_DELAY)) * (1.0 + random.random())

    def _what(self, what: str, name: str) -> str:
        return f"{what} {name} at {self.endpoint}" if name else f"{what} at {self.endpoint}"

    def _unreachable(self, exc: Lost, what: str, name: str, waited: float | None = None) -> StorageError:
        if waited is not None:
            return StorageError(
                f"could not {self._what(what, name)}: nothing answers there ({exc}; tried for {waited:.1f} s)",
                f"start the server ({self._opener.test_hint}) or fix the repository URL, then run the command again",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        tries = f"also after {self._policy.retries} retries" if self._policy.retries else "and retries are off"
        return StorageError(
            f"could not {self._what(what, name)}: the server did not answer or the connection kept dropping "
            f"({exc}), {tries}",
            f"check that the server is up and reachable ({self._opener.test_hint}) and the network, then run the "
            "command again; BUNKER_STORAGE_RETRIES and BUNKER_STORAGE_RETRY_DELAY set how long bunker keeps retrying",
            exit_code=ExitCode.NO_REPOSITORY,
        )

    def _status_error(self, f: wire.Frame, what: str, name: str) -> BunkerError:
        message, hint = wire.text(f.meta.get("m")), wire.text(f.meta.get("h"))
        where = self._what(what, name)
        if f.code == wire.REFUSED:
            return ServerRefused(
                f"{self.endpoint} refused: {message}",
                (hint or "ask the server's administrator what this server allows").rstrip("."),
            )
        if f.code == wire.FAILED and f.meta.get("k") == wire.KIND_REFUSED:
            # the server's disk refuses writes (read-only, permissions): it will not come back by
            # itself, so a backup spools at level err (storage/refused.py)
            server = self.loc.host if self.loc.scheme == "ssh" else "the machine that runs `bunker serve`"
            fix = hint.rstrip(".") or "make the repository directory writable"
            return StorageRefused(
                f"could not {where}: the server's repository refuses writes (the server says: {message})",
                f"on the server ({server}): {fix}",
            )
        if f.code == wire.FAILED and f.meta.get("k") == wire.KIND_NODE_FULL:
            # a node whose store holds only data not yet recorded upstream: like an unreachable
            # repository, the backup keeps its data in this machine's spool and sends it later
            return NodeStoreFull(f"could not {where}: {message}", hint)
        if f.code == wire.FAILED and f.meta.get("k") == wire.KIND_FULL:
            # the server's disk is full: not "unreachable" (a backup must not spool), no retry helps
            server = self.loc.host if self.loc.scheme == "ssh" else "the machine that runs `bunker serve`"
            return server_disk_full(f"could not {where}", message, server, self.server_repo)
        if f.code == wire.FAILED:
            return StorageError(
                f"could not {where}: the server reports: {message}",
                hint or "check the server's disk and log, then run the command again",
                exit_code=ExitCode.FATAL,
            )
        if f.code == wire.INVALID:
            return BunkerError(
                f"could not {where}: the server calls the request invalid ({message})",
                "this is a bug in bunker, or the client and the server run different versions; install the same "
                "version on both",
            )
        return wire.ProtocolError(
            f"could not {where}: the server answered with the unexpected status {f.code}",
            "install the same bunker version on the client and on the server",
        )


class _Current:
    """The backend's connection, apart from the backend (its finalizer must not hold the backend)."""

    def __init__(self) -> None:
        self.conn: Connection | None = None

    def close(self, opener: Opener) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        opener.close()


def open_remote(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> RemoteBackend:
    """The backend for an ``ssh://`` or ``unix://`` URL; ``create`` asks the server to make the
    repository directory."""
    return RemoteBackend(parse_remote_url(url), create=create, env=env)
