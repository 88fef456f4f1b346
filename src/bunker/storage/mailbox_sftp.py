"""A link's mailbox in a folder on an sftp server (storage/mailbox.py).

The connection is the repository's sftp backend's (storage/sftp.py: logins, host keys, a channel
per thread, reconnects and retries with BUNKER_STORAGE_*, what a failure means), subclassed to
open a folder instead of a repository (no prefix folders made) and to name the mailbox in its
errors; the requests are the mailbox's own:

- put: a temp file (a dot and 64 random hex digits) opened with O_EXCL, written in IO_PIECE
  pieces read from the local file (the piece is never whole in memory), fsynced on the server
  (fsync@openssh.com), renamed over the name (posix-rename@openssh.com). A retry after a dropped
  connection starts again and removes the earlier attempt's temp file. Temp files of killed
  writers older than STALE_TEMP_SECONDS (by the server's clock) are swept after the first put.
- fetch: IO_PIECE range reads written to a local temp file as they come.
- listings and stat use lstat (OpenSSH's readdir reports lstat attributes): a symlink or
  anything else that is not a regular file is a stray. The server follows symlinks when it opens
  a file, so a symlink swapped in between the lstat and the open is read with the login user's
  rights (nothing the login user could not read anyway).
- free_space asks statvfs@openssh.com where the server offers it: sftp cannot tell a full disk
  from other failures ("Failure"), so a put checks the room first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Mapping

import asyncssh

from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.storage.backend import ObjectInfo
from bunker.storage.local import STALE_TEMP_SECONDS
from bunker.storage.mailbox import (
    Entry,
    Mailbox,
    NotAPiece,
    PieceMissing,
    is_temp_name,
    mailbox_full,
    read_source,
    temp_name,
    write_atomically,
)
from bunker.storage.refused import StorageRefused
from bunker.storage.sftp import IO_PIECE, SftpBackend
from bunker.storage.sftp_channels import is_transient
from bunker.storage.sftp_link import parse_sftp_url

__all__ = ["SftpMailbox"]

_FILE_ATTRS = asyncssh.SFTPAttrs(permissions=0o600)
_DIR_ATTRS = asyncssh.SFTPAttrs(permissions=0o700)
_PENDING: set[asyncio.Future[None]] = set()  # background closes (a task needs a reference)


def _name(e: asyncssh.SFTPName) -> str:
    return e.filename if isinstance(e.filename, str) else os.fsdecode(e.filename)


def _regular(a: asyncssh.SFTPAttrs) -> bool:
    return a.permissions is not None and stat.S_ISREG(a.permissions)


def _kind(a: asyncssh.SFTPAttrs) -> str:
    mode = a.permissions or 0
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _pread(fd: int, n: int, offset: int) -> bytes:
    return os.pread(fd, n, offset)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


async def _close_quietly(f: asyncssh.SFTPClientFile, timeout: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(f.close(), timeout)


class _Connection(SftpBackend):
    """The sftp backend's connection to the mailbox's folder, with the mailbox's requests."""

    OPENING = "open the mailbox"

    def __init__(self, url: str, *, create: bool, env: Mapping[str, str] | None = None) -> None:
        super().__init__(parse_sftp_url(url), create=create, env=env)

    # ------------------------------------------------------------------ the requests, synchronous

    def entries(self) -> list[Entry]:
        return self._call("list", "the mailbox", self._entries_async)

    def put_file(self, name: str, src: int) -> None:
        leftovers: list[str] = []
        self._call("write", name, lambda s: self._put_file_async(s, name, src, leftovers), io=True)

    def fetch(self, name: str, out: int) -> int:
        return self._call("read", name, lambda s: self._fetch_async(s, name, out), io=True)

    def remove(self, name: str) -> None:
        self._call("delete", name, lambda s: self._remove_async(s, name))

    def lstat(self, name: str) -> asyncssh.SFTPAttrs | None:
        return self._call("stat", name, lambda s: self._lstat_async(s, name))

    def free(self) -> int | None:
        return self._call("ask the free space of", "the mailbox", self._free_async)

    def sweep(self, fresh: str) -> None:
        self._call("remove stale temporary files in", "the mailbox", lambda s: self._sweep_async(s, fresh))

    # ------------------------------------------------------------------ the requests

    async def _open(self, sftp: asyncssh.SFTPClient, create: bool) -> None:
        root = self.loc.path
        if create:
            await sftp.makedirs(root, _DIR_ATTRS, exist_ok=True)
            return
        try:
            attrs = await sftp.stat(root)
        except asyncssh.SFTPNoSuchFile:
            raise self._missing("no such folder") from None
        if attrs.permissions is None or not stat.S_ISDIR(attrs.permissions):
            raise StorageError(
                f"the link's mailbox {self.url} is not a folder ({self.endpoint})",
                "give the path of a folder on the server in the link's settings",
                exit_code=ExitCode.NO_REPOSITORY,
            )

    async def _entries_async(self, sftp: asyncssh.SFTPClient) -> list[Entry]:
        out = []
        for e in await sftp.readdir(self.loc.path):
            fn, a = _name(e), e.attrs
            if fn in (".", "..") or (is_temp_name(fn) and _regular(a)):
                continue
            directory = a.permissions is not None and stat.S_ISDIR(a.permissions)
            out.append(Entry(ObjectInfo(fn, a.size or 0, float(a.mtime or 0)), _regular(a), directory))
        return out

    async def _put_file_async(self, sftp: asyncssh.SFTPClient, name: str, src: int, leftovers: list[str]) -> None:
        for old in leftovers:  # the temp file of an attempt whose connection dropped
            with contextlib.suppress(asyncssh.SFTPError):
                await self._step(sftp.remove(old))
        leftovers.clear()
        final = self._path(name)
        there = await self._lstat_async(sftp, name)
        if there is not None and not _regular(there):
            raise NotAPiece(name, self.url, _kind(there))
        tmp = self._path(temp_name())
        leftovers.append(tmp)
        f = await self._step(sftp.open(tmp, "xb", _FILE_ATTRS))
        try:
            offset = 0
            while piece := await asyncio.to_thread(_pread, src, IO_PIECE, offset):
                await self._step(f.write(piece, offset), io=True)
                offset += len(piece)
            await self._step(f.fsync(), io=True)
            await _close_quietly(f, self._policy.timeout)
            await self._step(sftp.posix_rename(tmp, final))
        except BaseException as exc:
            # after a dropped or stalled connection, the next attempt removes the temp file
            if not is_transient(exc) and not isinstance(exc, asyncio.CancelledError):
                await _close_quietly(f, self._policy.timeout)
                with contextlib.suppress(Exception):
                    await self._step(sftp.remove(tmp))
            raise
        leftovers.clear()

    async def _fetch_async(self, sftp: asyncssh.SFTPClient, name: str, out: int) -> int:
        os.ftruncate(out, 0)  # a retry starts again
        there = await self._lstat_async(sftp, name)
        if there is None:
            raise PieceMissing(name, self.url)
        if not _regular(there):
            raise NotAPiece(name, self.url, _kind(there))
        try:
            f = await self._step(sftp.open(self._path(name), "rb"))
        except asyncssh.SFTPNoSuchFile:
            raise PieceMissing(name, self.url) from None
        try:
            offset = 0
            while True:
                piece: bytes = await self._step(f.read(IO_PIECE, offset), io=True)
                if not piece:
                    return offset
                await asyncio.to_thread(_pwrite_all, out, piece, offset)
                offset += len(piece)
        finally:
            # nothing depends on the close's answer: do not wait a round trip for it
            task = asyncio.ensure_future(_close_quietly(f, self._policy.timeout))
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)

    async def _remove_async(self, sftp: asyncssh.SFTPClient, name: str) -> None:
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await self._step(sftp.remove(self._path(name)))

    async def _lstat_async(self, sftp: asyncssh.SFTPClient, name: str) -> asyncssh.SFTPAttrs | None:
        try:
            return await self._step(sftp.lstat(self._path(name)))
        except asyncssh.SFTPNoSuchFile:
            return None

    async def _free_async(self, sftp: asyncssh.SFTPClient) -> int | None:
        try:
            vfs = await self._step(sftp.statvfs(self.loc.path))
        except asyncssh.SFTPOpUnsupported:
            return None
        return int(vfs.bavail * vfs.frsize)

    async def _sweep_async(self, sftp: asyncssh.SFTPClient, fresh: str) -> None:
        # the server's clock, from the time of a piece just written
        now = (await self._step(sftp.stat(self._path(fresh)))).mtime
        if now is None:
            return
        for e in await sftp.readdir(self.loc.path):
            fn, a = _name(e), e.attrs
            if is_temp_name(fn) and _regular(a) and a.mtime is not None and now - a.mtime > STALE_TEMP_SECONDS:
                with contextlib.suppress(asyncssh.SFTPError):
                    await self._step(sftp.remove(self._path(fn)))

    # ------------------------------------------------------------------ errors

    def _missing(self, detail: str) -> StorageError:
        return StorageError(
            f"the link's mailbox {self.url} is not there ({self.endpoint}: {detail})",
            "check the folder's path in the link's settings and the server's disk (a share or disk it is on may be "
            "unmounted), then run the command again",
            exit_code=ExitCode.NO_REPOSITORY,
        )

    def _error(self, exc: BaseException, where: str, *, writing: bool = False) -> StorageError:
        if isinstance(exc, asyncssh.SFTPNoSuchFile):
            return self._missing(f"could not {where}: {exc.reason}")
        if isinstance(exc, asyncssh.SFTPPermissionDenied):
            return StorageRefused(
                f"could not {where}: permission denied",
                f"the login user may not read and write {self.loc.path} on the server: fix the folder's ownership "
                "or permissions, or give the link another folder",
            )
        return super()._error(exc, where, writing=writing)


