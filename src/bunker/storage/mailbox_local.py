"""A link's mailbox in a local folder: a carried disk, and so untrusted (storage/mailbox.py).

Whoever had the disk may have planted anything in the folder. So:

- The folder is opened once, with ``O_DIRECTORY | O_NOFOLLOW`` (a symlink in its place is
  refused), and every file in it is reached relative to that descriptor: ``openat`` with
  ``O_NOFOLLOW`` (``O_EXCL`` for creates), ``renameat``, ``unlinkat``, ``fstatat`` without
  following. A symlink, a folder, a device, a pipe, or a regular file with other hard links
  (through which root would read any file of that filesystem) is a stray: never listed, never
  read, never written through. Reads check the file they opened is the one they examined.
- When bunker runs as root and the folder belongs to another user, everything that changes the
  folder (create, rename, delete, mkdir, the sweep) runs as that user, in a short forked child
  (storage/owner.py says why a child). The child inherits the folder's and the source file's
  descriptors, so it needs no access to the folder's path nor to the piece it sends. Reads stay
  with root, without following symlinks.
- A write is a temp file (a dot and 64 random hex digits), fsynced, renamed over the name, the
  folder fsynced, then checked: a regular file must be under the name (a temp file swapped for
  a symlink meanwhile was renamed, never written through, and the put fails saying so). Temp
  files of killed writers are swept when the mailbox opens, once older than
  STALE_TEMP_SECONDS. Bytes move in the kernel (sendfile): put and fetch use no memory for the
  piece whatever its size. A piece file its writer gives up (``consume``) on the same filesystem
  is linked in, not copied, when this process writes as itself; its writer's name for it is
  removed before the piece gets its own, so a process killed at any moment never leaves a piece
  with a second name (a file with two hard links is no piece: no listing would show it).

A mailbox should be a folder *on* the carried disk, never its mount point: with the disk
unplugged the folder is then missing (a clear error) instead of an empty mount point on the
system disk that pieces would silently fill.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
import time
from collections.abc import Callable

from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.storage.backend import ObjectInfo
from bunker.storage.file_copy import copy_fd
from bunker.storage.full import FULL_ERRNOS
from bunker.storage.local import STALE_TEMP_SECONDS, storage_error
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
from bunker.storage.owner import Owner
from bunker.storage.refused import StorageRefused

__all__ = ["LocalMailbox"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo planted under a piece's name must not hang a reader
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_STRAY_TEXT = "something that is not a regular file has the piece's name"
_SWAPPED_TEXT = "the temp file was replaced while it was written"


def is_piece_file(st: os.stat_result) -> bool:
    """A regular file with no other hard link: what a piece is on a local medium."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def kind_of(st: os.stat_result) -> str:
    """What a non-piece entry is, in words."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISREG(mode):
        return f"a file with {st.st_nlink} hard links (it may be any file of that filesystem)"
    return "not a regular file"


class LocalMailbox(Mailbox):
    """A mailbox in a local folder (see the module docstring)."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.root = os.path.abspath(path)
        self.url = self.root
        self._dirfd = -1
        if create:
            self._make()
        try:
            self._dirfd = os.open(self.root, _DIR)
        except OSError as exc:
            raise self._open_error(exc) from None
        self._owner = Owner.of(os.fstat(self._dirfd))
        self._sweep()

    # ------------------------------------------------------------------ the interface

    def _entries(self) -> list[Entry]:
        # a temp name on anything but a regular file is no writer's: a stray
        return [e for e in self._scan() if not (is_temp_name(e.info.name) and e.regular)]

    def _put_file(self, name: str, path: str, consume: bool) -> None:
        src = read_source(path)
        try:
            size = os.fstat(src).st_size
            free = self.free_space()
            if free is not None and size > free:
                raise self._full(name, size, free, "checked before writing")
            dirfd, tmp = self._dirfd, temp_name()
            # a link shares the source's bytes, owner and mode: only for a file the caller gives
            # up, when this process writes as itself, and only while the path still names the
            # regular file that was opened
            src_st = os.fstat(src)
            try:
                path_st = os.stat(path, follow_symlinks=False)
            except OSError:
                path_st = None
            linkable = (
                consume
                and self._owner is None
                and path_st is not None
                and (path_st.st_dev, path_st.st_ino) == (src_st.st_dev, src_st.st_ino)
                and src_st.st_dev == os.fstat(dirfd).st_dev
                and src_st.st_nlink == 1
            )

            def write() -> None:
                try:
                    there = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if not stat.S_ISREG(there.st_mode):
                        raise OSError(errno.EEXIST, _STRAY_TEXT)
                try:
                    if linkable:
                        # the piece file is whole and synced already: on the same filesystem a
                        # second name for it costs nothing, where a copy costs a full write
                        os.link(path, tmp, dst_dir_fd=dirfd, follow_symlinks=False)
                        # the writer's name goes first: killed after the rename below with both
                        # names, the piece would have two links and never be listed (is_piece_file)
                        os.unlink(path)
                    else:
                        fd = os.open(tmp, _CREATE, 0o600, dir_fd=dirfd)
                        try:
                            copy_fd(src, fd)
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                    # renameat never follows a symlink at either name: one planted meanwhile is
                    # replaced, or moved to the name, where readers refuse it
                    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dirfd)
                    raise
                os.fsync(dirfd)
                # what was renamed may not be what was written: the temp file swapped meanwhile
                if not stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise OSError(errno.EEXIST, _SWAPPED_TEXT)

            try:
                self._as_owner(write)
            except OSError as exc:
                if exc.errno == errno.EEXIST and exc.strerror == _STRAY_TEXT:
                    raise self._not_a_piece(name) from None
                if exc.errno == errno.EEXIST and exc.strerror == _SWAPPED_TEXT:
                    raise StorageError(
                        f"could not write piece {name} into the mailbox {self.url}: {_SWAPPED_TEXT}, and what now "
                        f"has its name is {self._describe(name)}: another program or person changes the folder",
                        "a carried medium is untrusted: look at the folder (`ls -la`), remove what is not a piece, "
                        "then run the command again",
                        exit_code=ExitCode.FATAL,
                    ) from None
                if exc.errno in FULL_ERRNOS:
                    raise self._full(name, size, self.free_space(), exc.strerror or str(exc)) from None
                raise self._error(exc, f"write piece {name} into the mailbox {self.url}") from None
        finally:
            os.close(src)

    def _fetch(self, name: str, dest: str) -> int:
        fd = self._open_piece(name)
        try:
            return write_atomically(
                dest, lambda out: copy_fd(fd, out), f"fetch piece {name} from the mailbox {self.url} into {dest}"
            )
        finally:
            os.close(fd)

    def _delete(self, name: str) -> None:
        dirfd = self._dirfd
        if self._lstat(name) is None:
            return

        def remove() -> None:
            try:
                if stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise OSError(errno.EISDIR, "a folder has the piece's name")
                os.unlink(name, dir_fd=dirfd)  # a symlink itself, never its target
            except FileNotFoundError:
                return
            os.fsync(dirfd)

        try:
            self._as_owner(remove)
        except OSError as exc:
            raise self._error(exc, f"delete piece {name} from the mailbox {self.url}") from None

    def _stat(self, name: str) -> ObjectInfo | None:
        st = self._lstat(name)
        if st is None or not is_piece_file(st):
            return None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def free_space(self) -> int | None:
        """The room left for this mailbox's writer (statvfs: blocks available to non-root)."""
        try:
            vfs = os.fstatvfs(self._dirfd)
        except OSError:
            return None
        return vfs.f_bavail * vfs.f_frsize

    def close(self) -> None:
        if self._dirfd >= 0:
            fd, self._dirfd = self._dirfd, -1
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ the folder

    def _as_owner(self, fn: Callable[[], None]) -> None:
        if self._owner is None:
            fn()
        else:
            self._owner.run(fn)

    def _make(self) -> None:
        """Make the folder and its missing parents, each as the owner of the folder it goes in."""
        missing: list[str] = []
        p = self.root
        while not os.path.isdir(p) and not os.path.lexists(p):
            missing.append(os.path.basename(p))
            p = os.path.dirname(p)
        if not missing:
            return
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._open_error(exc) from None
        try:
            for part in reversed(missing):
                parent = fd

                def mkdir(part: str = part, parent: int = parent) -> None:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=parent)
                        os.fsync(parent)

                owner = Owner.of(os.fstat(parent))
                if owner is None:
                    mkdir()
                else:
                    owner.run(mkdir)
                fd = os.open(part, _DIR, dir_fd=parent)
                os.close(parent)
        except OSError as exc:
            raise self._error(exc, f"make the mailbox folder {self.root}") from None
        finally:
            os.close(fd)

    def _sweep(self) -> None:
        """Remove temp files of killed writers older than STALE_TEMP_SECONDS (best effort: a
        read-only medium keeps them)."""
        now = time.time()
        try:
            stale = [
                e.info.name
                for e in self._scan()
                if is_temp_name(e.info.name) and e.regular and now - e.info.mtime > STALE_TEMP_SECONDS
            ]
        except BunkerError:
            return
        if not stale:
            return
        dirfd = self._dirfd

        def sweep() -> None:
            for n in stale:
                with contextlib.suppress(OSError):
                    st = os.stat(n, dir_fd=dirfd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > STALE_TEMP_SECONDS:
                        os.unlink(n, dir_fd=dirfd)
            os.fsync(dirfd)

        with contextlib.suppress(OSError):
            self._as_owner(sweep)

    def _scan(self) -> list[Entry]:
        # a descriptor of its own: scandir on a shared one would share its position with other threads
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._dirfd)
            try:
                out = []
                with os.scandir(fd) as it:
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted while listing
                        info = ObjectInfo(e.name, st.st_size, st.st_mtime)
                        out.append(Entry(info, is_piece_file(st), stat.S_ISDIR(st.st_mode)))
                return out
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(exc, f"list the mailbox {self.url}") from None

    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self._dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, f"look at {name} in the mailbox {self.url}") from None

    def _open_piece(self, name: str) -> int:
        """A descriptor of the piece ``name``, checked to be a regular file with one link, the
        same file that was examined before it was opened."""
        seen = self._lstat(name)
        if seen is None:
            raise PieceMissing(name, self.url)
        if not is_piece_file(seen):
            raise NotAPiece(name, self.url, kind_of(seen))
        try:
            fd = os.open(name, _READ, dir_fd=self._dirfd)
        except FileNotFoundError:
            raise PieceMissing(name, self.url) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotAPiece(name, self.url, "a symbolic link") from None
            raise self._error(exc, f"read piece {name} from the mailbox {self.url}") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) or not is_piece_file(st):
            os.close(fd)
            raise NotAPiece(name, self.url, "a file that was replaced while it was opened")
        return fd

    # ------------------------------------------------------------------ errors

    def _not_a_piece(self, name: str) -> BunkerError:
        st = self._lstat(name)
        if st is None or stat.S_ISREG(st.st_mode):
            return StorageError(
                f"could not write piece {name} into the mailbox {self.url}: something else took its name meanwhile",
                "run the command again",
                exit_code=ExitCode.FATAL,
            )
        return NotAPiece(name, self.url, kind_of(st))

    def _describe(self, name: str) -> str:
        st = self._lstat(name)
        return "nothing" if st is None else "a piece" if is_piece_file(st) else kind_of(st)

    def _full(self, name: str, size: int, free: int | None, why: str) -> BunkerError:
        return mailbox_full(name, self.url, size, free, why, f"Free space on that medium (`df -h {self.root}`)")

    def _who(self) -> str:
        if self._owner is not None:
            return f"the folder's owner ({self._owner.name}), as whom root writes there,"
        try:
            return f"this user ({pwd.getpwuid(os.geteuid()).pw_name}, uid {os.geteuid()})"
        except KeyError:
            return f"this user (uid {os.geteuid()})"

    def _error(self, exc: OSError, what: str) -> BunkerError:
        """What ``exc``, met while trying to ``what``, means for the mailbox, with the next step."""
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EROFS:
            return StorageRefused(
                f"could not {what}: {reason}: the medium that holds the mailbox is mounted read-only",
                "a disk with errors is often remounted read-only by the kernel (`dmesg` says so): repair it (fsck) "
                f"or remount it read-write (`mount -o remount,rw` on the mount point of {self.root}); a "
                "write-protected disk needs its switch moved",
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return StorageRefused(
                f"could not {what}: {reason}: {self._who()} may not write into the mailbox",
                f"make {self.root} writable by its owner (chmod u+rwx), or give it to the user the node runs as",
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ENODEV) and not self._still_there():
            return self._missing(reason)
        if exc.errno == errno.ENOENT:
            return StorageError(
                f"could not {what}: {reason}: something removed a file bunker was writing in the mailbox",
                "another program works in the mailbox folder: stop it, then run the command again",
                exit_code=ExitCode.FATAL,
            )
        return storage_error(exc, f"could not {what}", self.root)

    def _still_there(self) -> bool:
        """Whether the folder is still there (not removed, its medium not gone)."""
        try:
            return self._dirfd >= 0 and os.fstat(self._dirfd).st_nlink > 0
        except OSError:
            return False

    def _missing(self, reason: str) -> StorageError:
        return StorageError(
            f"the link's mailbox {self.url} is not there ({reason}): the disk or share that carries it is not "
            "connected or not mounted, or the path is wrong",
            "connect and mount the medium that holds the link's folder (a folder on it, not its mount point), or "
            "fix the folder's path in the link's settings, then run the command again",
            exit_code=ExitCode.NO_REPOSITORY,
        )

    def _open_error(self, exc: OSError) -> BunkerError:
        if exc.errno == errno.ENOTDIR and os.path.islink(self.root):
            return StorageRefused(
                f"the link's mailbox {self.url} is a symbolic link: bunker does not follow one there (a carried "
                "disk is untrusted)",
                f"give the folder's real path (`realpath {self.root}` shows it) in the link's settings",
            )
        if exc.errno == errno.ENOTDIR and os.path.exists(self.root):
            return StorageError(
                f"the link's mailbox {self.url} is not a folder",
                "give the path of a folder on the medium in the link's settings",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return StorageRefused(
                f"could not open the link's mailbox {self.url}: {exc.strerror}: this user may not read it",
                f"make {self.root} readable by the user the node runs as",
            )
        return self._error(exc, f"open the mailbox {self.url}")
