"""Local-directory backend: the project's own, with atomic and durable writes.

A put writes ``<dir>/.tmp-<random>``, fsyncs it, renames it over the final name and fsyncs the
directory (DESIGN.md §6). Temp files left by a killed writer are swept when the backend opens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from collections.abc import Iterator

from bunker.errors import ExitCode, ObjectMissing, StorageError
from bunker.storage.backend import PREFIXES, Backend, Capabilities, ObjectInfo

TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0


class LocalBackend(Backend):
    """A repository in a local directory (``/path`` or ``file:///path``)."""

    def __init__(self, root: str, *, create: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root
        if create:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            for p in PREFIXES:
                os.makedirs(os.path.join(self.root, p), mode=0o700, exist_ok=True)
            _fsync_dir(self.root)
        elif not os.path.isdir(self.root):
            # a StorageError: a removable disk that is not mounted is an unreachable repository
            # (a backup then spools), not a damaged one
            raise StorageError(
                f"no repository at {self.root}",
                "check the path given with --repo or BUNKER_REPO, or create one with `bunker init`",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        self._created_dirs: set[str] = set()
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
                            os.unlink(e.path)
                            removed += 1
                    except OSError:
                        pass
        return removed

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _ensure_dir(self, d: str) -> None:
        if d not in self._created_dirs:
            os.makedirs(d, mode=0o700, exist_ok=True)
            self._created_dirs.add(d)

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        final = self._path(name)
        d = os.path.dirname(final)
        self._ensure_dir(d)
        tmp = os.path.join(d, TEMP_PREFIX + secrets.token_hex(8))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            if if_absent:
                # link() fails if the target exists: an atomic create-if-absent.
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, final)
            _fsync_dir(d)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _storage_error(exc, f"could not write {name} into {self.root}") from None

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                if offset < 0:
                    f.seek(offset, os.SEEK_END)
                elif offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectMissing(name) from None
        except OSError as exc:
            if exc.errno == errno.EINVAL and offset < 0:  # seek before start: return whole object
                with open(self._path(name), "rb") as f:
                    return f.read()
            raise _storage_error(exc, f"could not read {name} from {self.root}") from None

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        d = self._path(prefix.rstrip("/"))
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while listing
            yield ObjectInfo(prefix + e.name, st.st_size, st.st_mtime)

    def _delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
            _fsync_dir(os.path.dirname(self._path(name)))
        except FileNotFoundError:
            pass

    def _stat(self, name: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(name))
        except FileNotFoundError:
            return None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def capabilities(self) -> Capabilities:
        return Capabilities(create_if_absent=True, server_side_time=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        hint = "the repository's disk is full: free space there, then run the command again"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "the repository is not writable by this user: fix its permissions or use another --repo"
    else:
        hint = "check the repository's disk and run the command again"
    return StorageError(f"{what}: {exc.strerror or exc}", hint, exit_code=ExitCode.FATAL)
