"""sftp backend: a repository in a directory on an ssh server, through asyncssh.

``sftp://[user@]host[:port]/absolute/path`` or ``sftp://[user@]host[:port]/~/path`` (below the
login directory).

- Login and trust come from the user's ssh setup (asyncssh's defaults): the keys of ssh-agent
  (SSH_AUTH_SOCK) and ~/.ssh/id_*, ~/.ssh/config, and ~/.ssh/known_hosts. BUNKER_SSH_IDENTITY
  names a private key file to use instead of ~/.ssh/id_* (the agent's keys still count),
  BUNKER_SSH_KNOWN_HOSTS another known_hosts file. An
  unknown (or changed) host key is refused with its fingerprint and the command to trust it.
- A put writes ``<dir>/.tmp-<random>``, fsyncs it on the server (fsync@openssh.com), then
  renames it over the final name (posix-rename@openssh.com): a reader sees the old object or the
  new one, never half of one. Create-if-absent hard-links the temp file to the final name
  (hardlink@openssh.com: fails when the name exists) and removes the temp file. sftp has no way
  to fsync a directory: after a crash of the *server* a renamed object may be missing (never
  torn), which `bunker check` reports.
- Temp files of killed writers older than an hour (by the server's clock) are swept in the
  background once the backend has stored its first object (readers, such as restore workers,
  never list the whole repository for it).
- The backend interface is synchronous and used from several threads (and worker processes,
  which reopen ``url``). The backend owns an asyncio event loop in a background thread; each
  calling thread gets its own SFTP channel (a channel is never shared by two threads), opened on
  one SSH connection per CHANNELS_PER_CONNECTION channels (OpenSSH allows 10 sessions per
  connection).
- Transient failures (dropped connection, refused or timed-out connect, a request that does not
  answer within BUNKER_STORAGE_TIMEOUT; object bytes move in IO_PIECE pieces, each allowed twice
  that) drop the connection, reconnect and retry with exponential backoff and jitter,
  BUNKER_STORAGE_RETRIES times (the S3 backend's settings). What still fails becomes a
  StorageError naming the object, the host and the directory, and the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import posixpath
import random
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import asyncssh

from bunker.errors import BunkerError, ExitCode, ObjectMissing, StorageError
from bunker.storage.backend import PREFIXES, Backend, Capabilities, ObjectInfo
from bunker.storage.local import STALE_TEMP_SECONDS, TEMP_PREFIX
from bunker.storage.object_store import MAX_RETRY_DELAY, RetryPolicy

T = TypeVar("T")

DEFAULT_PORT = 22
CHANNELS_PER_CONNECTION = 8  # below OpenSSH's default MaxSessions (10)
KEEPALIVE_SECONDS = 30.0
IO_PIECE = 4 << 20  # object bytes move in pieces of this size, each within 2 x BUNKER_STORAGE_TIMEOUT
IDENTITY_VAR = "BUNKER_SSH_IDENTITY"
KNOWN_HOSTS_VAR = "BUNKER_SSH_KNOWN_HOSTS"
_FILE_ATTRS = asyncssh.SFTPAttrs(permissions=0o600)
_DIR_ATTRS = asyncssh.SFTPAttrs(permissions=0o700)
_URL_HINT = (
    "write it as sftp://USER@HOST:PORT/ABSOLUTE/PATH, or sftp://USER@HOST/~/PATH for a directory below "
    "the login directory"
)

LOOP_THREAD = "bunker-sftp"

# asyncssh logs every connection at INFO; bunker reports failures itself
logging.getLogger("asyncssh").setLevel(logging.WARNING)


class _QuietLostConnections(logging.Filter):
    """asyncio warns once per write into a connection that died under a running upload (e.g.
    "socket.send() raised exception."); the backend reports and retries that itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != LOOP_THREAD or record.levelno > logging.WARNING


logging.getLogger("asyncio").addFilter(_QuietLostConnections())


def _usage(message: str, hint: str = _URL_HINT) -> BunkerError:
    return BunkerError(message, hint, exit_code=ExitCode.USAGE)


