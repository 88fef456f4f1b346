"""Worker processes for small files.

Reading, hashing, compressing and encrypting a 2 KiB file is mostly Python glue and short calls
that each drop and retake the GIL; in threads that degenerates into GIL ping-pong. So batches of
small files go to worker processes (one GIL each). Each worker also wraps the blob keys under a
key group of its own and returns a batch's blobs as one run (repo/grouped_pack.py): chunk ids
and trailer rows, and the blobs' bytes in one piece; the main process only deduplicates and
appends runs to packs.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from bunker.backup.chunker import cut, make_cdc
from bunker.backup.file_reader import At, ReadOutcome, read_all, read_simple, read_stable
from bunker.backup.owners import OwnerNames
from bunker.backup.whole_dirs import DirResult, WholeDir, build_dir
from bunker.crypto.derive import PutSecrets
from bunker.crypto.kem import DataPublicKey
from bunker.fs.fsmeta import DataReader
from bunker.repo import blob
from bunker.repo.grouped_pack import GroupRun, GroupRunBuilder
from bunker.repo.pack import KeyGroup

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from pyfastcdc import FastCDC

# (chunk id, blob bytes, raw length, K_blob)
Blob = tuple[bytes, bytes | bytearray, int, bytes]
# what a batch gives: each file's outcome as a plain tuple (a named tuple is pickled through a
# Python call each: 1.8 against 0.4 µs), and the blobs of all its files
BatchResult = tuple[list[tuple[Any, ...]], GroupRun]
# what a batch of whole directories gives (whole_dirs.py): each one's result, and all their blobs
DirsResult = tuple[list[DirResult], GroupRun]

WORKER_MODULE = "bunker.backup.small_files"  # what the workers' forkserver imports
_secrets: PutSecrets | None = None
_cdc: FastCDC | None = None
_group: KeyGroup | None = None
_owners = OwnerNames()  # user and group names, looked up once per worker


def _init(secret: bytes, chunker: dict[str, int], data_public: DataPublicKey) -> None:
    global _secrets, _cdc, _group
    _secrets = PutSecrets(secret)
    _cdc = make_cdc(chunker, _secrets)
    _group = KeyGroup(_secrets, data_public)  # one for the worker's life: one sealed key per pack


class _Encryptor:
    """The ``consume`` step of one file: chunk, hash and encrypt, keeping the blobs that
    ``known`` (the batch so far) does not hold."""

    def __init__(self, secrets: PutSecrets, cdc: FastCDC, known: GroupRunBuilder) -> None:
        self.secrets, self.cdc, self.known = secrets, cdc, known
        self.blobs: list[Blob] = []

    def __call__(self, fd: int, size: int, holes: list[int]) -> tuple[list[bytes], int]:
        data = DataReader(fd, size, holes).read_all() if holes else read_all(fd, size)
        return self.take(data), len(data)

    def take(self, data: bytes) -> list[bytes]:
        """The chunk ids of a file's content, its new blobs kept in :attr:`blobs`."""
        self.blobs = []  # a re-read starts afresh
        seen: set[bytes] = set()
        ids = []
        for piece in cut(self.cdc, data):
            cid = blob.chunk_id(self.secrets, piece)
            ids.append(cid)
            if cid not in seen and cid not in self.known:
                seen.add(cid)
                ct, k = blob.encrypt_blob(self.secrets, cid, piece)
                self.blobs.append((cid, ct, len(piece), k))
        return ids


def _read_one(path: bytes, enc: _Encryptor, run: GroupRunBuilder, at: At = None) -> ReadOutcome:
    """Read and encrypt one file, its new blobs added to ``run`` if it is stored."""
    enc.blobs = []
    outcome = read_simple(path, enc.take, at) or read_stable(path, enc, at)
    if outcome.status in ("ok", "changing"):
        for b in enc.blobs:
            run.add(*b)
    return outcome


def read_batch(paths: list[bytes]) -> BatchResult:
    """Read and encrypt each file of a batch (runs in a worker process)."""
    assert _secrets is not None and _cdc is not None and _group is not None
    run = GroupRunBuilder(_group)
    enc = _Encryptor(_secrets, _cdc, run)
    outcomes = [tuple(_read_one(path, enc, run)) for path in paths]
    return outcomes, run.take()


def read_dirs(dirs: list[WholeDir]) -> DirsResult:
    """Read each directory of a batch whole and build its tree (runs in a worker process)."""
    assert _secrets is not None and _cdc is not None and _group is not None
    secrets = _secrets
    run = GroupRunBuilder(_group)
    enc = _Encryptor(secrets, _cdc, run)

    def read(path: bytes, at: At) -> ReadOutcome:
        return _read_one(path, enc, run, at)

    def tree_id(data: bytes) -> bytes:
        return blob.chunk_id(secrets, data)

    return [build_dir(d, read, tree_id, _owners) for d in dirs], run.take()


def outcomes_of(result: BatchResult) -> list[ReadOutcome]:
    """The files' outcomes of a batch's result (:func:`read_batch`)."""
    return [ReadOutcome._make(o) for o in result[0]]


class SmallFilePool:
    """A process pool started on first use (its start-up costs ~0.2 s, worth it only for many files)."""

    def __init__(
        self, secrets: PutSecrets, chunker: dict[str, int], data_public: DataPublicKey, workers: int | None = None
    ) -> None:
        self._args = (secrets.secret, dict(chunker), data_public)
        self._workers = workers or os.cpu_count() or 2
        self._pool: ProcessPoolExecutor | None = None
        self._prestarted = False

    def prestart(self) -> None:
        """Start the workers' forkserver now, beside the walk (process_pool.prestart): the
        first batch then finds it ready instead of waiting while it imports."""
        if self._pool is None and not self._prestarted:
            from bunker.process_pool import prestart

            prestart(WORKER_MODULE)
            self._prestarted = True

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # (multiprocessing is loaded with the first batch: a run that reads no small file, like
            # most runs over unchanged files, does without it)
            from bunker.process_pool import process_pool

            self._pool = process_pool(self._workers, WORKER_MODULE, _init, self._args)
        return self._pool

    def submit(self, paths: list[bytes]) -> Future[BatchResult]:
        return self._start().submit(read_batch, paths)

    def submit_dirs(self, dirs: list[WholeDir]) -> Future[DirsResult]:
        return self._start().submit(read_dirs, dirs)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
