"""`bunker serve`: one local repository directory offered over the serve protocol (its two front
ends, stdio and a unix socket: node/serve_frontends.py).

The server runs on stdin/stdout (`serve --stdio`: started by ssh, a forced command in
authorized_keys, inetd or a systemd socket unit) or on a unix socket (`serve --socket`, a thread
per connection). Every connection:

- reads the client's hello, answers with its own (the version both speak, append-only or not,
  the frame limit) or with a refusal: no common version, a client asking for another repository
  path than the one served (the path given to `serve --repo` is the only one a client can reach);
- reads requests and hands them to a small thread pool; replies are written under a lock, in the
  order they finish. Memory is bounded: at most MAX_INFLIGHT requests and MAX_INFLIGHT_BYTES of
  request bodies are held at once (the reader waits, and with it the client);
- validates every name against the registry of prefixes and their naming rules
  (storage/prefixes.py) before any filesystem call (the backend does it again): a PUT of a name
  that breaks its prefix's rule (``packs/junk``, ``sessions/x``) is answered INVALID, naming the
  format version and its prefixes; listings never show such names (LIST with ``j`` reports them);
- in append-only mode, creates objects but never replaces one (a put of an existing name answers
  "exists"), refuses deletes except under ``sessions/``, and refuses bytes that do not match a
  hash name: a compromised client cannot destroy or spoil what is stored.

A client that breaks the protocol (garbage, an oversized length) gets a PROTOCOL frame saying why,
and the connection is closed; the server itself never crashes on input.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bunker import __version__, encoding
from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.repo.config import FORMAT_VERSION
from bunker.repo.objects import content_hash, is_hash_name
from bunker.storage import wire
from bunker.storage.backend import InvalidName, ObjectInfo, validate_name, validate_prefix
from bunker.storage.full import RepositoryFull
from bunker.storage.local import LocalBackend
from bunker.storage.prefixes import FIXED_NAMES, known_names
from bunker.storage.refused import StorageRefused

WORKERS = 4  # requests handled at once per connection (the client runs 2-3 threads)
MAX_INFLIGHT = 16  # requests read and not yet answered
MAX_INFLIGHT_BYTES = 2 * wire.MAX_FRAME  # request bodies held at once


_to_syslog = False  # stderr is the client's connection (inetd): log lines go to syslog


def log(message: str) -> None:
    """One line on stderr (ssh passes it to the client; systemd to the journal), or to syslog
    under inetd, which hands the connection over as stderr too."""
    if _to_syslog:
        import syslog

        syslog.syslog(syslog.LOG_INFO, message)
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"bunker serve: {message}\n")
        sys.stderr.flush()


def log_to_syslog() -> None:
    """From now on :func:`log` writes to syslog (stderr is the client's connection)."""
    global _to_syslog
    _to_syslog = True


@dataclass(frozen=True)
class NodeRole:
    """What makes a server a node's (node/node_serve.py): which store a client reaches, and
    what it may write there (clients back up; records come down from the top only)."""

    name: str
    resolve: Callable[[str | None, bool], str]  # (requested path, create) -> store directory
    writable: tuple[str, ...]  # prefixes clients may create objects under
    refusal: str  # why anything else is refused, and where it runs instead
    refusal_hint: str
    # store directory -> objects evicted under record receipts (listed, marked as held upstream)
    upstream_held: Callable[[str], dict[str, ObjectInfo]] = lambda _store: {}
    # store directory -> bytes over the store's bound after eviction ("" when there is room)
    full: Callable[[str], str] = lambda _store: ""
    # store directory, session id: a client wrote or deleted a lease (node/acks.py notes it)
    session_event: Callable[[str, str], None] = lambda _store, _session: None
    # store directory -> one connection's judge of the packs it is sent (node/quota.py): None
    # to store it, else ("full" | "refused", why)
    pack_gate: Callable[[str], Callable[[str, memoryview], tuple[str, str] | None]] | None = None
    # store directory, snapshot name -> when the repository of record holds it (0.0: not yet)
    recorded: Callable[[str, str], float] | None = None
    # store directory, bytes -> whether they are a certificate the master key issued for the
    # store's repository (a client certified after the node was seeded stores its own)
    certificate_ok: Callable[[str, bytes], bool] = lambda _store, _data: False
    # store directory -> the node's signed witness statement for the store's repository: the
    # newest snapshot per client it knows the repository of record holds (a client that has no
    # chain head of its own takes it from there: backup/link.py)
    statement: Callable[[str], bytes] | None = None
    # store directory, name of an evicted object a client reads -> (its bytes when an upstream
    # gave them at once, else None; why it waits; the route it was requested on; whether a signed
    # record says it is gone for good) (node/requests.py)
    fetch: Callable[[str, str], tuple[bytes | None, str, list[str], bool]] | None = None
    # store directory -> its restore requests, for `bunker requests` on a client
    requests: Callable[[str], list[dict[str, Any]]] | None = None
    # store directory, a restore's lease fields (format.md section 22: snapshot, lease id,
    # seconds, released packs, end, done) -> {until, room} (node/leases.py)
    lease: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    # store directory, client name (or "*") -> its listing request, asked upstream (node/listing.py)
    listing: Callable[[str, str], dict[str, Any]] | None = None
    # store directory, a failure report's fields (format.md section 22: certificate, code, exit,
    # message, started) -> {status, new}: the node signs a status record for a client that could
    # not run (node/reports.py)
    report: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class ServeConfig:
    """What one server offers: the repository directory and whether it is append-only (a
    node's server: its role, which picks the store per connection)."""

    repo: str
    append_only: bool = False
    node: NodeRole | None = None


class _Bad(Exception):
    """A request the server answers with a status other than OK."""

    def __init__(self, status: int, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.hint = status, message, hint


class _Budget:
    """Bytes of request bodies held at once (the reader waits for room)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def take(self, n: int) -> None:
        with self.cond:
            while self.used and self.used + n > self.limit:
                self.cond.wait()
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class Session:
    """One client connection on ``stream``."""

    def __init__(self, stream: wire.Stream, config: ServeConfig, peer: str = "the client") -> None:
        self.stream, self.config, self.peer = stream, config, peer
        self.backend: LocalBackend | None = None
        self._wlock = threading.Lock()
        self._broken = False  # the reply stream failed: the client is gone
        self._gate: Callable[[str, memoryview], tuple[str, str] | None] | None = None  # quotas, per connection

    # ------------------------------------------------------------------ the connection

    def run(self) -> int:
        """Serve until the client closes the connection; return the exit code for `serve --stdio`
        (0 after a clean end, FATAL after a protocol violation or a refused handshake)."""
        try:
            if not self._handshake():
                return ExitCode.FATAL
            return self._serve()
        finally:
            self.stream.close()
            if self.backend is not None:
                self.backend.close()

    def _hello_error(self, message: str, hint: str, code: int = ExitCode.FATAL) -> None:
        log(f"refused the connection: {message}")
        with contextlib.suppress(OSError):
            self.stream.write(wire.encode_hello({"version": 0, "error": {"m": message, "h": hint, "x": code}}))

    def _handshake(self) -> bool:
        try:
            hello = wire.read_hello(self.stream, self.peer)
        except wire.ConnectionClosed as exc:
            if not exc.clean:
                log(f"the client left during the handshake: {exc.message}")
            return False
        except (wire.ProtocolError, OSError) as exc:
            self._hello_error(str(exc), "connect with `bunker` of a version that has `serve` (0.1 or later)")
            return False
        mine = (wire.VERSION_MIN, wire.VERSION_MAX)
        version = wire.choose_version(mine, (hello.vmin, hello.vmax))
        if not version:
            self._hello_error(
                f"the client speaks serve protocol versions {hello.vmin} to {hello.vmax}, this server "
                f"(bunker {__version__}) speaks {mine[0]} to {mine[1]}",
                "install the same bunker version on the client and on the server",
            )
            return False
        requested = hello.fields.get("repo")
        create = hello.fields.get("create") is True
        if requested is not None and (not isinstance(requested, str) or not requested or "\x00" in requested):
            self._hello_error("the client asked for a malformed repository path", "", ExitCode.USAGE)
            return False
        repo_dir = self.config.repo
        if self.config.node is not None:
            try:
                repo_dir = self.config.node.resolve(requested, create)
            except BunkerError as exc:
                self._hello_error(exc.message, exc.hint, exc.exit_code)
                return False
        elif requested is not None and os.path.realpath(requested) != os.path.realpath(self.config.repo):
            self._hello_error(
                f"this server serves only the repository {self.config.repo}, not {wire.text(requested, 500)}",
                f"use the repository path {self.config.repo} in the URL (the server's `serve --repo`, "
                "e.g. a forced command in authorized_keys, fixes it)",
                ExitCode.NO_REPOSITORY,
            )
            return False
        try:
            self.backend = LocalBackend(repo_dir, create=create and self.config.node is None)
        except BunkerError as exc:
            self._hello_error(exc.message, exc.hint, exc.exit_code)
            return False
        fields = {
            "version": version,
            "server": __version__,
            "repo": repo_dir,
            "append_only": self.config.append_only,
            "create_if_absent": True,
            "max_frame": wire.MAX_FRAME,
        }
        if self.config.node is not None:
            fields["node"] = self.config.node.name
        try:
            self.stream.write(wire.encode_hello(fields))
        except OSError:
            return False
        return True

    def _serve(self) -> int:
        pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="bunker-serve")
        slots = threading.BoundedSemaphore(MAX_INFLIGHT)
        budget = _Budget(MAX_INFLIGHT_BYTES)
        rc = 0
        try:
            while not self._broken:
                try:
                    length, rid, code, meta_len = wire.read_header(self.stream, wire.MAX_FRAME, self.peer)
                    if rid == 0:
                        raise wire.ProtocolError(f"{self.peer} sent a request with id 0 (reserved)", "")
                    slots.acquire()
                    budget.take(length)
                    try:
                        frame = wire.read_body(self.stream, rid, code, length, meta_len, self.peer)
                    except BaseException:
                        slots.release()
                        budget.give(length)
                        raise
                except wire.ConnectionClosed as exc:
                    if not exc.clean:
                        log(f"the client left in the middle of a request: {exc.message}")
                    break
                except wire.ProtocolError as exc:
                    log(f"closed the connection: {exc.message}")
                    self._reply(0, wire.PROTOCOL, {"m": exc.message})
                    rc = ExitCode.FATAL
                    break
                except OSError as exc:
                    log(f"the connection failed: {exc}")
                    break

                def done(_: object, n: int = length) -> None:
                    budget.give(n)
                    slots.release()

                pool.submit(self._handle, frame).add_done_callback(done)
        finally:
            pool.shutdown(wait=True)
        return rc

    def _reply(self, rid: int, status: int, meta: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        with self._wlock:
            if self._broken:
                return
            try:
                wire.write_frame(self.stream, rid, status, meta, payload)
            except OSError:
                self._broken = True  # the client is gone; the reader sees it too

    # ------------------------------------------------------------------ requests

    def _handle(self, frame: wire.Frame) -> None:
        try:
            status, meta, payload = self._dispatch(frame)
        except _Bad as exc:
            status, meta, payload = exc.status, {"m": exc.message, "h": exc.hint}, b""
            if exc.status == wire.REFUSED:
                log(exc.message)
        except ObjectMissing:
            status, meta, payload = wire.MISSING, {}, b""
        except InvalidName as exc:
            status, meta, payload = wire.INVALID, {"m": exc.message, "h": exc.hint}, b""
        except RepositoryFull as exc:
            status, meta, payload = wire.FAILED, {"m": exc.message, "h": exc.hint, "k": wire.KIND_FULL}, b""
            log(str(exc))
        except StorageRefused as exc:
            status, meta, payload = wire.FAILED, {"m": exc.message, "h": exc.fix, "k": wire.KIND_REFUSED}, b""
            log(str(exc))
        except BunkerError as exc:
            status, meta, payload = wire.FAILED, {"m": exc.message, "h": exc.hint}, b""
            log(str(exc))
        except Exception as exc:  # a bug must not take the server down: report it instead
            log("internal error:\n" + traceback.format_exc())
            status, meta = wire.FAILED, {"m": f"internal error in bunker serve: {type(exc).__name__}: {exc}"}
            meta["h"] = "this is a bug in bunker; please report it with the server's log"
            payload = b""
        self._reply(frame.rid, status, meta, payload)

    def _dispatch(self, f: wire.Frame) -> tuple[int, dict[str, Any], bytes | memoryview]:
        b = self.backend
        assert b is not None
        m = f.meta
        if f.code == wire.PUT:
            name = _object_name(_str(m, "n"), self.peer)
            if_absent = _bool(m, "x")
            node = self.config.node
            if node is not None and name in FIXED_NAMES:
                # a client of another build would rewrite RECOVERY.md and FORMAT.md with its own
                # text; a node's copies come with its seed (node/seeding.py): left as they are
                return wire.EXISTS, {}, b""
            if (
                node is not None
                and name.split("/", 1)[0] not in node.writable
                and not (name.startswith("clients/") and node.certificate_ok(b.root, bytes(f.payload)))
            ):
                if name.startswith("clients/"):
                    raise _Bad(
                        wire.REFUSED,
                        f"refused to store {name}: node {node.name} knows no certificate of this repository with "
                        "these bytes signed by its master key, so it cannot take backups from this put key",
                        "bring the node up to date with the repository of record (`bunker node forward` or "
                        "`bunker node import` on the node, or `bunker node seed` with a fresh seed file); if it "
                        "still refuses, the put key belongs to another repository",
                    )
                raise _Bad(wire.REFUSED, f"refused to store {name}: {node.refusal}", node.refusal_hint)
            if node is not None and name.startswith("packs/"):
                why = node.full(b.root)
                verdict = ("full", why) if why else self._pack_verdict(node, b.root, name, f.payload)
                if verdict is not None and verdict[0] == "refused":
                    raise _Bad(wire.REFUSED, verdict[1], "the client is broken or compromised: check its put key")
                if verdict is not None:
                    meta = {
                        "m": verdict[1],
                        "h": "this backup stays in your own spool and goes up later",
                        "k": wire.KIND_NODE_FULL,
                    }
                    return wire.FAILED, meta, b""
            if self.config.append_only:
                if is_hash_name(name) and content_hash(f.payload) != name.split("/", 1)[1]:
                    raise _Bad(
                        wire.REFUSED,
                        f"refused to store {name}: its bytes do not match its name",
                        "the client is broken or compromised: run `bunker check` on the client's data",
                    )
                if_absent = True  # never replace an object
            if node is not None and name.startswith("sessions/"):
                node.session_event(b.root, name.split("/", 1)[1].split(".", 1)[0])
            stored = b.put(name, f.payload, if_absent=if_absent)
            return (wire.OK if stored else wire.EXISTS), {}, b""
        if f.code == wire.GET:
            name = validate_name(_str(m, "n"))
            try:
                return self._get(b, name, _int(m, "o"), _opt_int(m, "l"))
            except ObjectMissing:
                node = self.config.node
                if node is None or name not in node.upstream_held(b.root):
                    raise
                if node.fetch is None:
                    return wire.MISSING, {"w": "upstream"}, b""
                data, why, route, gone = node.fetch(b.root, name)
                if data is None:
                    kind = "gone" if gone else "requested"
                    return wire.MISSING, {"w": kind, "node": node.name, "why": why, "route": route}, b""
                return self._get(b, name, _int(m, "o"), _opt_int(m, "l"))
        if f.code == wire.LIST:
            if _bool(m, "j"):
                strays = b.strays(validate_prefix(_str(m, "p")))
                return wire.OK, {"j": list(strays.shown), "jn": strays.count}, encoding.pack([])
            if _bool(m, "r"):
                node = self.config.node
                if node is None or node.requests is None:
                    raise _Bad(wire.INVALID, "this server is not a node: it requests nothing upstream")
                client = m.get("rl")
                if isinstance(client, str) and client and node.listing is not None:
                    node.listing(b.root, client)  # a listing request first (node/listing.py)
                return wire.OK, {"r": True}, encoding.pack(node.requests(b.root))
            if _bool(m, "l"):
                node = self.config.node
                if node is None or node.lease is None:
                    raise _Bad(wire.INVALID, "this server is not a node: it evicts nothing a restore could lease")
                lease: dict[str, Any] = {k: m[k] for k in ("ls", "li", "lt", "lr", "le", "ld") if k in m}
                return wire.OK, {"l": True}, encoding.pack(node.lease(b.root, lease))
            if _bool(m, "f"):
                node = self.config.node
                if node is None or node.report is None:
                    raise _Bad(wire.INVALID, "this server is not a node: it signs nothing for its clients")
                report: dict[str, Any] = {k: m[k] for k in ("fc", "fk", "fx", "fm", "fs") if k in m}
                return wire.OK, {"f": True}, encoding.pack(node.report(b.root, report))
            if _bool(m, "h"):
                node = self.config.node
                if node is None or node.statement is None:
                    raise _Bad(wire.INVALID, "this server is not a node: it keeps no witness statement")
                return wire.OK, {"h": True}, node.statement(b.root)
            return self._list(b, validate_prefix(_str(m, "p")), _str(m, "a", ""), _bool(m, "u"))
        if f.code == wire.DELETE:
            name = validate_name(_str(m, "n"))
            if self.config.node is not None and not name.startswith("sessions/"):
                node = self.config.node
                raise _Bad(wire.REFUSED, f"refused to delete {name}: {node.refusal}", node.refusal_hint)
            if self.config.append_only and not name.startswith("sessions/"):
                raise _Bad(
                    wire.REFUSED,
                    f"refused to delete {name}: this server is append-only (only sessions/ objects may be deleted)",
                    "deleting (prune, index merges) needs a server started without --append-only",
                )
            b.delete(name)
            if self.config.node is not None:
                self.config.node.session_event(b.root, name.split("/", 1)[1].split(".", 1)[0])
            return wire.OK, {}, b""
        if f.code == wire.STAT:
            name = validate_name(_str(m, "n"))
            info = b.stat(name)
            if info is None and self.config.node is not None:
                held = self.config.node.upstream_held(b.root).get(name)
                if held is not None:
                    return wire.OK, {"s": held.size, "t": held.mtime, "w": "upstream"}, b""
            if info is None:
                return wire.MISSING, {}, b""
            answer: dict[str, Any] = {"s": info.size, "t": info.mtime}
            if self.config.node is not None and self.config.node.recorded and name.startswith("snapshots/"):
                answer["r"] = self.config.node.recorded(b.root, name)  # older clients ignore it
            return wire.OK, answer, b""
        if f.code == wire.PING:
            return wire.OK, {}, b""
        raise _Bad(wire.INVALID, f"unknown request code {f.code}", "the client is newer than this server")

    def _pack_verdict(self, node: NodeRole, store: str, name: str, data: memoryview) -> tuple[str, str] | None:
        if node.pack_gate is None:
            return None
        with self._wlock:
            if self._gate is None:
                self._gate = node.pack_gate(store)
        return self._gate(name, data)

    def _get(self, b: LocalBackend, name: str, offset: int, length: int | None) -> tuple[int, dict[str, Any], bytes]:
        if length is not None and length < 0:
            raise _Bad(wire.INVALID, f"negative length {length} for {name}")
        if length is None or length > wire.MAX_PAYLOAD:
            # an answer must fit in one frame: look at the size before reading
            info = b.stat(name)
            if info is None:
                raise ObjectMissing(name)
            start = max(0, info.size + offset) if offset < 0 else min(offset, info.size)
            want = info.size - start if length is None else min(length, info.size - start)
            if want > wire.MAX_PAYLOAD:
                return wire.TOO_LARGE, {"s": info.size}, b""
        return wire.OK, {}, b.get(name, offset, length)

    def _list(
        self, b: LocalBackend, prefix: str, after: str, upstream_only: bool = False
    ) -> tuple[int, dict[str, Any], bytes]:
        held = self.config.node.upstream_held(b.root) if self.config.node is not None else {}
        # a node lists what it evicted under record receipts too: clients deduplicate against it
        here = {i.name: i for i in b.list(prefix)}
        # upstream only: what the node does not hold now (one fetched back for a restore is here)
        listed = {} if upstream_only else here
        for name, info in held.items():
            if name.startswith(prefix) and name not in here:
                listed[name] = info
        entries = sorted((i for i in listed.values() if i.name > after), key=lambda i: i.name)
        page = entries[: wire.LIST_PAGE]
        payload = encoding.pack([[i.name[len(prefix) :], i.size, i.mtime] for i in page])
        return wire.OK, {"more": len(entries) > len(page)}, payload


def _object_name(name: str, peer: str) -> str:
    """``name`` if it is an object name of the repository format, else an INVALID answer that
    names the format's prefixes (a client of another version learns what this server takes)."""
    try:
        return validate_name(name)
    except InvalidName as exc:
        log(f"refused a PUT from {peer}: {exc.message}")
        raise _Bad(
            wire.INVALID,
            f"{exc.message}; format version {FORMAT_VERSION} knows prefixes: {known_names()}",
            "the client writes names this server's bunker does not know: install the same bunker version on the "
            "client and the server; if it already runs it, the client is broken or compromised",
        ) from None


def _str(m: dict[str, Any], key: str, default: str | None = None) -> str:
    v = m.get(key, default)
    if not isinstance(v, str):
        raise _Bad(wire.INVALID, f"request field {key!r} is missing or not text")
    return v


def _int(m: dict[str, Any], key: str) -> int:
    v = m.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or abs(v) > 1 << 62:
        raise _Bad(wire.INVALID, f"request field {key!r} is not an integer in range")
    return v


def _opt_int(m: dict[str, Any], key: str) -> int | None:
    return None if m.get(key) is None else _int(m, key)


def _bool(m: dict[str, Any], key: str) -> bool:
    v = m.get(key, False)
    if not isinstance(v, bool):
        raise _Bad(wire.INVALID, f"request field {key!r} is not true or false")
    return v
