"""The archiver: walks the source, stores changed files' chunks through the session writer,
builds trees bottom-up and returns the root tree and the chunk set.

Metadata: what lstat() gives is taken by the main thread; a regular file's holes, xattrs, ACL and
inode flags are read by whoever reads its content, through the same open descriptor (see
file_reader.py); a directory's through a descriptor opened before it is listed; other items'
xattrs by path (they are never opened). Hard links: the first name of an inode met in the walk is
backed up; every other name gets a copy of its entry (same ``ino``), so the data is read and
stored once (FORMAT.md section 14; the bookkeeping is in hardlinks.py).

Parallelism: the main thread walks and stats (cheap); file reading, chunking, hashing,
compression and encryption run in a pool of worker threads. The native libraries (pyfastcdc,
blake3, zstandard, AES-GCM) release the GIL, so both cores work. Once many small files were
seen, the small ones go in batches to worker processes instead (small_batches.py, small_files.py),
and a directory of nothing but small new files goes to them whole: they build its entries and
tree too (whole_dirs.py).
Directories are finished in post-order as soon as their files are done, so memory stays bounded
by the walk's depth and the number of files in flight.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from bunker import encoding
from bunker.backup import files_cache as fc
from bunker.backup.chunk_store import READ_WHOLE, ChunkStore, Halted
from bunker.backup.chunker import Readable
from bunker.backup.excludes import PSEUDO_FILESYSTEMS, Excludes, mount_types
from bunker.backup.file_entry import Event, apply_outcome, base_entry, cache_row, fit_entries, outcome_events
from bunker.backup.file_reader import ReadOutcome, read_stable
from bunker.backup.hardlinks import HardLinks
from bunker.backup.owners import OwnerNames
from bunker.backup.partial import VirtualFrame, partial_root
from bunker.backup.resume import PartialFiles, Tracked
from bunker.backup.small_batches import SMALL_BATCH_BYTES, SmallBatches
from bunker.backup.small_files import SmallFilePool
from bunker.backup.tree_reuse import (
    PRESTAT_MAX,
    Child,
    TreeRecord,
    children_digest,
    deferral,
    has_links,
    lstat_children,
    record_tree,
)
from bunker.backup.whole_dirs import DirResult, WholeFile, whole_files
from bunker.fs import deep_path
from bunker.fs.fsmeta import inode_meta, name_acl, path_meta
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.session_writer import SessionWriter
from bunker.runlog import RunLog

SMALL_FILE = 256 << 10  # files up to this size go to the worker processes ...
SMALL_POOL_AFTER = 1000  # ... once this many were seen (starting the processes costs ~0.2 s)
SMALL_POOL_PRESTART = 250  # their forkserver starts beside the walk once this many were seen
MAX_INFLIGHT_FILES = 256
MAX_INFLIGHT_BYTES = 96 << 20


@dataclass
class Progress:
    """Counters the CLI shows; updated from several threads (int += is fine for display)."""

    files: int = 0
    dirs: int = 0
    nbytes: int = 0
    total_files: int | None = None
    total_bytes: int | None = None
    current: bytes = b""  # decoded only when shown


def read_charge(st: os.stat_result) -> int:
    """What reading a regular file holds in memory, charged against MAX_INFLIGHT_BYTES: its
    data (a sparse file's holes are not read) up to READ_WHOLE, beyond which it is read as a
    stream, a few MiB at a time (chunk_store.py). Charging a streamed file its whole size let
    one 96 MiB file fill the budget: the large files of a tree were read one at a time, on one
    core (docs/performance.md)."""
    return min(st.st_size, st.st_blocks * 512, READ_WHOLE)


@dataclass
class DirJob:
    path: bytes
    entries: list[dict[str, Any]]
    parent_entry: dict[str, Any] | None
    cache_old: fc.DirRecord
    cache_new: fc.DirRecord = field(default_factory=dict)
    pending: int = 0
    names: deque[bytes] = field(default_factory=deque)
    dev: int = -1  # the filesystem this directory is walked on (for --one-file-system)
    stated: deque[Child] = field(default_factory=deque)  # listed and lstat'ed ahead (tree_reuse.py)
    digest: bytes | None = None  # of its children, when its tree may be recorded for reuse
    events: int = 0  # how many events the run had logged when it was opened
    reuse: TreeRecord | None = None  # the recorded tree, if nothing changed in its own children
    deferred: list[Child] = field(default_factory=list)  # reusing: children whose entries are not built
    whole: list[WholeFile] | None = None  # its files, when a worker reads it whole (whole_dirs.py)
    whole_result: DirResult | str | None = None  # what that worker gave, or why it failed


@dataclass
class ArchiveResult:
    root: bytes
    chunk_ids: ChunkIdSet
    stats: dict[str, int]


class Archiver:
    """Backs up paths (or one stream) into a session; see :meth:`run`."""

    def __init__(
        self,
        writer: SessionWriter,
        files_cache: fc.FilesCache,
        log: RunLog,
        *,
        excludes: Excludes | None = None,
        one_file_system: bool = False,
        atime: bool = False,
        workers: int | None = None,
        small_workers: int | None = None,
        progress: Progress | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.writer = writer
        self.cache = files_cache
        self.log = log
        self.excludes = excludes or Excludes([])
        self.one_fs = one_file_system
        self._named: set[bytes] = set()  # paths given on the command line (see _build_root)
        self._mounts = mount_types()  # mount point -> filesystem type
        self.atime = atime
        self.progress = progress or Progress()
        self.tick = tick
        chunker = writer.repo.config.chunker
        self._workers = workers or max(2, (os.cpu_count() or 2) + 1)
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="bunker-read")
        self._slots = threading.BoundedSemaphore(MAX_INFLIGHT_FILES)
        self._bytes_cv = threading.Condition()
        self._inflight_bytes = 0
        self._owners = OwnerNames()
        self._done_lock = threading.Lock()
        self._ready: deque[DirJob] = deque()
        self.chunk_ids = ChunkIdSet()
        self.stats = {
            "files": 0,
            "dirs": 0,
            "bytes": 0,
            "files_new": 0,
            "files_changed": 0,
            "files_unchanged": 0,
            "errors": 0,
            "bytes_resumed": 0,
            "trees_reused": 0,
        }
        self._last_tick = time.monotonic()
        self._small_pool = SmallFilePool(writer.secrets, chunker, writer.put.data_public, small_workers)
        self._small_seen = 0
        # both complete directories' entries from other threads, so they share the lock over the
        # pending counts and wake the main thread like a finished file does
        self._small: SmallBatches[DirJob] = SmallBatches(
            self._small_pool,
            writer,
            small_workers,
            self._done_lock,
            self._wake,
            self.progress,
            self._record,
            self._add_chunk_ids,
            self._maybe_tick,
            self._whole_done,
        )
        self._hardlinks = HardLinks(self._done_lock, self._wake, log)
        # what is in progress, for checkpoints (partial.py): the walk stack, the virtual
        # ancestors of the named paths, the entry of "/" when "/" itself is backed up
        self._wstack: list[DirJob] = []
        self._vframes: list[VirtualFrame] = []
        self._root_entry: dict[str, Any] | None = None
        self.checkpoint: Callable[[], None] | None = None  # called from the main thread's ticks
        # called on the main thread at every tick, with the walk as it is: may halt() the run,
        # write a last checkpoint and raise to end it (run.py, an interrupted run)
        self.stop: Callable[[], None] | None = None
        self.partial_files = PartialFiles(files_cache, writer.index.locations)
        self.chunks = ChunkStore(writer, self.partial_files, self._count_bytes, self._count_resumed)

    def _count_bytes(self, n: int) -> None:
        self.progress.nbytes += n

    def _count_resumed(self, n: int) -> None:
        with self._done_lock:
            self.stats["bytes_resumed"] += n

    # ------------------------------------------------------------------ files
    def store_stream(self, f: BinaryIO | Readable, track: Tracked | None = None) -> tuple[list[bytes], int]:
        """Chunk and store a stream (standard input, a tar member); return (chunk ids, bytes)."""
        return self.chunks.store_stream(f, track)

    def _read_file(self, path: bytes, size0: int, entry: dict[str, Any], job: DirJob, name: bytes) -> None:
        try:
            self._record(read_stable(path, self.chunks.consume), path, entry, job, name)
        except Halted:
            pass  # the run stops: the entry keeps no content, so no tree of this run holds it
        except Exception as exc:  # noqa: BLE001 - one file must never abort the run
            self._record(
                ReadOutcome("error", [], message=f"could not back up this file: {exc}"), path, entry, job, name
            )
        finally:
            self._finish_file(job, size0)

    def _record(
        self, r: ReadOutcome, path: bytes, entry: dict[str, Any], job: DirJob, name: bytes, ids_added: bool = False
    ) -> None:
        """Put a read's outcome into the directory's entry, files cache and run log (and its
        chunk ids into the snapshot's, unless ``ids_added``)."""
        if self._hardlinks.reading:
            try:
                self._record_outcome(r, path, entry, job, name, ids_added)
            finally:
                self._hardlinks.read_done(entry)
        else:
            self._record_outcome(r, path, entry, job, name, ids_added)

    def _add_chunk_ids(self, ids: list[bytes]) -> None:
        with self._done_lock:
            self.chunk_ids.update(ids)

    def _record_outcome(
        self, r: ReadOutcome, path: bytes, entry: dict[str, Any], job: DirJob, name: bytes, ids_added: bool
    ) -> None:
        if r.problems or r.status != "ok":
            self._log_events(outcome_events(r, path))
        if apply_outcome(entry, r, self._owners):
            if r.status == "ok":
                job.cache_new[name] = cache_row(r)
            if not ids_added:
                self._add_chunk_ids(r.chunks)

    def _log_events(self, events: list[Event]) -> None:
        """Log events built elsewhere (file_entry.py); each ``err`` counts as an error."""
        errors = 0
        for ev in events:
            self.log.add(*ev)
            errors += ev[0] == "err"
        if errors:
            with self._done_lock:
                self.stats["errors"] += errors

    def _finish_file(self, job: DirJob, size: int) -> None:
        with self._done_lock:
            job.pending -= 1
            self.progress.files += 1
        with self._bytes_cv:
            self._inflight_bytes -= size
            self._bytes_cv.notify_all()
        self._slots.release()

    def _submit_file(self, path: bytes, st: os.stat_result, entry: dict[str, Any], job: DirJob, name: bytes) -> None:
        # While waiting for room the main thread keeps ticking: a file that takes hours to read
        # must not let the lease expire or the checkpoints stop.
        while not self._slots.acquire(timeout=0.2):
            self._maybe_tick()
        size = read_charge(st)
        while True:
            with self._bytes_cv:
                if self._inflight_bytes == 0 or self._inflight_bytes + size <= MAX_INFLIGHT_BYTES:
                    self._inflight_bytes += size
                    break
                self._bytes_cv.wait(0.2)
            self._maybe_tick()
        with self._done_lock:
            job.pending += 1
        self._pool.submit(self._read_file, path, size, entry, job, name)

    def _wake(self) -> None:
        """Tell the main thread (waiting in _wait_for) that a directory's pending count went down."""
        with self._bytes_cv:
            self._bytes_cv.notify_all()

    # ------------------------------------------------------------------ entries
    def _meta(self, name: bytes, st: os.stat_result, kind: str) -> dict[str, Any]:
        e = base_entry(name, kind, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, self._owners)
        if self.atime:
            e["at"] = st.st_atime_ns
        return e

    def _add_meta(self, e: dict[str, Any], meta: dict[str, Any], problems: list[str], path: bytes) -> None:
        if meta:
            e.update(meta)
            if "acl" in meta:
                name_acl(e["acl"], self._owners.user, self._owners.group)
        for problem in problems:
            self.log.add("warn", "metadata-unreadable", f"{problem}; the item itself is stored", path)

    def _entry(self, job: DirJob, name: bytes, path: bytes, st: os.stat_result, root_dev: int) -> DirJob | None:
        """Add one directory entry to ``job``; return a DirJob if it is a directory to descend."""
        mode = st.st_mode
        linked = st.st_nlink > 1 and not stat.S_ISDIR(mode)
        if linked and self._hardlinks.other_name(job, name, path, st):
            if stat.S_ISREG(mode):
                self.stats["files"] += 1
                self.progress.files += 1
            return None
        if stat.S_ISREG(mode):
            self.stats["files"] += 1
            self.stats["bytes"] += st.st_size
            cached = fc.lookup(job.cache_old, name, st)
            locs = self.writer.index.locations
            if cached is not None and all(c in locs for c in cached[0]):
                e = self._unchanged_file(job, name, path, st, cached)
                self.chunk_ids.update(cached[0])
                self.stats["files_unchanged"] += 1
                self.progress.files += 1
                self.progress.nbytes += st.st_size
                if linked:
                    self._hardlinks.first_name(e, st, path, reading=False)
            else:
                e = self._meta(name, st, "f")
                e["sz"] = st.st_size
                job.entries.append(e)
                if linked:
                    self._hardlinks.first_name(e, st, path, reading=True)
                self.stats["files_changed" if name in job.cache_old else "files_new"] += 1
                self._small_seen += st.st_size <= SMALL_FILE
                if self._small_seen == SMALL_POOL_PRESTART:
                    self._small_pool.prestart()
                if st.st_size <= SMALL_FILE and self._small_seen > SMALL_POOL_AFTER:
                    self._small.queue(path, e, job, name, st.st_size)
                else:
                    self._submit_file(path, st, e, job, name)
            return None
        if stat.S_ISDIR(mode):
            e = self._meta(name, st, "d")
            job.entries.append(e)
            self.stats["dirs"] += 1
            # a mount point, with -x or of a kernel-made filesystem (/proc, /sys ...): kept as an
            # empty directory and not read, unless it was named on the command line
            crossing = st.st_dev != root_dev and path not in self._named
            if crossing and (self.one_fs or self._mounts.get(path) in PSEUDO_FILESYSTEMS):
                e["st"] = self._store_tree([])
                return None
            if (self.excludes.exclude_caches or self.excludes.if_present) and path not in self._named:
                tag = self.excludes.tagged(path)
                if tag is not None:  # asked for: no event, like any other exclusion
                    e["st"] = self._store_tree([])  # kept as an empty directory
                    return None
            child = self._open_dir(path, e)
            if child is not None:
                child.dev = st.st_dev  # a path named on the command line is walked on its own filesystem
            return child
        if stat.S_ISLNK(mode):
            e = self._meta(name, st, "l")
            try:
                e["lt"] = deep_path.readlink(path)
            except OSError as exc:
                self.log.os_error("err", "readlink-failed", path, exc, "cannot read symlink; it is not in this backup")
                self.stats["errors"] += 1
                return None
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e = self._meta(name, st, "c" if stat.S_ISCHR(mode) else "b")
            e["dev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        else:
            e = self._meta(name, st, "p" if stat.S_ISFIFO(mode) else "s")
        # never opened (a fifo would block, a device act): xattrs by path, no inode flags
        meta, problems = path_meta(path)
        self._add_meta(e, meta, problems, path)
        job.entries.append(e)
        if linked:
            self._hardlinks.first_name(e, st, path, reading=False)
        return None

    def _unchanged_file(
        self, job: DirJob, name: bytes, path: bytes, st: os.stat_result, cached: tuple[list[bytes], dict[str, Any]]
    ) -> dict[str, Any]:
        """The entry of a regular file the files cache holds unchanged, added to ``job``."""
        e = self._meta(name, st, "f")
        e["sz"] = st.st_size
        e["c"] = cached[0]
        if cached[1]:
            self._add_meta(e, cached[1], [], path)
        job.entries.append(e)
        job.cache_new[name] = job.cache_old[name]
        return e

    def _open_dir(self, path: bytes, entry: dict[str, Any] | None) -> DirJob | None:
        """Start a directory: read its xattrs, ACL and flags into ``entry``, and list it."""
        job = DirJob(path, [], entry, self.cache.load_dir(path), events=len(self.log.events))
        names: list[bytes] = []
        try:
            if entry is not None:
                self._dir_meta(path, entry)
            # by path: listdir(fd) gives str names, and encoding them back costs more than a lookup
            names = sorted(deep_path.listdir(path))
        except OSError as exc:
            self.log.os_error(
                "err", "listdir-failed", path, exc, "cannot list directory; its contents are not in this backup"
            )
            self.stats["errors"] += 1
        job.names = deque(names)
        return job

    def _dir_meta(self, path: bytes, entry: dict[str, Any]) -> None:
        """A directory's xattrs, ACL and flags, through one descriptor (raises OSError if it
        cannot be opened)."""
        fd = deep_path.open(path, deep_path.READ_DIR)
        try:
            meta, problems = inode_meta(fd)
        finally:
            os.close(fd)
        self._add_meta(entry, meta, problems, path)

    # ------------------------------------------------------------------ trees
    def _store_tree(self, entries: list[dict[str, Any]]) -> bytes:
        cid = self.chunks.store_tree(entries)
        self.chunk_ids.add(cid)
        return cid

    def _fit(self, entries: list[dict[str, Any]], where: bytes) -> list[dict[str, Any]]:
        """The entries of directory ``where`` held to the tree rules (file_entry.fit_entries),
        an entry changed or left out logged as an error."""
        out, events = fit_entries(entries, where)
        if events:
            self._log_events(events)
        return out

    def _finish_dir(self, job: DirJob) -> None:
        if self._small.error is not None:
            raise self._small.error
        if job.whole is not None:
            self._finish_whole(job, job.whole)
            return
        if job.reuse is not None:
            subtrees = [e.get("st") for e in job.entries if e.get("t") == "d"]
            if subtrees == job.reuse.subtrees:  # nothing changed below either: its tree is the recorded one
                tid = job.reuse.tree
                self.chunks.reuse_tree(tid, job.reuse.totals)
                self.chunk_ids.add(tid)
                if job.parent_entry is not None:
                    job.parent_entry["st"] = tid
                self.stats["trees_reused"] += 1
                self.progress.dirs += 1
                return  # its files-cache row stays as it is
            self._build_deferred(job)
        entries = [e for e in job.entries if not e.pop("drop", False)]
        tid = self._store_tree(self._fit(entries, job.path))
        if job.parent_entry is not None:
            job.parent_entry["st"] = tid
        job.cache_new.pop(fc.TREE_KEY, None)
        if job.digest is not None and len(self.log.events) == job.events:  # nothing said of it
            named = [e.get("st") for e in entries if e.get("t") == "d"]
            below = [t for t in named if isinstance(t, bytes)]
            if len(below) == len(named):
                record_tree(job.cache_new, TreeRecord(job.digest, tid, below, self.chunks.tree_totals(tid)))
        self.cache.save_dir(job.path, job.cache_new)
        self.progress.dirs += 1

    def _whole_done(self, job: DirJob, result: DirResult | str) -> None:
        """A worker read ``job`` whole (the recording thread): its result, for _finish_whole."""
        job.whole_result = result

    def _finish_whole(self, job: DirJob, files: list[WholeFile]) -> None:
        """Finish a directory a worker read whole: store its tree, keep its files-cache row."""
        result, job.whole_result = job.whole_result, None
        if isinstance(result, tuple):
            data, totals, row, _, events, _ = result
            self._log_events(events)
            tid = self.chunks.store_encoded_tree(data, totals)
            self.cache.save_packed_dir(job.path, row)
        else:  # the worker failed: no file of it is in this backup (its tree says so)
            why = result or "the worker did not read it"
            prefix = job.path.rstrip(b"/") + b"/"
            self._log_events([("err", "read-failed", f"{why}; it is not in this backup", prefix + f[0]) for f in files])
            tid = self.chunks.store_tree([])
        self.chunk_ids.add(tid)
        if job.parent_entry is not None:
            job.parent_entry["st"] = tid
        self.progress.dirs += 1

    def _hand_whole(self, job: DirJob, children: list[Child]) -> None:
        """Hand ``job`` to a worker to be read whole (whole_dirs.py) if it qualifies: the
        workers are in use, and it holds only small files of one name none unchanged."""
        if self._small_seen <= SMALL_POOL_AFTER:
            return
        got = whole_files(children, job.cache_old, SMALL_FILE, SMALL_BATCH_BYTES)
        if got is None:
            return
        files, nbytes = got
        job.whole, job.stated = files, deque()
        changed = sum(1 for f in files if f[0] in job.cache_old) if job.cache_old else 0
        self.stats["files"] += len(files)
        self.stats["bytes"] += nbytes
        self.stats["files_changed"] += changed
        self.stats["files_new"] += len(files) - changed
        self._small_seen += len(files)
        self.progress.current = job.path
        # recorded for reuse only if nothing was logged of it (its xattrs, when it was opened)
        digest = job.digest if len(self.log.events) == job.events else None
        self._small.queue_dir(job, (job.path, files, digest), len(files), nbytes)

    def _prestat(self, job: DirJob) -> None:
        """List ``job``'s children with their lstat results ahead of the walk and, when nothing
        changed in them since its tree was recorded, defer every entry but the subdirectories'
        (tree_reuse.py)."""
        if self.atime or len(job.names) > PRESTAT_MAX:
            return
        pairs = self.excludes.kept(job.path.rstrip(b"/") + b"/", job.names)
        try:
            fd = deep_path.open(job.path, deep_path.READ_DIR)
        except OSError:
            return  # the walk lstats each child by its path and says what happened
        try:
            children = lstat_children(fd, pairs)
        finally:
            os.close(fd)
        job.names = deque(name for name, _ in pairs[len(children) :])  # from one it could not lstat
        job.stated = deque(children)
        if job.names or has_links(children):
            return
        job.digest = children_digest(job.dev, children, self._owners)
        d = deferral(job.cache_old, children, job.digest, self.writer.known, self.writer.index.locations)
        if d is None:
            self._hand_whole(job, children)
            return
        job.reuse = d.record
        job.deferred = [c for c in children if not stat.S_ISDIR(c[2].st_mode)]
        job.stated = deque(c for c in children if stat.S_ISDIR(c[2].st_mode))
        job.cache_new = dict(job.cache_old)
        self.chunk_ids.update(d.chunks)
        self.stats["files"] += d.files
        self.stats["files_unchanged"] += d.files
        self.stats["bytes"] += d.nbytes
        self.progress.files += d.files
        self.progress.nbytes += d.nbytes

    def _build_deferred(self, job: DirJob) -> None:
        """Build the entries a reusing directory deferred (its recorded tree does not fit after
        all, or a checkpoint needs its partial tree); they were counted when deferred."""
        deferred, job.deferred, job.reuse = job.deferred, [], None
        for name, path, st in deferred:
            if stat.S_ISREG(st.st_mode):
                cached = fc.lookup(job.cache_old, name, st)
                assert cached is not None  # a hit when deferred, and the record is unchanged since
                self._unchanged_file(job, name, path, st, cached)
            else:  # a symlink, device, fifo or socket: never descended into
                self._entry(job, name, path, st, job.dev)
        if deferred:
            job.entries.sort(key=lambda e: e["n"])

    def _drain(self, wait: bool) -> None:
        while self._ready:
            head = self._ready[0]
            if head.pending:
                if not wait:
                    return
                self._wait_for(head)
            self._ready.popleft()
            self._finish_dir(head)
        self._maybe_tick()

    def _wait_for(self, job: DirJob) -> None:
        """Wait until a directory's files are stored, still flushing old packs meanwhile."""
        self._small.submit()
        while job.pending:
            with self._bytes_cv:
                self._bytes_cv.wait(0.05)
            self._maybe_tick()

    def _maybe_tick(self) -> None:
        if self.stop is not None:
            self.stop()
        self._small.settle(record=True)
        now = time.monotonic()
        if now - self._last_tick >= 0.2:
            self._last_tick = now
            self.writer.persist_if_due()
            if self.tick:
                self.tick()
            if self.checkpoint:
                self.checkpoint()

    def halt(self) -> None:
        """Stop reading (main thread; the run is interrupted): reads in progress stop at their
        next chunk, queued files are dropped, batches of small files in flight are finished. The
        walk stays as it is, so :meth:`partial_root` then gives everything that was finished."""
        self.chunks.halt()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._small_pool.shutdown()
        self._small.close()
        self._small.settle(record=False)

    def partial_root(self) -> tuple[bytes | None, ChunkIdSet]:
        """The root tree of what is finished so far and the chunks it needs (main thread only)."""
        frames = [*self._wstack, *self._ready]
        for job in frames:
            if job.reuse is not None:
                self._build_deferred(job)
        root, chunks = partial_root(self._vframes, frames, self._root_entry, self.chunks.store_tree)
        # finished subtrees are named by their tree id alone: their files' chunks are in
        # chunk_ids (with those of files recorded since, which are stored too: harmless)
        with self._done_lock:
            return root, self.chunk_ids.union(chunks)

    def save_partial_cache(self) -> None:
        """Put the files-cache records of directories in progress into the cache (merged with
        the old ones), so a rerun after a kill skips every file stored so far."""
        for job in [*self._wstack, *self._ready]:
            if isinstance(job.whole_result, tuple):  # read whole, not finished yet
                rows = encoding.unpack(job.whole_result[2])
                rows.pop(fc.TREE_KEY, None)
                self.cache.save_dir(job.path, {**job.cache_old, **rows})
            elif job.cache_new:
                self.cache.save_dir(job.path, {**job.cache_old, **job.cache_new})
        self.cache.flush()
        self.partial_files.save()

    # ------------------------------------------------------------------ walking
    def _walk(self, first: DirJob, root_dev: int) -> None:
        """Post-order walk below ``first`` (iterative: depth is unbounded)."""
        if first.dev < 0:
            first.dev = root_dev
        stack = self._wstack = [first]
        self._prestat(first)
        while stack:
            job = stack[-1]
            if job.stated:
                name, path, st = job.stated.popleft()
            elif job.names:
                name = job.names.popleft()
                path = job.path.rstrip(b"/") + b"/" + name
                if self.excludes.excluded(path, name):
                    continue
                try:
                    st = deep_path.lstat(path)
                except FileNotFoundError:
                    self.log.add("note", "vanished", "item vanished before it could be read", path)
                    continue
                except OSError as exc:
                    self.log.os_error("err", "stat-failed", path, exc, "cannot stat; it is not in this backup")
                    self.stats["errors"] += 1
                    continue
            else:
                stack.pop()
                self._ready.append(job)
                self._drain(wait=False)
                continue
            self.progress.current = path
            child = self._entry(job, name, path, st, job.dev)
            if child is not None:
                stack.append(child)
                self._prestat(child)
            self._maybe_tick()

    def run(self, paths: list[str]) -> ArchiveResult:
        """Back up ``paths``; the root tree mirrors their absolute locations (like /home/u/x)."""
        t0 = time.monotonic()
        deep_path.forget()  # directories cached by an earlier run in this process may be gone
        try:
            root = self._build_root([os.fsencode(os.path.abspath(p)) for p in paths])
            self.partial_files.save()  # forget the resume records of the files read to the end
        finally:  # on an exception (a second signal) the files not read yet are dropped
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._small_pool.shutdown()
            self._small.close()
        self.stats["duration_ms"] = int((time.monotonic() - t0) * 1000)
        self.stats.update(self.chunks.tree_stats(root))
        return ArchiveResult(root, self.chunk_ids, self.stats)

    def _build_root(self, paths: list[bytes]) -> bytes:
        # Paths inside another given path are reached by its walk; with --one-file-system they
        # are still crossed into when they are mount points (`backup --one-file-system / /boot`).
        self._named = {b"/" + b"/".join(c for c in p.split(b"/") if c) for p in paths}
        # Nested dict of path components; None marks a path given on the command line.
        spec: dict[bytes, Any] = {}
        for p in sorted(set(paths)):
            parts = [c for c in p.split(b"/") if c]
            if not parts:  # "/" itself: the root tree is the real root directory
                e: dict[str, Any] = {}
                self._root_entry = e
                job = self._open_dir(b"/", e)
                assert job is not None
                self._walk(job, os.lstat(b"/").st_dev)
                self._drain(wait=True)
                return bytes(e["st"])
            node = spec
            for c in parts[:-1]:
                nxt = node.setdefault(c, {})
                if nxt is None:
                    break  # an ancestor is itself backed up whole
                node = nxt
            else:
                node[parts[-1]] = None
        return self._virtual_dir(b"", spec)

    def _virtual_dir(self, path: bytes, spec: dict[bytes, Any]) -> bytes:
        """The tree of an ancestor of the given paths: only the named children are included."""
        entries: list[dict[str, Any]] = []
        holder = DirJob(path or b"/", [], None, self.cache.load_dir(path or b"/"))
        frame = VirtualFrame(entries, holder)
        self._vframes.append(frame)
        try:
            return self._virtual_children(path, spec, entries, holder, frame)
        finally:
            self._vframes.pop()

    def _virtual_children(
        self, path: bytes, spec: dict[bytes, Any], entries: list[dict[str, Any]], holder: DirJob, frame: VirtualFrame
    ) -> bytes:
        for name, sub in sorted(spec.items()):
            full = path + b"/" + name
            try:
                st = deep_path.lstat(full)
            except OSError as exc:
                self.log.os_error("err", "source-missing", full, exc, "cannot back up this path")
                self.stats["errors"] += 1
                continue
            if sub is not None and stat.S_ISDIR(st.st_mode):
                e = self._meta(name, st, "d")
                try:
                    self._dir_meta(full, e)
                except OSError as exc:
                    self.log.os_error("warn", "metadata-unreadable", full, exc, "directory xattrs and flags not read")
                frame.current = e
                e["st"] = self._virtual_dir(full, sub)
                frame.current = None
                entries.append(e)
                continue
            child = self._entry(holder, name, full, st, st.st_dev)
            if child is not None:
                self._walk(child, st.st_dev)
        self._drain(wait=True)
        self._wait_for(holder)
        # keep the records of siblings not backed up this time (another run may name them)
        merged = dict(holder.cache_old)
        merged.update(holder.cache_new)
        self.cache.save_dir(holder.path, merged)
        entries += [e for e in holder.entries if not e.pop("drop", False)]
        return self._store_tree(self._fit(entries, path or b"/"))
