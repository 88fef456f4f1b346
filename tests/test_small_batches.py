"""Batches of small files: where their outcomes are recorded, and that nothing is left pending.

The worker processes are stood in for by a thread pool that returns each batch's outcomes (the
batches themselves, the slots, the recording thread and close are the real ones): what is
tested is the hand-over, not the reading, which tests/test_small_file_paths.py covers.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from bunker.backup.file_reader import ReadOutcome
from bunker.backup.small_batches import SMALL_BATCH_FILES, SmallBatches


@dataclass
class _Job:
    pending: int = 0


@dataclass
class _Progress:
    files: int = 0
    nbytes: int = 0


class _Pool:
    """One thread that answers each batch once ``gate`` is set, each file read whole."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.threads = ThreadPoolExecutor(1, thread_name_prefix="pool")

    def submit(self, paths: list[bytes]) -> Future[Any]:
        def read() -> tuple[list[tuple[Any, ...]], None]:
            self.started.set()
            assert self.gate.wait(30)
            return [tuple(ReadOutcome("ok", [p], 1, len(p))) for p in paths], None

        return self.threads.submit(read)

    def submit_dirs(self, dirs: list[Any]) -> Future[Any]:
        def read() -> tuple[list[Any], None]:
            assert self.gate.wait(30)
            return [(b"tree", (1, 1, 1), b"row", [d[0]], [], 1) for d in dirs], None

        return self.threads.submit(read)


def _batches(
    pool: _Pool, recorded: list[tuple[bytes, str]], dirs: list[Any] | None = None
) -> tuple[SmallBatches[_Job], _Progress]:
    def record(outcome: ReadOutcome, path: bytes, entry: dict[str, Any], job: _Job, name: bytes, ids: bool) -> None:
        recorded.append((path, threading.current_thread().name))

    progress = _Progress()
    batches: SmallBatches[_Job] = SmallBatches(
        pool,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # no blobs come back, so nothing is stored
        1,
        threading.Lock(),
        lambda: None,
        progress,
        record,
        lambda ids: None,
        record_dir=lambda job, result: (dirs if dirs is not None else []).append(result),
    )
    return batches, progress


def test_outcomes_are_recorded_on_the_recording_thread_and_close_waits_for_them() -> None:
    pool, recorded = _Pool(), []
    batches, progress = _batches(pool, recorded)
    job = _Job()
    files = 2 * SMALL_BATCH_FILES + 88
    for i in range(files):
        batches.queue(b"f%d" % i, {}, job, b"n", 10)
    batches.submit()
    assert job.pending == files and recorded == []
    pool.gate.set()
    pool.threads.shutdown(wait=True)  # every batch answered: its callback has run
    batches.close()
    assert job.pending == 0 and progress.files == files
    assert sorted(p for p, _ in recorded) == sorted(b"f%d" % i for i in range(files))
    # not on the thread that hands results back (for worker processes: the one that also hands
    # the workers their next batches)
    assert {t for _, t in recorded} == {"bunker-record"}
    batches.close()  # a second close is harmless


def test_a_cancelled_batch_is_finished_without_being_recorded() -> None:
    pool, recorded = _Pool(), []
    batches, progress = _batches(pool, recorded)
    job = _Job()
    for i in range(3 * SMALL_BATCH_FILES):
        batches.queue(b"f%d" % i, {}, job, b"n", 10)
    # the first batch is being read, the two others wait: a halted run cancels those
    assert pool.started.wait(30)
    pool.threads.shutdown(wait=False, cancel_futures=True)
    pool.gate.set()
    pool.threads.shutdown(wait=True)
    batches.close()
    assert job.pending == 0 and progress.files == 3 * SMALL_BATCH_FILES
    assert len(recorded) == SMALL_BATCH_FILES


def test_a_batch_of_one_kind_is_sent_when_the_walk_turns_to_the_other() -> None:
    """Directories are finished in order: a batch of files left waiting for more while the walk
    hands over whole directories would hold its directory, and every one after it, unfinished."""
    pool, recorded, dirs = _Pool(), [], []
    batches, progress = _batches(pool, recorded, dirs)
    pool.gate.set()
    first, second, third = _Job(), _Job(), _Job()
    batches.queue(b"f0", {}, first, b"n", 10)
    batches.queue_dir(second, (b"/d", [], None), 5, 50)  # sends the one file
    batches.queue(b"f1", {}, third, b"n", 10)  # sends the one directory
    for _ in range(300):
        if not first.pending and not second.pending:
            break
        threading.Event().wait(0.01)
    assert first.pending == 0 and second.pending == 0 and third.pending == 1
    assert [p for p, _ in recorded] == [b"f0"] and [r[3] for r in dirs] == [[b"/d"]]
    batches.submit()
    pool.threads.shutdown(wait=True)
    batches.close()
    assert third.pending == 0 and progress.files == 1 + 5 + 1 and progress.nbytes == 2 + 1 + 2


def test_directories_of_a_dead_pool_are_recorded_as_failed_or_left_out() -> None:
    class _DeadPool(_Pool):
        def submit_dirs(self, dirs: list[Any]) -> Future[Any]:
            raise BrokenProcessPool("a worker died")

    for record in (True, False):  # (False: the run is halting)
        pool, recorded, dirs = _DeadPool(), [], []
        batches, progress = _batches(pool, recorded, dirs)
        job = _Job()
        batches.queue_dir(job, (b"/d", [], None), 3, 30)
        batches.submit()
        assert job.pending == 1  # until the walking thread settles it
        batches.settle(record=record)
        assert job.pending == 0 and progress.files == 3
        assert dirs == (["worker failed: a worker died"] if record else [])
        pool.threads.shutdown(wait=True)
        batches.close()