# ------------------------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class SftpLocation:
    """A parsed ``sftp://`` repository URL. ``path`` is absolute, or relative to the login
    directory (``.`` for the login directory itself); ``user`` and ``port`` are None when the
    URL does not give them (then ~/.ssh/config or the defaults apply)."""

    host: str
    port: int | None
    user: str | None
    path: str

    @property
    def url(self) -> str:
        """The canonical URL: what error messages show and worker processes reopen."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = quote(self.user, safe="") + "@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        path = self.path if self.path.startswith("/") else "/~" + ("" if self.path == "." else "/" + self.path)
        return f"sftp://{user}{host}{port}{quote(path, safe='/~')}"

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port is not None else host

    @property
    def where(self) -> str:
        """How error messages name the place: ``sftp server HOST:PORT, directory PATH``."""
        path = self.path if self.path.startswith("/") else "~/" + ("" if self.path == "." else self.path)
        return f"sftp server {self.host_port}, directory {path}"

    def ssh_command(self) -> str:
        """The ssh command line that tests the same login."""
        port = f"-p {self.port} " if self.port is not None and self.port != DEFAULT_PORT else ""
        user = f"{self.user}@" if self.user else ""
        return f"ssh {port}{user}{self.host}"


def parse_sftp_url(url: str) -> SftpLocation:
    """Parse ``sftp://[user@]host[:port]/path``: ``/path`` is absolute, ``/~/path`` below the
    login directory."""
    parts = urlsplit(url)
    if parts.scheme != "sftp":
        raise _usage(f"{url!r} is not an sftp:// URL")
    if parts.password is not None:
        raise _usage(
            "a password does not belong in the repository URL",
            "remove it: bunker logs in with your ssh keys (ssh-agent, ~/.ssh/id_*, or BUNKER_SSH_IDENTITY)",
        )
    if parts.query or parts.fragment:
        raise _usage(f"sftp:// URLs take no parameters ({url!r})")
    host = parts.hostname or ""
    if not host or any(c.isspace() or ord(c) < 32 or c in "/\\" for c in host):
        raise _usage(f"{url!r} names no usable host")
    try:
        port = parts.port
    except ValueError:
        raise _usage(f"the port of {url!r} is not a number from 1 to 65535") from None
    if port == 0:
        raise _usage(f"the port of {url!r} is not a number from 1 to 65535")
    user = unquote(parts.username) if parts.username else None
    raw = unquote(parts.path)
    segments = [s for s in raw.split("/") if s]
    relative = bool(segments) and segments[0] == "~"
    if relative:
        segments = segments[1:]
    for s in segments:
        if s in (".", "..", "~") or any(ord(c) < 32 or c == "\\" for c in s):
            raise _usage(f"the path {parts.path!r} of {url!r} is not usable", "use plain names separated by /")
    if relative:
        path = "/".join(segments) or "."
    else:
        if not segments:
            raise _usage(f"{url!r} names no directory for the repository")
        path = "/" + "/".join(segments)
    return SftpLocation(host, port, user, path)


# ----------------------------------------------------------------------------- connections, loop


class _Link:
    """One SSH connection and how many SFTP channels it carries (touched on the loop only)."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.channels = 0
        self.full = False  # the server refused one more channel on it
        self.lost = False


@dataclass(eq=False)
class _Channel:
    sftp: asyncssh.SFTPClient
    link: _Link


class _HostKeySeen:
    """What the server presented when its host key was not trusted."""

    def __init__(self) -> None:
        self.key: asyncssh.SSHKey | None = None
        self.host = ""
        self.addr = ""
        self.port = DEFAULT_PORT


class _Client(asyncssh.SSHClient):
    def __init__(self, seen: _HostKeySeen) -> None:
        self._seen = seen
        self.link: _Link | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # called only for a key that known_hosts does not trust: remember it for the message
        self._seen.key, self._seen.host, self._seen.addr, self._seen.port = key, host, addr, port
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.lost = True


