"""Batches of small files for the worker processes of small_files.py.

Once a run has met many small files, the archiver hands each changed one to :class:`SmallBatches`
rather than to its reading threads. Files are gathered into batches so that a round trip to a
worker process is paid once per batch, not per file; only a few batches per worker are in flight,
so the walk cannot run far ahead of the workers. A finished batch's blobs are stored and its
outcomes recorded on a thread of its own. Directories read whole (whole_dirs.py) go in batches
of their own, under the same limits.

The archiver owns one :class:`SmallBatches` per run and hands it what it shares: the lock over
the directories' pending counts, a way to wake its main thread, the progress counters and the
function that records a read's outcome; this module does not know the archiver.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Future
from typing import Any, Generic, Protocol, TypeVar

from bunker.backup.file_reader import ReadOutcome
from bunker.backup.small_files import SmallFilePool, outcomes_of
from bunker.backup.whole_dirs import DirResult, WholeDir
from bunker.repo.session_writer import SessionWriter

SMALL_BATCH_FILES = 256
# a worker holds a batch's blobs twice (as it builds them, then pickled) and the main process
# receives them whole: 2 MiB batches took the mixed backup's process tree from 134-137 to
# 110-116 MB at the same speed as 4 MiB ones (docs/performance.md)
SMALL_BATCH_BYTES = 2 << 20
SLOTS_PER_WORKER = 4


class _Job(Protocol):
    """What is used of the archiver's directory in progress."""

    pending: int


class _Progress(Protocol):
    files: int
    nbytes: int


J = TypeVar("J", bound=_Job)
# a file queued: its path, entry, directory, name and size
FileItem = tuple[bytes, dict[str, Any], J, bytes, int]
# a directory queued whole: its job, what the worker is handed, its files and bytes
DirItem = tuple[J, WholeDir, int, int]


