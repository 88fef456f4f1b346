"""Local-directory backend: the project's own, with atomic and durable writes.

A put writes ``<dir>/.tmp-<random>``, fsyncs it, renames it over the final name and fsyncs the
directory (docs/format.md section 5). Temp files left by a killed writer are swept when the backend opens.

Every call that changes the directory goes through a :class:`FileOps` object (the real ``os``
calls by default). Tests substitute one that models what survives a power cut (only what was
fsynced), which checks the discipline above rather than trusting it.

A full disk (ENOSPC, EDQUOT) raises :class:`RepositoryFull` (storage/full.py), not StorageError:
the repository was reached and answered, so a backup must not fall back to the local spool as if
it were unreachable; the run stops with the exact next step (free space, run again). A
read-only filesystem or a directory this user may not write (EROFS, EACCES, EPERM) raises
:class:`StorageRefused` (storage/refused.py): a backup keeps its data in the spool but ends at
level err at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator

from bunker.errors import BunkerError, ExitCode, ObjectMissing, StorageError
from bunker.storage.backend import STRAYS_SHOWN, Backend, Capabilities, ObjectInfo, Strays, validate_prefix
from bunker.storage.file_copy import copy_fd
from bunker.storage.full import FULL_ERRNOS, RepositoryFull, local_disk_full
from bunker.storage.prefixes import PREFIXES, WRITTEN, name_problem, printable
from bunker.storage.refused import is_refused_errno, local_refusal
from bunker.storage.staged import StagedFile

__all__ = ["FULL_ERRNOS", "FileOps", "LocalBackend", "RepositoryFull", "storage_error"]

TEMP_PREFIX = ".tmp-"
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS)
STALE_TEMP_SECONDS = 3600.0


class FileOps:
    """The filesystem calls that change a repository directory: the real ``os`` calls."""

    def create(self, path: str) -> int:
        """Create ``path`` (it must not exist) for writing; return its descriptor."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def copy(self, src: int, dst: int) -> int:
        """Copy all of the file ``src`` into ``dst`` (file_copy.copy_fd: in the kernel where it
        can, else in pieces through :meth:`write`); return the number of bytes."""
        return copy_fd(src, dst, self.write)

    def fsync_path(self, path: str) -> None:
        """Make the content of the closed file at ``path`` durable (a staged file that is about
        to become an object)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def link(self, src: str, dst: str) -> None:
        """Hard-link ``src`` as ``dst``; FileExistsError when ``dst`` exists."""
        os.link(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o700)

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creates, renames, unlinks in it) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalBackend(Backend):
    """A repository in a local directory (``/path`` or ``file:///path``)."""

    def __init__(self, root: str, *, create: bool = False, ops: FileOps | None = None) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root
        self.ops = ops or FileOps()
        self._created_dirs: set[str] = set()
        self._links = True  # whether the filesystem has hard links (for create-if-absent)
        if create:
            try:
                self._ensure_dir(self.root)
                for p in WRITTEN:  # a reserved prefix's directory comes with its first object
                    self._ensure_dir(os.path.join(self.root, p))
            except OSError as exc:
                raise storage_error(exc, f"could not create the repository directory {self.root}", self.root) from None
        elif not os.path.isdir(self.root):
            # a StorageError: a removable disk that is not mounted is an unreachable repository
            # (a backup then spools), not a damaged one
            raise StorageError(
                f"no repository at {self.root}",
                "check the path given with --repo or BUNKER_REPO, or create one with `bunker init`",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        self.sweep_temp_files()

    def sweep_temp_files(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Remove temp files of killed writers older than ``older_than`` seconds."""
        removed = 0
        now = time.time()
        for d in ("", *PREFIXES):
            path = os.path.join(self.root, d)
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for e in entries:
                if e.name.startswith(TEMP_PREFIX):
                    try:
                        if now - e.stat().st_mtime > older_than:
                            self.ops.unlink(e.path)
                            removed += 1
                    except OSError:
                        pass
        return removed

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _ensure_dir(self, d: str) -> None:
        """Create ``d`` (and missing parents) durably: a new directory's own entry is made
        durable by an fsync of its parent."""
        if d in self._created_dirs:
            return
        if not os.path.isdir(d):
            parent = os.path.dirname(d)
            if parent != d:
                self._ensure_dir(parent)
            try:
                self.ops.mkdir(d)
            except FileExistsError:
                pass
            else:
                self.ops.fsync_dir(parent)
        self._created_dirs.add(d)

    def stage(self, prefix: str) -> StagedFile | None:
        """A temp file in ``prefix``'s directory (swept like a killed put's when left behind);
        None when none can be made there: the object is then built in memory."""
        d = self._path(validate_prefix(prefix).rstrip("/"))
        path = os.path.join(d, TEMP_PREFIX + os.urandom(8).hex())
        try:
            self._ensure_dir(d)
            fd = self.ops.create(path)
        except OSError:
            return None
        return StagedFile(path, fd, self.ops)

    def _put_staged(self, name: str, path: str) -> None:
        # On this filesystem a hard link puts the staged file itself in place: it is synced
        # first (StagedFile.seal leaves that to whoever keeps the file), and its staging name
        # goes once the link is durable. From another filesystem it is copied as a put writes,
        # and only the copy is synced: a spool on the system disk in front of a repository on
        # another one paid a sync of every pack on each disk (docs/performance.md).
        ops = self.ops
        final = self._path(name)
        d = os.path.dirname(final)
        try:
            self._ensure_dir(d)
            if os.stat(path).st_dev != os.stat(d).st_dev:
                self._copy_in(name, path)
                ops.unlink(path)
                return
            ops.fsync_path(path)
            try:
                ops.link(path, final)
            except FileExistsError:
                ops.replace(path, final)  # what put does: the newer copy stands
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    self._copy_in(name, path)
                    ops.unlink(path)
                    return
                if exc.errno not in NO_LINKS:
                    raise
                self._links = False
                ops.replace(path, final)
            ops.fsync_dir(d)
            if os.path.lexists(path):
                ops.unlink(path)
        except OSError as exc:
            raise storage_error(exc, f"could not write {name} into {self.root}", self.root) from None

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        def fill(fd: int) -> None:
            self._write_all(fd, memoryview(data))

        return self._put_from(name, fill, if_absent)

    def _write_all(self, fd: int, view: memoryview) -> None:
        while view:
            n = self.ops.write(fd, view)
            view = view[n:]

    def _copy_in(self, name: str, path: str) -> None:
        """Put the file at ``path`` (on another filesystem) under ``name``, copied by the kernel
        or in pieces: a pack staged in a spool on the system disk costs no memory of its size on
        its way to a repository on another disk, nor a pass through this process where the
        kernel copies (docs/performance.md)."""
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:

            def fill(fd: int) -> None:
                self.ops.copy(src, fd)

            self._put_from(name, fill, False)
        finally:
            os.close(src)

    def _put_from(self, name: str, fill: Callable[[int], None], if_absent: bool) -> bool:
        ops = self.ops
        final = self._path(name)
        d = os.path.dirname(final)
        tmp = os.path.join(d, TEMP_PREFIX + os.urandom(8).hex())
        try:
            self._ensure_dir(d)
            fd = ops.create(tmp)
            try:
                fill(fd)
                ops.fsync(fd)
            finally:
                ops.close(fd)
            if if_absent and self._links:
                # link() fails if the target exists: an atomic create-if-absent.
                try:
                    ops.link(tmp, final)
                except FileExistsError:
                    ops.unlink(tmp)
                    return False
                except OSError as exc:
                    if exc.errno not in NO_LINKS:
                        raise
                    self._links = False  # FAT, exFAT and some network shares have no hard links
                else:
                    ops.unlink(tmp)
            if if_absent and not self._links:
                if os.path.lexists(final):  # not atomic: the best such a filesystem allows
                    ops.unlink(tmp)
                    return False
                ops.replace(tmp, final)
            elif not if_absent:
                ops.replace(tmp, final)
            ops.fsync_dir(d)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                ops.unlink(tmp)
            raise storage_error(exc, f"could not write {name} into {self.root}", self.root) from None

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        fd = self._open_object(name)
        with open(fd, "rb") as f:
            try:
                if offset < 0:
                    size = os.fstat(fd).st_size
                    f.seek(max(0, size + offset))  # a range larger than the object: all of it
                elif offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
            except OSError as exc:
                raise storage_error(exc, f"could not read {name} from {self.root}", self.root) from None

    def _read_into(self, name: str, offset: int, buf: memoryview) -> int:
        fd = self._open_object(name)
        try:
            done = 0
            while done < len(buf):
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n == 0:
                    break
                done += n
            return done
        except OSError as exc:
            raise storage_error(exc, f"could not read {name} from {self.root}", self.root) from None
        finally:
            os.close(fd)

    def _open_object(self, name: str) -> int:
        """An open descriptor of the regular file of object ``name`` (ObjectMissing otherwise)."""
        try:
            # O_NONBLOCK: a fifo under an object's name must not hang the reader (no effect on
            # regular files); anything but a regular file is not an object
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectMissing(name) from None
        except OSError as exc:
            raise storage_error(exc, f"could not read {name} from {self.root}", self.root) from None
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, f"could not read {name} from {self.root}", self.root) from None
        if not regular:
            os.close(fd)
            raise ObjectMissing(name)
        return fd

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        for e in self._entries(prefix):
            try:
                st = e.stat()  # follows a symlink, as get() and stat() do
            except FileNotFoundError:
                continue  # deleted while listing (or a dangling symlink: a stray)
            if stat.S_ISREG(st.st_mode):
                yield ObjectInfo(prefix + e.name, st.st_size, st.st_mtime)

    def _entries(self, prefix: str) -> list[os.DirEntry[str]]:
        """The entries of ``prefix``'s directory, without dot files (temp files are dot files)."""
        try:
            return [e for e in os.scandir(self._path(prefix.rstrip("/"))) if not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise storage_error(exc, f"could not list {prefix} in {self.root}", self.root) from None

    def strays(self, prefix: str) -> Strays:
        """Besides names that break the prefix's rule: directories (shown with a trailing ``/``)
        and anything else that is not a regular file, whatever its name."""
        names = []
        for e in self._entries(validate_prefix(prefix)):
            name = prefix + e.name
            if name_problem(name) is None:
                # judged on the entry itself, not on a second listing: an object a writer
                # creates or a prune deletes meanwhile is neither (check runs beside them)
                try:
                    if stat.S_ISREG(e.stat().st_mode):
                        continue
                except FileNotFoundError:
                    if not os.path.lexists(e.path):
                        continue  # deleted since the directory was read
                except OSError:
                    pass
            with contextlib.suppress(OSError):
                name += "/" if e.is_dir() else ""
            names.append(printable(name))
        names.sort()
        return Strays(tuple(names[:STRAYS_SHOWN]), len(names))

    def _delete(self, name: str) -> None:
        path = self._path(name)
        try:
            self.ops.unlink(path)
            self.ops.fsync_dir(os.path.dirname(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, f"could not delete {name} from {self.root}", self.root) from None

    def _stat(self, name: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(name))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # a directory or a device under an object's name is no object
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def capabilities(self) -> Capabilities:
        return Capabilities(create_if_absent=True, server_side_time=True)


def storage_error(exc: OSError, what: str, root: str) -> BunkerError:
    """The error to raise for ``exc`` met while working on the directory ``root``."""
    reason = exc.strerror or str(exc)
    if exc.errno in FULL_ERRNOS:
        try:
            free = f"{shutil.disk_usage(root).free / 1e6:.1f} MB free now"
        except OSError:
            free = "free space unknown"
        return local_disk_full(what, reason, root, free)
    if is_refused_errno(exc.errno):
        return local_refusal(what, exc, root)
    hint = "check the repository's disk and run the command again"
    return StorageError(f"{what}: {reason}", hint, exit_code=ExitCode.FATAL)