class SftpMailbox(Mailbox):
    """A mailbox in a folder on an sftp server (see the module docstring)."""

    def __init__(self, url: str, *, create: bool = False, env: Mapping[str, str] | None = None) -> None:
        self._conn = _Connection(url, create=create, env=env)
        self.url = self._conn.url
        self._swept = False

    def _entries(self) -> list[Entry]:
        return self._conn.entries()

    def _put_file(self, name: str, path: str, consume: bool) -> None:
        src = read_source(path)
        try:
            size = os.fstat(src).st_size
            free = self.free_space()
            if free is not None and size > free:
                raise mailbox_full(
                    name,
                    self.url,
                    size,
                    free,
                    "the server's statvfs, checked before writing",
                    f"Free space on the server's disk that holds {self._conn.loc.path} (`df -h` there)",
                )
            self._conn.put_file(name, src)
        finally:
            os.close(src)
        if not self._swept:
            self._swept = True
            with contextlib.suppress(BunkerError):
                self._conn.sweep(name)

    def _fetch(self, name: str, dest: str) -> int:
        return write_atomically(
            dest, lambda out: self._conn.fetch(name, out), f"fetch piece {name} from the mailbox {self.url} into {dest}"
        )

    def _delete(self, name: str) -> None:
        there = self._conn.lstat(name)
        if there is None:
            return
        if there.permissions is not None and stat.S_ISDIR(there.permissions):
            raise NotAPiece(name, self.url, "a folder")
        self._conn.remove(name)

    def _stat(self, name: str) -> ObjectInfo | None:
        a = self._conn.lstat(name)
        if a is None or not _regular(a):
            return None
        return ObjectInfo(name, a.size or 0, float(a.mtime or 0))

    def free_space(self) -> int | None:
        """The room on the server's disk (statvfs@openssh.com), None where it cannot tell."""
        try:
            return self._conn.free()
        except BunkerError:
            return None

    def close(self) -> None:
        self._conn.close()