class SmallBatches(Generic[J]):
    """Small files on their way through the worker processes.

    :meth:`queue` and :meth:`submit` run on the walking thread; a batch's outcomes are recorded
    on a recording thread of this object's own, which :meth:`close` ends. An exception there
    cannot propagate: it is kept in :attr:`error` for the walking thread to raise.
    """

    def __init__(
        self,
        pool: SmallFilePool,
        writer: SessionWriter,
        workers: int | None,
        lock: threading.Lock,
        wake: Callable[[], None],
        progress: _Progress,
        record: Callable[[ReadOutcome, bytes, dict[str, Any], J, bytes, bool], None],
        add_ids: Callable[[list[bytes]], None],
        waiting: Callable[[], None] = lambda: None,
        record_dir: Callable[[J, DirResult | str], None] = lambda job, result: None,
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._lock = lock  # guards the directories' pending counts and the progress files count
        self._wake = wake  # tells the walking thread a count went down
        self._progress = progress
        self._record = record  # (outcome, path, entry, job, name, whether its chunk ids were added already)
        self._add_ids = add_ids  # adds chunk ids to the snapshot's
        self._waiting = waiting  # called while the walking thread waits for a slot (lease, checkpoints)
        self._record_dir = record_dir  # (job, its result or why the worker failed)
        self._batch: list[FileItem[J]] = []
        self._batch_bytes = 0
        self._dirs: list[DirItem[J]] = []
        self._dirs_files = self._dirs_bytes = 0
        # batches in flight: a slot is held from the walk until the batch's outcomes are
        # recorded here, so results waiting for this process's GIL hold slots too. Two per
        # worker left the workers idle while finished batches waited: a `many` backup used
        # 1.61-1.68 of 2 cores with two per worker, 1.68-1.72 with four (docs/performance.md)
        self._slots = threading.BoundedSemaphore(SLOTS_PER_WORKER * (workers or os.cpu_count() or 2) + 2)
        self.error: BaseException | None = None
        # Finished batches are recorded on a thread of their own, not on the pool's thread that
        # reads results: that thread also hands the workers their next batches, and while it
        # stored a batch's blobs (2 MiB) the other worker's result waited in the pipe and the
        # workers sat between batches. `mixed` backup: workers busy 70-72 % -> 77-80 % of the
        # small-file phase (docs/performance.md)
        self._finished: queue.SimpleQueue[tuple[Future[Any], list[Any], bool] | None] = queue.SimpleQueue()
        self._recorder: threading.Thread | None = None
        # batches whose worker process died, for the walking thread to record (settle): a
        # SIGTERM to the whole process group (`systemctl stop`) kills the workers as it stops
        # the run, and those files are then simply left out, not failures to report
        self._broken: list[tuple[list[Any], bool, BaseException]] = []  # (batch, of directories?, why)

    def queue(self, path: bytes, entry: dict[str, Any], job: J, name: bytes, size: int) -> None:
        """Add a file (``entry`` in ``job``) to the current batch; submit the batch once full."""
        with self._lock:
            job.pending += 1
        if self._dirs:
            self._submit_dirs()  # see queue_dir
        self._batch.append((path, entry, job, name, size))
        self._batch_bytes += size
        if len(self._batch) >= SMALL_BATCH_FILES or self._batch_bytes >= SMALL_BATCH_BYTES:
            self._submit_files()

    def queue_dir(self, job: J, whole: WholeDir, files: int, nbytes: int) -> None:
        """Add a directory to be read whole to the current batch of directories; submit it once full."""
        with self._lock:
            job.pending += 1
        if self._batch:
            # the walk went from files to whole directories: a batch of files left waiting for
            # more would hold its directory unfinished, and every directory finished after it
            # (they are finished in order) until the run's end (a `many` backup's main process
            # held ~90 MB more so)
            self._submit_files()
        self._dirs.append((job, whole, files, nbytes))
        self._dirs_files += files
        self._dirs_bytes += nbytes
        if self._dirs_files >= SMALL_BATCH_FILES or self._dirs_bytes >= SMALL_BATCH_BYTES:
            self._submit_dirs()

    def submit(self) -> None:
        """Send the current batches to the workers, even if not full (waits for free slots)."""
        self._submit_files()
        self._submit_dirs()

    def _submit_files(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._send(batch, False, lambda: self._pool.submit([b[0] for b in batch]))

    def _submit_dirs(self) -> None:
        if self._dirs:
            dirs, self._dirs, self._dirs_files, self._dirs_bytes = self._dirs, [], 0, 0
            self._send(dirs, True, lambda: self._pool.submit_dirs([d[1] for d in dirs]))

    def _send(self, batch: list[Any], of_dirs: bool, submit: Callable[[], Future[Any]]) -> None:
        while not self._slots.acquire(timeout=0.2):
            self._waiting()
        try:
            fut = submit()
        except BrokenExecutor as exc:  # (a BrokenProcessPool: its module loads with the pool)
            self._slots.release()
            with self._lock:
                self._broken.append((batch, of_dirs, exc))
            return
        if self._recorder is None:
            self._recorder = threading.Thread(target=self._record_finished, name="bunker-record", daemon=True)
            self._recorder.start()
        fut.add_done_callback(lambda f: self._finished.put((f, batch, of_dirs)))

    def _record_finished(self) -> None:
        """The recording thread: each finished batch in turn, until :meth:`close`."""
        while (item := self._finished.get()) is not None:
            self._done(*item)

    def close(self) -> None:
        """Wait until every batch handed back is recorded (call it once the pool is shut down:
        a cancelled batch is handed back as it is cancelled)."""
        if self._recorder is not None:
            self._finished.put(None)
            self._recorder.join()
            self._recorder = None

    def settle(self, record: bool) -> None:
        """On the walking thread: the files of batches whose worker process died are recorded
        as failed, or with ``record`` False (the run is halting) just left out."""
        with self._lock:
            broken, self._broken = self._broken, []
        for batch, of_dirs, exc in broken:
            if of_dirs:
                if record:
                    for job, _, _, _ in batch:
                        self._record_dir(job, f"worker failed: {exc}")
                self._finish_dirs(batch)
                continue
            if record:
                failed = ReadOutcome("error", [], message=f"worker failed: {exc}")
                for path, entry, job, name, _ in batch:
                    self._record(failed, path, entry, job, name, False)
            self._finish(batch)

    def _done(self, fut: Future[Any], batch: list[Any], of_dirs: bool) -> None:
        """Record a finished batch (of files, or ``of_dirs``): its blobs first, then what it gave."""
        finish = self._finish_dirs if of_dirs else self._finish
        try:
            if fut.cancelled():  # a halted run: these are left out (their entries hold no content)
                finish(batch)
                return
            results: list[Any]
            try:
                result = fut.result()
                run = result[1]
                results = result[0] if of_dirs else outcomes_of(result)
            except BrokenExecutor as exc:  # (a BrokenProcessPool: its module loads with the pool)
                with self._lock:
                    self._broken.append((batch, of_dirs, exc))
                return
            except Exception as exc:  # noqa: BLE001 - a dead worker must not lose the run
                why = f"worker failed: {exc}"
                results, run = [why if of_dirs else ReadOutcome("error", [], message=why)] * len(batch), None
            if run is not None and not self._store(run):
                finish(batch)
                return
            try:
                record: Callable[[list[Any], list[Any]], None] = self._record_dirs if of_dirs else self._record_files
                record(batch, results)
            except BaseException as exc:  # noqa: BLE001 - the walking thread raises it
                self.error = exc
            finally:
                finish(batch)
        finally:
            self._slots.release()
            self._wake()

    def _record_files(self, batch: list[FileItem[J]], outcomes: list[ReadOutcome]) -> None:
        # the snapshot's chunk ids first, all at once, then the entries that name them
        self._add_ids([cid for o in outcomes if o.status in ("ok", "changing") for cid in o.chunks])
        for (path, entry, job, name, _), outcome in zip(batch, outcomes, strict=True):
            self._record(outcome, path, entry, job, name, True)
            self._progress.nbytes += outcome.size

    def _record_dirs(self, batch: list[DirItem[J]], results: list[DirResult | str]) -> None:
        self._add_ids([cid for r in results if not isinstance(r, str) for cid in r[3]])
        for (job, _, _, _), result in zip(batch, results, strict=True):
            self._record_dir(job, result)
            if not isinstance(result, str):
                self._progress.nbytes += result[5]

    def _store(self, run: Any) -> bool:
        """Store a batch's blobs, before any entry that names them is recorded; False (the
        error kept for the walking thread) if that failed."""
        try:
            self._writer.store_run(run)
        except BaseException as exc:  # noqa: BLE001 - the walking thread raises it
            self.error = exc
            return False
        return True

    def _finish(self, batch: list[FileItem[J]]) -> None:
        """The batch's files are done (recorded or left out): one lock for all of them."""
        with self._lock:
            for _, _, job, _, _ in batch:
                job.pending -= 1
            self._progress.files += len(batch)

    def _finish_dirs(self, batch: list[DirItem[J]]) -> None:
        """The batch's directories are done (recorded or left out)."""
        with self._lock:
            for job, _, files, _ in batch:
                job.pending -= 1
                self._progress.files += files