class _Connector:
    """Opens SSH connections for one location with the user's ssh settings."""

    def __init__(self, loc: SftpLocation, env: Mapping[str, str], timeout: float) -> None:
        self.loc = loc
        self.timeout = timeout
        self.identity = env.get(IDENTITY_VAR) or None
        self.known_hosts = env.get(KNOWN_HOSTS_VAR) or None
        for var, path in ((IDENTITY_VAR, self.identity), (KNOWN_HOSTS_VAR, self.known_hosts)):
            if path is not None and not os.access(path, os.R_OK):
                raise BunkerError(
                    f"{var}={path} is not a readable file",
                    f"point {var} at an existing file, or unset it to use the defaults in ~/.ssh",
                    exit_code=ExitCode.USAGE,
                )

    @property
    def known_hosts_file(self) -> str:
        return self.known_hosts or os.path.join(os.path.expanduser("~"), ".ssh", "known_hosts")

    async def connect(self) -> _Link:
        seen = _HostKeySeen()
        clients: list[_Client] = []

        def factory() -> _Client:
            client = _Client(seen)
            clients.append(client)
            return client

        kw: dict[str, Any] = {
            "known_hosts": self.known_hosts if self.known_hosts else (),
            "client_keys": [self.identity] if self.identity else (),
            "connect_timeout": self.timeout,
            "keepalive_interval": KEEPALIVE_SECONDS,
            "keepalive_count_max": 3,
            # never fall back to a password or keyboard prompt: bunker runs unattended
            "preferred_auth": "gssapi-keyex,gssapi-with-mic,hostbased,publickey",
            "client_factory": factory,
        }
        if self.loc.user:
            kw["username"] = self.loc.user
        port: Any = self.loc.port if self.loc.port is not None else ()
        try:
            conn = await asyncssh.connect(self.loc.host, port, **kw)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._host_key_error(seen, exc) from None
        except asyncssh.PermissionDenied as exc:
            raise StorageError(
                f"the ssh server {self.loc.host_port} refused the login ({exc})",
                "bunker logs in with the keys of your ssh-agent (SSH_AUTH_SOCK), ~/.ssh/id_* and BUNKER_SSH_IDENTITY; "
                f"add the public key to ~/.ssh/authorized_keys of the user on the server and check that "
                f"`{self.loc.ssh_command()}` logs in without a password",
                exit_code=ExitCode.FATAL,
            ) from None
        except asyncssh.KeyImportError as exc:
            raise StorageError(
                f"cannot use the ssh key {self.identity or '(from ~/.ssh)'}: {exc}",
                "use a key without a passphrase in BUNKER_SSH_IDENTITY, or load the key into ssh-agent "
                "(`ssh-add FILE`)",
                exit_code=ExitCode.FATAL,
            ) from None
        link = _Link(conn)
        for client in clients:
            client.link = link
        return link

    def _host_key_error(self, seen: _HostKeySeen, exc: Exception) -> StorageError:
        kh = self.known_hosts_file
        if seen.key is None:
            return StorageError(
                f"refused to connect to the ssh server {self.loc.host_port}: {exc}",
                f"check the server's host key and the entries for it in {kh}",
                exit_code=ExitCode.FATAL,
            )
        port = seen.port or DEFAULT_PORT
        fingerprint = seen.key.get_fingerprint("sha256")
        alg = seen.key.get_algorithm()
        kind = alg.removeprefix("ssh-").split("-", 1)[0]
        host = seen.host or self.loc.host  # after ~/.ssh/config's HostName: what known_hosts must name
        keyscan = f"ssh-keyscan {'-p ' + str(port) + ' ' if port != DEFAULT_PORT else ''}{host} >> {kh}"
        entry = f"[{host}]:{port}" if port != DEFAULT_PORT else host
        known = False
        with contextlib.suppress(Exception):
            if os.path.isfile(kh):
                known = bool(asyncssh.match_known_hosts(kh, seen.host, seen.addr, port)[0])
        check = (
            f"(on the server: `ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub`)"
            if kind in ("ed25519", "rsa", "ecdsa")
            else ""
        )
        if known:
            return StorageError(
                f"refused to connect to the ssh server {self.loc.host_port}: its host key changed. It now presents "
                f"the {alg} key {fingerprint}, which does not match the key recorded in {kh}. Someone may be "
                "intercepting the connection, or the server was reinstalled",
                f"ask the server's administrator for its key's fingerprint {check}; only if it is {fingerprint}, "
                f"remove the old entry with `ssh-keygen -R '{entry}' -f {kh}` and trust the new key with `{keyscan}`",
                exit_code=ExitCode.FATAL,
            )
        return StorageError(
            f"refused to connect to the ssh server {self.loc.host_port}: its host key is unknown (not in {kh}). "
            f"The server presents the {alg} key {fingerprint}",
            f"make sure that this is the server's key {check}, then trust it with `{keyscan}` "
            "and run the command again",
            exit_code=ExitCode.FATAL,
        )


