"""Restore: recreate a snapshot's tree (or parts of it) under a target directory.

Files are written by a pool of threads (decryption and decompression release the GIL). A file
that cannot be restored (damaged or missing chunk, permission) is reported and the rest goes
on. Directory metadata is applied bottom-up at the end so writing into them does not change
their times.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.backup.runlog import RunLog, display_path
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.repo.blob_reader import BlobReader
from bunker.repo.tree import decode_tree


class DiskFull(BunkerError):
    exit_code = ExitCode.ERR


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    other: int = 0
    bytes: int = 0
    failed: int = 0
    total_bytes: int = 0


@dataclass
class _DirMeta:
    path: bytes
    entry: dict[str, Any]


@dataclass
class Restorer:
    reader: BlobReader
    target: bytes
    log: RunLog
    numeric_owner: bool = False
    workers: int = 4
    stats: RestoreStats = field(default_factory=RestoreStats)
    on_progress: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self._is_root = os.geteuid() == 0
        self._disk_full = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ trees
    def tree(self, tid: bytes) -> list[dict[str, Any]]:
        try:
            return decode_tree(self.reader.read(tid))
        except encoding.FormatError as exc:
            raise CorruptObject(f"tree {tid.hex()[:16]}", str(exc)) from None

    def find(self, root: bytes, path: str) -> dict[str, Any]:
        """The entry at ``path`` inside the snapshot (a synthetic dir entry for the root)."""
        entry: dict[str, Any] = {"n": b"", "t": "d", "st": root}
        for comp in [c for c in os.fsencode(path).split(b"/") if c]:
            if entry["t"] != "d":
                raise BunkerError(
                    f"{path} is not in this snapshot", "list it with `bunker ls SNAPSHOT`", exit_code=ExitCode.USAGE
                )
            match = [e for e in self.tree(entry["st"]) if e["n"] == comp]
            if not match:
                raise BunkerError(
                    f"{path} is not in this snapshot", "list it with `bunker ls SNAPSHOT`", exit_code=ExitCode.USAGE
                )
            entry = match[0]
        return entry

    # ------------------------------------------------------------------ restoring
    def restore(self, root: bytes, paths: list[str]) -> RestoreStats:
        os.makedirs(self.target, exist_ok=True)
        dirs: list[_DirMeta] = []
        with ThreadPoolExecutor(self.workers, thread_name_prefix="bunker-restore") as pool:
            futures: list[Future[None]] = []
            if not paths:
                self._restore_dir(root, self.target, dirs, pool, futures)
            for p in paths:
                comps = [c for c in os.fsencode(p).split(b"/") if c]
                entry = self.find(root, p)
                parent = os.path.join(self.target, *comps[:-1]) if comps else self.target
                os.makedirs(parent, exist_ok=True)
                if not comps:
                    self._restore_dir(root, self.target, dirs, pool, futures)
                else:
                    self._restore_entry(entry, os.path.join(parent, comps[-1]), dirs, pool, futures)
            for f in futures:
                f.result()
        for d in reversed(dirs):
            self._apply_meta(d.path, d.entry)
        if self._disk_full.is_set():
            raise DiskFull(
                f"the target's disk is full: {self.stats.files} files restored, {self.stats.failed} not",
                f"free space under {display_path(self.target)} (or choose another --target) and run the restore again",
            )
        return self.stats

    def _restore_dir(
        self, tid: bytes, path: bytes, dirs: list[_DirMeta], pool: ThreadPoolExecutor, futures: list[Future[None]]
    ) -> None:
        stack = [(tid, path)]
        while stack:
            t, p = stack.pop()
            try:
                entries = self.tree(t)
            except (CorruptObject, ObjectMissing) as exc:
                self.log.add("err", "tree-damaged", f"directory contents cannot be restored: {exc.message}", p)
                self.stats.failed += 1
                continue
            for e in entries:
                full = os.path.join(p, e["n"])
                if e["t"] == "d":
                    if self._mkdir(full, e):
                        dirs.append(_DirMeta(full, e))
                        stack.append((e["st"], full))
                else:
                    self._restore_entry(e, full, dirs, pool, futures)

    def _restore_entry(
        self,
        e: dict[str, Any],
        full: bytes,
        dirs: list[_DirMeta],
        pool: ThreadPoolExecutor,
        futures: list[Future[None]],
    ) -> None:
        t = e["t"]
        if t == "d":
            if self._mkdir(full, e):
                dirs.append(_DirMeta(full, e))
                self._restore_dir(e["st"], full, dirs, pool, futures)
        elif t == "f":
            futures.append(pool.submit(self._restore_file, e, full))
        elif t == "l":
            try:
                _remove_existing(full)
                os.symlink(e["lt"], full)
                self._apply_meta(full, e)
                self.stats.links += 1
            except OSError as exc:
                self._failed(full, exc, "cannot create symlink")
        else:
            self._restore_special(e, full)

    def _mkdir(self, path: bytes, e: dict[str, Any]) -> bool:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                try:
                    _remove_existing(path)
                    os.mkdir(path, 0o700)
                except OSError as exc:
                    self._failed(path, exc, "cannot create directory")
                    return False
        except OSError as exc:
            self._failed(path, exc, "cannot create directory")
            return False
        self.stats.dirs += 1
        return True

    def _restore_file(self, e: dict[str, Any], path: bytes) -> None:
        if self._disk_full.is_set():
            with self._lock:
                self.stats.failed += 1
            return
        try:
            _remove_existing(path, keep_regular=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._failed(path, exc, "cannot create file")
            return
        written = 0
        try:
            for cid in e.get("c", []):
                data = self.reader.read(cid)
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                written += len(data)
                with self._lock:
                    self.stats.bytes += len(data)
        except (CorruptObject, ObjectMissing) as exc:
            os.close(fd)
            self.log.add("err", "file-damaged", f"file restored incompletely ({written} bytes): {exc.message}", path)
            with self._lock:
                self.stats.failed += 1
            return
        except OSError as exc:
            os.close(fd)
            self._failed(path, exc, "cannot write file")
            return
        os.close(fd)
        self._apply_meta(path, e)
        with self._lock:
            self.stats.files += 1
        if self.on_progress:
            self.on_progress()

    def _restore_special(self, e: dict[str, Any], path: bytes) -> None:
        t = e["t"]
        try:
            _remove_existing(path)
            if t == "p":
                os.mkfifo(path, 0o600)
            elif t in "cb":
                major, minor = e.get("dev", [0, 0])
                os.mknod(path, (stat.S_IFCHR if t == "c" else stat.S_IFBLK) | 0o600, os.makedev(major, minor))
            else:
                self.log.add("note", "socket-skipped", "unix socket not recreated by this version", path)
                return
        except PermissionError as exc:
            self.log.add(
                "note",
                "special-skipped",
                f"cannot create this device without root ({exc.strerror}); "
                "restore as root, or export a tar and extract it as root",
                path,
            )
            return
        except OSError as exc:
            self._failed(path, exc, "cannot create special file")
            return
        self._apply_meta(path, e)
        self.stats.other += 1

    def _apply_meta(self, path: bytes, e: dict[str, Any]) -> None:
        is_link = e["t"] == "l"
        try:
            if self._is_root and "u" in e:
                uid, gid = e["u"], e["g"]
                if not self.numeric_owner:
                    uid, gid = _owner_ids(e, uid, gid)
                os.chown(path, uid, gid, follow_symlinks=False)
            if not is_link and "m" in e:
                os.chmod(path, e["m"])
            if "mt" in e:
                at = e.get("at", e["mt"])
                os.utime(path, ns=(at, e["mt"]), follow_symlinks=False)
        except OSError as exc:
            self.log.add("note", "metadata-partial", f"metadata not fully restored: {exc.strerror}", path)

    def _failed(self, path: bytes, exc: OSError, what: str) -> None:
        if exc.errno == errno.ENOSPC:
            self._disk_full.set()
        self.log.os_error("err", "restore-failed", path, exc, what)
        with self._lock:
            self.stats.failed += 1


_pw_cache: dict[tuple[str, str], tuple[int | None, int | None]] = {}


def _owner_ids(e: dict[str, Any], uid: int, gid: int) -> tuple[int, int]:
    """Map stored user/group names to this machine's ids (fall back to the stored ids)."""
    import grp
    import pwd

    key = (e.get("U", ""), e.get("G", ""))
    if key not in _pw_cache:
        u = g = None
        with contextlib.suppress(KeyError):
            u = pwd.getpwnam(key[0]).pw_uid if key[0] else None
        with contextlib.suppress(KeyError):
            g = grp.getgrnam(key[1]).gr_gid if key[1] else None
        _pw_cache[key] = (u, g)
    u, g = _pw_cache[key]
    return (uid if u is None else u), (gid if g is None else g)


def _remove_existing(path: bytes, keep_regular: bool = False) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way", path)
    if keep_regular and stat.S_ISREG(st.st_mode):
        return
    os.unlink(path)
