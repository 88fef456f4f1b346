"""Batches of small files for the worker processes of small_files.py.

Once a run has met many small files, the archiver hands each changed one to :class:`SmallBatches`
rather than to its reading threads. Files are gathered into batches so that a round trip to a
worker process is paid once per batch, not per file; only a few batches per worker are in flight,
so the walk cannot run far ahead of the workers. A finished batch's blobs are stored and its
outcomes recorded on a thread of its own.

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
from bunker.backup.small_files import BatchResult, SmallFilePool, outcomes_of
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
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._lock = lock  # guards the directories' pending counts and the progress files count
        self._wake = wake  # tells the walking thread a count went down
        self._progress = progress
        self._record = record  # (outcome, path, entry, job, name, whether its chunk ids were added already)
        self._add_ids = add_ids  # adds chunk ids to the snapshot's
        self._waiting = waiting  # called while the walking thread waits for a slot (lease, checkpoints)
        self._batch: list[tuple[bytes, dict[str, Any], J, bytes, int]] = []
        self._batch_bytes = 0
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
        self._finished: queue.SimpleQueue[tuple[Future[BatchResult], list[Any]] | None] = queue.SimpleQueue()
        self._recorder: threading.Thread | None = None
        # batches whose worker process died, for the walking thread to record (settle): a
        # SIGTERM to the whole process group (`systemctl stop`) kills the workers as it stops
        # the run, and those files are then simply left out, not failures to report
        self._broken: list[tuple[list[tuple[bytes, dict[str, Any], J, bytes, int]], BaseException]] = []

    def queue(self, path: bytes, entry: dict[str, Any], job: J, name: bytes, size: int) -> None:
        """Add a file (``entry`` in ``job``) to the current batch; submit the batch once full."""
        with self._lock:
            job.pending += 1
        self._batch.append((path, entry, job, name, size))
        self._batch_bytes += size
        if len(self._batch) >= SMALL_BATCH_FILES or self._batch_bytes >= SMALL_BATCH_BYTES:
            self.submit()

    def submit(self) -> None:
        """Send the current batch to the workers, even if not full (waits for a free slot)."""
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        while not self._slots.acquire(timeout=0.2):
            self._waiting()
        try:
            fut = self._pool.submit([b[0] for b in batch])
        except BrokenExecutor as exc:  # (a BrokenProcessPool: its module loads with the pool)
            self._slots.release()
            with self._lock:
                self._broken.append((batch, exc))
            return
        if self._recorder is None:
            self._recorder = threading.Thread(target=self._record_finished, name="bunker-record", daemon=True)
            self._recorder.start()
        fut.add_done_callback(lambda f: self._finished.put((f, batch)))

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
        for batch, exc in broken:
            if record:
                failed = ReadOutcome("error", [], message=f"worker failed: {exc}")
                for path, entry, job, name, _ in batch:
                    self._record(failed, path, entry, job, name, False)
            self._finish(batch)

    def _done(
        self,
        fut: Future[BatchResult],
        batch: list[tuple[bytes, dict[str, Any], J, bytes, int]],
    ) -> None:
        try:
            if fut.cancelled():  # a halted run: these files are left out (their entries hold no content)
                self._finish(batch)
                return
            try:
                result = fut.result()
                outcomes, run = outcomes_of(result), result[1]
            except BrokenExecutor as exc:  # (a BrokenProcessPool: its module loads with the pool)
                with self._lock:
                    self._broken.append((batch, exc))
                return
            except Exception as exc:  # noqa: BLE001 - a dead worker must not lose the run
                outcomes, run = [ReadOutcome("error", [], message=f"worker failed: {exc}")] * len(batch), None
            if run is not None:
                try:
                    self._writer.store_run(run)  # before any file that names its chunks is recorded
                except BaseException as exc:  # noqa: BLE001 - the walking thread raises it
                    self.error = exc
                    self._finish(batch)
                    return
            # the snapshot's chunk ids first, all at once, then the entries that name them
            self._add_ids([cid for o in outcomes if o.status in ("ok", "changing") for cid in o.chunks])
            try:
                for (path, entry, job, name, _), outcome in zip(batch, outcomes, strict=True):
                    self._record(outcome, path, entry, job, name, True)
                    self._progress.nbytes += outcome.size
            except BaseException as exc:  # noqa: BLE001 - the walking thread raises it
                self.error = exc
            finally:
                self._finish(batch)
        finally:
            self._slots.release()
            self._wake()

    def _finish(self, batch: list[tuple[bytes, dict[str, Any], J, bytes, int]]) -> None:
        """The batch's files are done (recorded or left out): one lock for all of them."""
        with self._lock:
            for _, _, job, _, _ in batch:
                job.pending -= 1
            self._progress.files += len(batch)
