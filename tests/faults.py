"""Faults that real storage shows, injected below real code.

FaultyBackend wraps a real backend: requests that fail (a dropped connection after the retries),
slow requests, torn writes (the storage acknowledges a put but keeps only the first part of the
object), a full disk, and listings that miss fresh objects (eventual consistency). The objects
that do get through are stored for real.

VolatileDisk is LocalBackend's file operations with a record of what was fsynced, and
``power_loss()`` puts the directory back to only that: a simulated power cut, which checks the
temp file + fsync + rename + directory fsync discipline (a kill -9 never does: the kernel keeps
what the process wrote)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bunker.errors import ExitCode, StorageError
from bunker.storage.backend import Backend, Capabilities, ObjectInfo
from bunker.storage.local import FileOps, storage_error


@dataclass
class FaultPlan:
    """Which requests go wrong. ``fail_after``: this many puts succeed, then every request fails
    (the storage went away) until ``heal()``. ``fail_puts``: these put numbers (1-based) fail
    once. ``torn``: names whose put stores only the first half. ``delay``: seconds added to every
    request. ``match``: only puts of names with this prefix count. ``quota``: bytes the storage
    can still take; a put that does not fit fails as a full local disk does (ENOSPC, the error
    LocalBackend raises for it) until ``heal()``. ``list_delay``: a listing omits objects put
    through this wrapper less than this many seconds ago (an eventually consistent listing),
    while get and stat see them at once."""

    fail_after: int | None = None
    fail_puts: set[int] = field(default_factory=set)
    torn: Callable[[str], bool] = lambda name: False
    delay: float = 0.0
    match: str = ""
    quota: int | None = None
    list_delay: float = 0.0


class FaultyBackend(Backend):
    """``inner`` with the faults of ``plan``; ``log`` records what was injected."""

    def __init__(self, inner: Backend, plan: FaultPlan) -> None:
        self.inner, self.plan = inner, plan
        self.url = inner.url
        self.puts = 0
        self.down = False
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._born: dict[str, float] = {}  # name -> when this wrapper saw it put (monotonic)
        self.hidden = 0  # listing entries left out because they were too fresh

    def heal(self) -> None:
        self.down = False
        self.plan.fail_after = None
        self.plan.quota = None

    def _fault(self, what: str) -> StorageError:
        self.log.append(what)
        return StorageError(f"injected fault: {what}", "the test's storage went away", exit_code=ExitCode.NO_REPOSITORY)

    def _gate(self, what: str) -> None:
        if self.plan.delay:
            time.sleep(self.plan.delay)
        if self.down:
            raise self._fault(what)

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        self._gate(f"put {name}")
        if name.startswith(self.plan.match):
            with self._lock:
                self.puts += 1
                n = self.puts
            if self.plan.fail_after is not None and n > self.plan.fail_after:
                self.down = True
                raise self._fault(f"put {name} (storage gone)")
            if n in self.plan.fail_puts:
                raise self._fault(f"put {name} (one failure)")
        if self.plan.quota is not None:
            with self._lock:
                fits = len(data) <= self.plan.quota
                if fits:
                    self.plan.quota -= len(data)
            if not fits:
                self.log.append(f"full {name}")
                url = getattr(self.inner, "root", self.url)
                raise storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), f"could not write {name}", url)
        if self.plan.torn(name):
            self.log.append(f"torn {name}")
            return self.inner.put(name, bytes(data[: len(data) // 2]), if_absent=if_absent)
        if self.plan.list_delay:  # before the put: a listing must never see it early
            with self._lock:
                first = name not in self._born
                self._born[name] = time.monotonic()
        try:
            stored = self.inner.put(name, data, if_absent=if_absent)
        except BaseException:
            if self.plan.list_delay and first:
                with self._lock:
                    self._born.pop(name, None)
            raise
        return stored

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        self._gate(f"get {name}")
        return self.inner.get(name, offset, length)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._gate(f"list {prefix}")
        found = list(self.inner.list(prefix))
        if self.plan.list_delay:
            now = time.monotonic()
            with self._lock:
                fresh = {n for n, t in self._born.items() if now - t < self.plan.list_delay}
            kept = [i for i in found if i.name not in fresh]
            self.hidden += len(found) - len(kept)
            found = kept
        return iter(found)

    def _delete(self, name: str) -> None:
        self._gate(f"delete {name}")
        self.inner.delete(name)
        with self._lock:
            self._born.pop(name, None)

    def _stat(self, name: str) -> ObjectInfo | None:
        self._gate(f"stat {name}")
        return self.inner.stat(name)

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()


# ------------------------------------------------------------------ power loss


class PowerCut(BaseException):
    """The power went off: the process dies here (a BaseException, so no ``except Exception``
    in the code under test can carry on as if the write had happened)."""


_DIR = -1  # the file id of a directory entry


class VolatileDisk(FileOps):
    """The real file operations, with a record of what a power cut would keep (LocalBackend's
    ``ops``). Only what was fsynced survives: ``fsync`` of a file makes its content durable,
    ``fsync_dir`` of a directory makes the creates, renames, links, unlinks and mkdirs in it
    durable. ``power_loss()`` rewrites the real directories to that durable state: files that
    were never synced are empty, entries whose directory was not synced since are gone again,
    renames are undone and unlinked files come back.

    ``cut_after``: the operation with this number (1-based) never happens; it and every later
    one raise PowerCut. Directories are tracked from the first operation in them; what they
    held then counts as durable."""

    def __init__(self, cut_after: int | None = None) -> None:
        self.cut_after = cut_after
        self.count = 0
        self.cut = False
        self._lock = threading.RLock()
        self._next_id = 0
        self._fds: dict[int, int] = {}  # open descriptor -> file id
        self._content: dict[int, bytes | None] = {}  # file id -> durable content (None: as on disk)
        self._entries: dict[str, dict[str, int]] = {}  # directory -> {name: file id} now
        self._durable: dict[str, dict[str, int]] = {}  # directory -> {name: file id} at its last fsync
        self.made_durable = 0  # fsyncs that made something durable (the negative controls check it)

    # -------------------------------------------------------------- bookkeeping
    def _step(self, what: str) -> None:
        with self._lock:
            if self.cut:
                raise PowerCut(what)
            self.count += 1
            if self.cut_after is not None and self.count >= self.cut_after:
                self.cut = True
                raise PowerCut(what)

    def _new_id(self, content: bytes | None) -> int:
        self._next_id += 1
        self._content[self._next_id] = content
        return self._next_id

    def _dir(self, d: str) -> dict[str, int]:
        d = os.path.abspath(d)
        if d not in self._entries:
            now: dict[str, int] = {}
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(d):
                    now[e.name] = _DIR if e.is_dir(follow_symlinks=False) else self._new_id(None)
            self._entries[d] = now
            self._durable[d] = dict(now)
        return self._entries[d]

    def _keep_old(self, path: str) -> None:
        """Before a name of a file that predates the tracking goes, keep its content."""
        entries = self._dir(os.path.dirname(path))
        fid = entries.get(os.path.basename(path))
        if fid is not None and fid != _DIR and self._content[fid] is None:
            with open(path, "rb") as f:
                self._content[fid] = f.read()

    # -------------------------------------------------------------- FileOps
    def create(self, path: str) -> int:
        with self._lock:
            self._step(f"create {path}")
            fd = super().create(path)
            fid = self._new_id(b"")
            self._fds[fd] = fid
            self._dir(os.path.dirname(path))[os.path.basename(path)] = fid
            return fd

    def write(self, fd: int, data: memoryview) -> int:
        self._step("write")
        return super().write(fd, data)

    def copy(self, src: int, dst: int) -> int:
        self._step("copy")  # (where the kernel cannot copy, each piece's write is a step too)
        return super().copy(src, dst)

    def fsync(self, fd: int) -> None:
        with self._lock:
            self._step("fsync")
            super().fsync(fd)
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                self._content[self._fds[fd]] = f.read()
            self.made_durable += 1

    def fsync_path(self, path: str) -> None:
        with self._lock:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._fds[fd] = self._dir(os.path.dirname(path))[os.path.basename(path)]
                self.fsync(fd)  # (a negative control that skips file syncs skips this one too)
            finally:
                self._fds.pop(fd, None)
                os.close(fd)

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            # closing is not a step: a cut between fsync and close changes nothing on disk
            super().close(fd)

    def link(self, src: str, dst: str) -> None:
        with self._lock:
            self._step(f"link {dst}")
            super().link(src, dst)
            self._dir(os.path.dirname(dst))[os.path.basename(dst)] = self._dir(os.path.dirname(src))[
                os.path.basename(src)
            ]

    def replace(self, src: str, dst: str) -> None:
        with self._lock:
            self._step(f"replace {dst}")
            self._keep_old(dst)
            fid = self._dir(os.path.dirname(src))[os.path.basename(src)]
            super().replace(src, dst)
            del self._dir(os.path.dirname(src))[os.path.basename(src)]
            self._dir(os.path.dirname(dst))[os.path.basename(dst)] = fid

    def unlink(self, path: str) -> None:
        with self._lock:
            self._step(f"unlink {path}")
            self._keep_old(path)
            super().unlink(path)
            self._dir(os.path.dirname(path)).pop(os.path.basename(path), None)

    def mkdir(self, path: str) -> None:
        with self._lock:
            self._step(f"mkdir {path}")
            super().mkdir(path)
            self._dir(os.path.dirname(path))[os.path.basename(path)] = _DIR
            self._entries[os.path.abspath(path)] = {}
            self._durable[os.path.abspath(path)] = {}

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            self._step(f"fsync_dir {path}")
            super().fsync_dir(path)
            self._durable[os.path.abspath(path)] = dict(self._dir(path))
            self.made_durable += 1

    # -------------------------------------------------------------- the cut
    def power_loss(self) -> list[str]:
        """Cut the power (if ``cut_after`` did not already) and rewrite every tracked directory
        to its durable state; returns what changed, for the test's messages."""
        with self._lock:
            self.cut = True
            changes: list[str] = []
            for d in sorted(self._entries, key=len):
                if not os.path.isdir(d):
                    continue  # removed with a parent whose entry was not durable
                parent = os.path.dirname(d)
                if parent in self._durable and self._durable[parent].get(os.path.basename(d)) != _DIR:
                    shutil.rmtree(d)
                    changes.append(f"directory {d} gone")
                    continue
                keep = self._durable[d]
                for e in list(os.scandir(d)):
                    if e.name not in keep:
                        if e.is_dir(follow_symlinks=False):
                            shutil.rmtree(e.path)
                        else:
                            os.unlink(e.path)
                        changes.append(f"{e.path} gone")
                for name, fid in keep.items():
                    path = os.path.join(d, name)
                    content = self._content.get(fid) if fid != _DIR else None
                    if fid == _DIR or content is None:
                        continue  # a directory, or a file untouched since the tracking began
                    if os.path.lexists(path):
                        with open(path, "rb") as f:
                            if f.read() == content:
                                continue
                    with open(path, "wb") as f:
                        f.write(content)
                    changes.append(f"{path} back to {len(content)} synced bytes")
            return changes


class SkipDirSync(VolatileDisk):
    """A broken LocalBackend: it never fsyncs a directory (negative control)."""

    def fsync_dir(self, path: str) -> None:
        self._step(f"fsync_dir {path} (skipped)")


class SkipFileSync(VolatileDisk):
    """A broken LocalBackend: it never fsyncs a file's data (negative control)."""

    def fsync(self, fd: int) -> None:
        self._step("fsync (skipped)")
