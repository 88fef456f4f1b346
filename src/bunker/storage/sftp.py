"""sftp backend: a repository in a directory on an ssh server, through asyncssh.

``sftp://[user@]host[:port]/absolute/path`` or ``sftp://[user@]host[:port]/~/path`` (below the
login directory).

- Login comes from the user's ssh setup (asyncssh's defaults): the keys of ssh-agent
  (SSH_AUTH_SOCK) and ~/.ssh/id_*, and ~/.ssh/config. BUNKER_SSH_IDENTITY names a private key
  file to use instead of ~/.ssh/id_* (the agent's keys still count). Trust comes from one file
  only, ~/.ssh/known_hosts or BUNKER_SSH_KNOWN_HOSTS, whatever ~/.ssh/config says (its
  UserKnownHostsFile none would turn asyncssh's checking off). An unknown (or changed) host key
  is refused with its fingerprint, that file, and the command to trust it.
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

This module is the Backend: the requests and what their failures mean. sftp_link.py reaches the
server (the URL, the ssh settings, host key refusals); sftp_channels.py runs the requests (the
event loop thread, a channel per thread, reconnects and retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import stat
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import asyncssh

from bunker.errors import BunkerError, ExitCode, ObjectMissing, StorageError
from bunker.storage.backend import PREFIXES, Backend, Capabilities, ObjectInfo
from bunker.storage.local import STALE_TEMP_SECONDS, TEMP_PREFIX
from bunker.storage.object_store import RetryPolicy
from bunker.storage.prefixes import WRITTEN
from bunker.storage.refused import StorageRefused
from bunker.storage.sftp_channels import ChannelPool, describe, is_transient
from bunker.storage.sftp_link import Connector, SftpLocation, parse_sftp_url

__all__ = ["SftpBackend", "SftpLocation", "open_sftp", "parse_sftp_url"]

T = TypeVar("T")

IO_PIECE = 4 << 20  # object bytes move in pieces of this size, each within 2 x BUNKER_STORAGE_TIMEOUT
_FILE_ATTRS = asyncssh.SFTPAttrs(permissions=0o600)
_DIR_ATTRS = asyncssh.SFTPAttrs(permissions=0o700)


_PENDING: set[asyncio.Future[None]] = set()  # background closes (a task needs a reference)


async def _close_quietly(f: asyncssh.SFTPClientFile, timeout: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(f.close(), timeout)


# ------------------------------------------------------------------------------------- backend


class SftpBackend(Backend):
    """A repository in a directory on an sftp server (see the module docstring)."""

    # what the first request does, in error messages (a link's mailbox opens a mailbox)
    OPENING = "open the repository"

    def __init__(self, loc: SftpLocation, *, create: bool = False, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.loc = loc
        self.url = loc.url
        self.endpoint = loc.where
        self._policy = RetryPolicy.from_env(env)
        self._pool = ChannelPool(Connector(loc, env, self._policy.timeout), self._policy)
        self._finalizer = weakref.finalize(self, self._pool.shutdown)
        self._hardlink = True
        self._sweep_started = False
        try:
            self._call(self.OPENING, "", lambda s: self._open(s, create))
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

    # ------------------------------------------------------------------ calls and their errors

    def _call(
        self, what: str, name: str, op: Callable[[asyncssh.SFTPClient], Coroutine[Any, Any, T]], *, io: bool = False
    ) -> T:
        """Run ``op`` on this thread's channel, with the pool's reconnects and retries (an ``io``
        operation bounds each of its steps itself, each IO_PIECE of a transfer); a failure that
        is no BunkerError yet becomes one naming the object and the next step."""
        where = self._what(what, name)
        try:
            return self._pool.call(where, op, io=io)
        except BunkerError:
            raise
        except Exception as exc:
            raise self._error(exc, where, writing=what in ("write", "delete")) from None

    def _what(self, what: str, name: str) -> str:
        return f"{what} {name} at {self.endpoint}" if name else f"{what} at {self.endpoint}"

    def _error(self, exc: BaseException, where: str, *, writing: bool = False) -> StorageError:
        """What a failed request (not a transient one) means, and what to do about it
        (``writing``: the request changes the repository)."""
        detail = describe(exc, self._policy.timeout)
        if isinstance(exc, asyncssh.SFTPPermissionDenied):
            return StorageRefused(
                f"could not {where}: permission denied",
                f"the login user may not read and write {self.loc.path} on the server: fix the directory's "
                "ownership or permissions, or use another --repo",
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
        if isinstance(exc, asyncssh.SFTPError) and writing:
            # the server answered, so it was reached: OpenSSH's sftp-server and internal-sftp
            # answer a read-only or full disk alike with SSH_FX_FAILURE "Failure" (SFTP v3 has no
            # status for either: storage/full.py, storage/refused.py). A backup keeps its data
            # in the spool and ends at err at once
            return StorageRefused(
                f"could not {where}: the server refused to store it ({detail!r})",
                f"check the free space and that the filesystem under {self.loc.path} on the server is writable "
                "(not mounted read-only) by the login user",
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
            for p in WRITTEN:  # a reserved prefix's directory comes with its first object
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
        tmp = posixpath.join(d, TEMP_PREFIX + os.urandom(8).hex())
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
                if not is_transient(exc) and not isinstance(exc, asyncio.CancelledError):
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
            if not done and not is_transient(exc) and not isinstance(exc, asyncio.CancelledError):
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
                fn += "/"  # never an object: listings leave it out, strays() reports it
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
            marker = self._path(TEMP_PREFIX + os.urandom(8).hex())
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