class _Pool:
    """The event loop thread, the SSH connections and one SFTP channel per calling thread."""

    def __init__(self, connector: _Connector) -> None:
        self._connector = connector
        self.loop = asyncio.new_event_loop()
        self._links: list[_Link] = []  # loop only
        self._alock: asyncio.Lock | None = None  # loop only
        self._channels: dict[threading.Thread, _Channel] = {}
        self._lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=LOOP_THREAD, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the loop, bounded by ``timeout`` seconds (None: ``coro`` bounds its own
        steps), and return its result."""
        if self.closed:
            coro.close()
            raise BunkerError("the sftp connection was closed", "this is a bug in bunker; please report it")
        bounded = coro if timeout is None else asyncio.wait_for(coro, timeout)
        return asyncio.run_coroutine_threadsafe(bounded, self.loop).result()

    def channel(self, timeout: float) -> _Channel:
        """The calling thread's channel, opened (and a connection made) when needed."""
        me = threading.current_thread()
        with self._lock:
            chan = self._channels.get(me)
            if chan is not None and not chan.link.lost:
                return chan
            gone = [t for t in self._channels if t is me or not t.is_alive()]
            released = [self._channels.pop(t) for t in gone]
        for c in released:
            self._later(self._close_channel, c)
        chan = self.run(self._open_channel(), timeout)
        with self._lock:
            if self.closed:
                self._later(self._close_channel, chan)
            else:
                self._channels[me] = chan
        return chan

    def _later(self, fn: Callable[[_Channel], None], chan: _Channel) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self.loop.call_soon_threadsafe(fn, chan)

    def discard(self, chan: _Channel, broken: bool) -> None:
        """Stop using ``chan`` (after an error); ``broken``: its connection does not answer."""
        with self._lock:
            for t, c in list(self._channels.items()):
                if c is chan:
                    del self._channels[t]
        if broken:
            chan.link.lost = True
        self._later(self._close_channel, chan)

    async def _open_channel(self) -> _Channel:
        if self._alock is None:
            self._alock = asyncio.Lock()
        for _ in range(3):
            async with self._alock:
                for dead in [lk for lk in self._links if lk.lost]:
                    self._links.remove(dead)
                    dead.conn.close()
                link = next((lk for lk in self._links if not lk.full and lk.channels < CHANNELS_PER_CONNECTION), None)
                if link is None:
                    link = await self._connector.connect()
                    self._links.append(link)
                link.channels += 1
            try:
                sftp = await link.conn.start_sftp_client(path_errors="surrogateescape")
            except asyncssh.ChannelOpenError as exc:
                link.channels -= 1
                if link.lost:
                    raise  # the connection dropped meanwhile: retried
                if link.channels > 0:
                    link.full = True  # the server allows fewer channels per connection: open another one
                    continue
                if exc.code == asyncssh.OPEN_REQUEST_SESSION_FAILED:  # the sftp subsystem was refused
                    raise StorageError(
                        f"the ssh server {self._connector.loc.host_port} offers no sftp ({exc.reason})",
                        "enable it in the server's sshd_config (`Subsystem sftp internal-sftp`), or ask the "
                        "server's administrator",
                        exit_code=ExitCode.FATAL,
                    ) from None
                raise
            except BaseException:
                link.channels -= 1
                raise
            return _Channel(sftp, link)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no more sftp sessions")

    def _close_channel(self, chan: _Channel) -> None:
        chan.link.channels -= 1
        with contextlib.suppress(Exception):
            chan.sftp.exit()
        if chan.link.lost or (chan.link.full and chan.link.channels == 0):
            with contextlib.suppress(Exception):
                chan.link.conn.close()
            chan.link.lost = True

    def shutdown(self) -> None:
        """Close every channel and connection and stop the loop (idempotent)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._channels.clear()
        if not self.thread.is_alive():
            return
        if threading.current_thread() is self.thread:
            self.loop.call_soon(self.loop.stop)
            return

        async def close_all() -> None:
            me = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not me:
                    task.cancel()  # callers waiting on a request get an error, not a hang
            for link in self._links:
                link.conn.close()
            waits = [link.conn.wait_closed() for link in self._links]
            if waits:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


# -------------------------------------------------------------------------------------- errors

_PERMANENT = (
    asyncssh.HostKeyNotVerifiable,
    asyncssh.PermissionDenied,
    asyncssh.IllegalUserName,
    asyncssh.KeyExchangeFailed,
    asyncssh.ProtocolNotSupported,
    asyncssh.ServiceNotAvailable,
    asyncssh.KeyImportError,
)


def _is_transient(exc: BaseException) -> bool:
    """A failure that a new connection may cure: dropped or refused connections, timeouts."""
    if isinstance(exc, asyncssh.SFTPConnectionLost | asyncssh.SFTPNoConnection):
        return True
    if isinstance(exc, (asyncssh.SFTPError, *_PERMANENT)):
        return False
    return isinstance(exc, asyncssh.DisconnectError | asyncssh.ChannelOpenError | OSError | TimeoutError | EOFError)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not exc.args:
        return f"no answer in time (BUNKER_STORAGE_TIMEOUT is {timeout:g} s)"
    if isinstance(exc, OSError) and exc.errno:
        return f"{os.strerror(exc.errno)} ({exc.strerror or exc})"
    if isinstance(exc, asyncssh.SFTPError):
        return str(exc.reason or type(exc).__name__)
    if isinstance(exc, asyncssh.Error):
        return str(exc.reason or type(exc).__name__)
    return str(exc) or type(exc).__name__


_PENDING: set[asyncio.Future[None]] = set()  # background closes (a task needs a reference)


async def _close_quietly(f: asyncssh.SFTPClientFile, timeout: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(f.close(), timeout)


# ------------------------------------------------------------------------------------- backend


class SftpBackend(Backend):
    """A repository in a directory on an sftp server (see the module docstring)."""

    def __init__(self, loc: SftpLocation, *, create: bool = False, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.loc = loc
        self.url = loc.url
        self.endpoint = loc.where
        self._policy = RetryPolicy.from_env(env)
        self._pool = _Pool(_Connector(loc, env, self._policy.timeout))
        self._finalizer = weakref.finalize(self, self._pool.shutdown)
        self._hardlink = True
        self._sweep_started = False
        try:
            self._call("open the repository", "", lambda s: self._open(s, create))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the interface

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        view = memoryview(data).cast("B")
        leftovers: list[str] = []
        stored = self._call("write", name, lambda s: self._put_async(s, name, view, if_absent, leftovers), io=True)
        if stored:
            self._start_sweep(name)
        return stored

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        return self._call("read", name, lambda s: self._get_async(s, name, offset, length), io=True)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        yield from self._call("list", prefix, lambda s: self._list_async(s, prefix))

    def _delete(self, name: str) -> None:
        self._call("delete", name, lambda s: self._delete_async(s, name))

    def _stat(self, name: str) -> ObjectInfo | None:
        return self._call("stat", name, lambda s: self._stat_async(s, name))

    def capabilities(self) -> Capabilities:
        return Capabilities(
            create_if_absent=self._hardlink, server_side_time=True, range_merge_gap=1 << 20, remote=True
        )

    def close(self) -> None:
        """Close the SFTP channels and SSH connections, and stop the event loop thread."""
        self._finalizer()

    def sweep_temp_files(self, older_than: float = STALE_TEMP_SECONDS, *, fresh: str | None = None) -> int:
        """Remove temp files of killed writers older than ``older_than`` seconds by the server's
        clock: the time of ``fresh``, an object just written, or else of a marker file."""
        return self._call(
            "remove stale temporary files in", "the repository", lambda s: self._sweep(s, older_than, fresh)
        )

    # ------------------------------------------------------------------ retries and errors

    def _call(
        self, what: str, name: str, op: Callable[[asyncssh.SFTPClient], Coroutine[Any, Any, T]], *, io: bool = False
    ) -> T:
        """Run ``op`` on this thread's channel; reconnect and retry transient failures. An ``io``
        operation bounds each of its steps itself (a transfer: each IO_PIECE), others are bounded
        by BUNKER_STORAGE_TIMEOUT as a whole."""
        timeout = None if io else self._policy.timeout
        attempt = 0
        while True:
            chan: _Channel | None = None
            try:
                chan = self._pool.channel(self._policy.timeout)
                return self._pool.run(op(chan.sftp), timeout)
            except BunkerError:
                raise
            except Exception as exc:
                transient = _is_transient(exc)
                if chan is not None and (transient or isinstance(exc, concurrent.futures.CancelledError)):
                    self._pool.discard(chan, broken=isinstance(exc, TimeoutError))
                if not transient:
                    raise self._error(exc, what, name) from None
                if attempt >= self._policy.retries:
                    raise self._unreachable(exc, what, name) from None
                time.sleep(self._delay(attempt))
                attempt += 1

    def _delay(self, attempt: int) -> float:
        first = self._policy.first_delay
        return min(first * 2.0**attempt, max(first, MAX_RETRY_DELAY)) * (1.0 + random.random())

    def _what(self, what: str, name: str) -> str:
        return f"{what} {name} at {self.endpoint}" if name else f"{what} at {self.endpoint}"

    def _unreachable(self, exc: BaseException, what: str, name: str) -> StorageError:
        tries = f"also after {self._policy.retries} retries" if self._policy.retries else "and retries are off"
        return StorageError(
            f"could not {self._what(what, name)}: the server did not answer or the connection kept dropping "
            f"({_describe(exc, self._policy.timeout)}), {tries}",
            f"check that the server is up and reachable (`{self.loc.ssh_command()}` should log in) and the network, "
            "then run the command again; BUNKER_STORAGE_RETRIES and BUNKER_STORAGE_RETRY_DELAY set how long bunker "
            "keeps retrying",
            exit_code=ExitCode.NO_REPOSITORY,
        )

    def _error(self, exc: BaseException, what: str, name: str) -> StorageError:
        detail = _describe(exc, self._policy.timeout)
        where = self._what(what, name)
        if isinstance(exc, asyncssh.SFTPPermissionDenied):
            return StorageError(
                f"could not {where}: permission denied",
                f"the login user may not read and write {self.loc.path} on the server: fix the directory's "
                "ownership or permissions, or use another --repo",
                exit_code=ExitCode.FATAL,
            )
        if isinstance(exc, asyncssh.SFTPOpUnsupported):
            return StorageError(
                f"could not {where}: the sftp server does not support a request bunker needs ({detail})",
                "bunker needs an OpenSSH sftp server (fsync@openssh.com and posix-rename@openssh.com for atomic, "
                "durable writes); use one, or another kind of repository",
                exit_code=ExitCode.FATAL,
            )
        if isinstance(exc, asyncssh.SFTPNoSuchFile):
            return StorageError(
                f"could not {where}: the repository's directory is gone ({detail})",
                "check the path in --repo / BUNKER_REPO and the server's disk",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        if isinstance(exc, asyncssh.SFTPError):
            return StorageError(
                f"could not {where}: the server answered {detail!r}",
                f"check the free space and the permissions under {self.loc.path} on the server, then run the "
                "command again",
                exit_code=ExitCode.FATAL,
            )
        return StorageError(
            f"could not {where}: {detail}",
            f"check the repository URL and that `{self.loc.ssh_command()}` works, then run the command again",
            exit_code=ExitCode.FATAL,
        )

    # ------------------------------------------------------------------ the requests

    def _path(self, name: str) -> str:
        return posixpath.join(self.loc.path, name)

    async def _open(self, sftp: asyncssh.SFTPClient, create: bool) -> None:
        # hardlink@openssh.com makes create-if-absent atomic; without it, a stat then a rename
        handler = getattr(sftp, "_handler", None)
        if getattr(handler, "_supports_hardlink", True) is False and getattr(handler, "_version", 3) < 6:
            self._hardlink = False
        root = self.loc.path
        if create:
            await sftp.makedirs(root, _DIR_ATTRS, exist_ok=True)
            for p in PREFIXES:
                try:
                    await sftp.mkdir(posixpath.join(root, p), _DIR_ATTRS)
                except (asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists):
                    if not await sftp.isdir(posixpath.join(root, p)):
                        raise
            return
        try:
            attrs = await sftp.stat(root)
        except asyncssh.SFTPNoSuchFile:
            attrs = None
        if attrs is None or attrs.permissions is None or not stat.S_ISDIR(attrs.permissions):
            problem = "does not exist" if attrs is None else "is no directory"
            raise BunkerError(
                f"no repository at {self.url} ({self.endpoint} {problem})",
                "check the path given with --repo or BUNKER_REPO, or create one with `bunker init`",
                exit_code=ExitCode.NO_REPOSITORY,
            )

    async def _step(self, aw: Awaitable[T], io: bool = False) -> T:
        """One request, bounded by BUNKER_STORAGE_TIMEOUT (twice that for moving object bytes)."""
        return await asyncio.wait_for(aw, self._policy.timeout * (2 if io else 1))

    async def _put_async(
        self, sftp: asyncssh.SFTPClient, name: str, data: memoryview, if_absent: bool, leftovers: list[str]
    ) -> bool:
        for old in leftovers:  # the temp file of an attempt whose connection dropped
            with contextlib.suppress(asyncssh.SFTPError):
                await self._step(sftp.remove(old))
        leftovers.clear()
        final = self._path(name)
        d = posixpath.dirname(final)
        tmp = posixpath.join(d, TEMP_PREFIX + secrets.token_hex(8))
        leftovers.append(tmp)
        try:
            f = await self._step(sftp.open(tmp, "xb", _FILE_ATTRS))
        except asyncssh.SFTPNoSuchFile:
            # a prefix directory made by nobody yet
            await self._step(sftp.makedirs(d, _DIR_ATTRS, exist_ok=True))
            f = await self._step(sftp.open(tmp, "xb", _FILE_ATTRS))
        done = False
        try:
            try:
                # in pieces, each bounded in time: a slow link is no stalled one
                for start in range(0, len(data), IO_PIECE):
                    piece = data[start : start + IO_PIECE]
                    await self._step(f.write(piece, start), io=True)  # type: ignore[type-var]  # any buffer works
                await self._step(f.fsync(), io=True)
            except BaseException as exc:
                if not _is_transient(exc) and not isinstance(exc, asyncio.CancelledError):
                    await _close_quietly(f, self._policy.timeout)
                raise
            await _close_quietly(f, self._policy.timeout)
            if not if_absent:
                await self._step(sftp.posix_rename(tmp, final))
                done = True
                return True
            created = await self._create_if_absent(sftp, tmp, final)
            done = True
            if not created or self._hardlink:
                # the temp file is no object: one left behind (connection lost here) is swept later
                with contextlib.suppress(asyncssh.SFTPError, TimeoutError):
                    await self._step(sftp.remove(tmp))
            return created
        except BaseException as exc:
            # after a dropped or stalled connection, the next attempt removes the temp file
            if not done and not _is_transient(exc) and not isinstance(exc, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await self._step(sftp.remove(tmp))
            raise
        finally:
            if done:
                leftovers.clear()

    async def _create_if_absent(self, sftp: asyncssh.SFTPClient, tmp: str, final: str) -> bool:
        """Give the written temp file the final name unless that exists. With hardlink@openssh.com
        atomic (link() fails on an existing name; a retried link whose first try landed reports
        "exists", which is true with the same bytes); else a stat, then a rename."""
        if self._hardlink:
            try:
                await self._step(sftp.link(tmp, final))
                return True
            except asyncssh.SFTPOpUnsupported:
                self._hardlink = False
            except asyncssh.SFTPFailure:
                if await self._step(sftp.exists(final)):
                    return False
                raise
        if await self._step(sftp.exists(final)):
            return False
        await self._step(sftp.posix_rename(tmp, final))
        return True

    async def _get_async(self, sftp: asyncssh.SFTPClient, name: str, offset: int, length: int | None) -> bytes:
        if length is not None and length < 0:
            length = None
        try:
            f = await self._step(sftp.open(self._path(name), "rb"))
        except asyncssh.SFTPNoSuchFile:
            raise ObjectMissing(name) from None
        try:
            size = 0
            if offset < 0 or length is None:
                size = (await self._step(f.stat())).size or 0
            # LocalBackend's semantics: a negative offset counts from the end, and one reaching
            # before the start gives the whole object; a range past the end is cut at the end
            if offset < 0:
                pos = size + offset
                if pos < 0:
                    pos, length = 0, None
            else:
                pos = offset
            n = size - pos if length is None else length
            parts: list[bytes] = []
            while n > 0:  # in pieces, each bounded in time
                want = min(n, IO_PIECE)
                piece: bytes = await self._step(f.read(want, pos), io=True)
                parts.append(piece)
                pos, n = pos + len(piece), n - len(piece)
                if len(piece) < want:
                    break  # the end of the object
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            # nothing depends on the close's answer: do not wait a round trip for it
            task = asyncio.ensure_future(_close_quietly(f, self._policy.timeout))
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)

    async def _list_async(self, sftp: asyncssh.SFTPClient, prefix: str) -> list[ObjectInfo]:
        try:
            entries = await sftp.readdir(self._path(prefix.rstrip("/")))
        except asyncssh.SFTPNoSuchFile:
            return []
        out = []
        for e in entries:
            fn = e.filename if isinstance(e.filename, str) else os.fsdecode(e.filename)
            if fn.startswith("."):
                continue  # ".", "..", temp files
            a = e.attrs
            if a.permissions is not None and stat.S_ISDIR(a.permissions):
                continue
            out.append(ObjectInfo(prefix + fn, a.size or 0, float(a.mtime or 0)))
        return out

    async def _delete_async(self, sftp: asyncssh.SFTPClient, name: str) -> None:
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await sftp.remove(self._path(name))

    async def _stat_async(self, sftp: asyncssh.SFTPClient, name: str) -> ObjectInfo | None:
        try:
            a = await sftp.stat(self._path(name))
        except asyncssh.SFTPNoSuchFile:
            return None
        return ObjectInfo(name, a.size or 0, float(a.mtime or 0))

    async def _sweep(self, sftp: asyncssh.SFTPClient, older_than: float, fresh: str | None) -> int:
        # the server's clock, from a fresh file's time: never judge server times by this machine's
        now: float | None = None
        if fresh is not None:
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                now = (await sftp.stat(self._path(fresh))).mtime
        if now is None:
            marker = self._path(TEMP_PREFIX + secrets.token_hex(8))
            f = await sftp.open(marker, "xb", _FILE_ATTRS)
            await f.close()
            try:
                now = (await sftp.stat(marker)).mtime
            finally:
                await sftp.remove(marker)
        if now is None:
            return 0
        removed = 0
        for d in ("", *PREFIXES):
            directory = self._path(d) if d else self.loc.path
            try:
                entries = await sftp.readdir(directory)
            except asyncssh.SFTPError:
                continue
            for e in entries:
                fn = e.filename if isinstance(e.filename, str) else os.fsdecode(e.filename)
                if fn.startswith(TEMP_PREFIX) and e.attrs.mtime is not None and now - e.attrs.mtime > older_than:
                    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                        await sftp.remove(posixpath.join(directory, fn))
                        removed += 1
        return removed

    def _start_sweep(self, fresh: str) -> None:
        """Sweep stale temp files once, in the background, after this backend first stored an
        object (``fresh``, whose time is the server's "now"); it writes nothing itself."""
        if self._sweep_started:
            return
        self._sweep_started = True

        def sweep() -> None:
            with contextlib.suppress(Exception):
                self.sweep_temp_files(fresh=fresh)

        threading.Thread(target=sweep, name="bunker-sftp-sweep", daemon=True).start()


def open_sftp(url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> SftpBackend:
    """The backend for an ``sftp://`` URL; ``create`` makes the directory and its prefix
    directories (mkdir -p)."""
    return SftpBackend(parse_sftp_url(url), create=create, env=env)
