"""Worker processes for small files.

Reading, hashing, compressing and encrypting a 2 KiB file is mostly Python glue and short calls
that each drop and retake the GIL; in threads that degenerates into GIL ping-pong. So batches of
small files go to worker processes (one GIL each), which return chunk ids and encrypted blobs; the
main process only deduplicates and appends the blobs to packs.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor

from pyfastcdc import FastCDC

from bunker.backup.chunker import cut, make_cdc
from bunker.backup.file_reader import ReadOutcome, read_all, read_stable
from bunker.crypto.derive import PutSecrets
from bunker.fs.fsmeta import DataReader
from bunker.process_pool import process_pool
from bunker.repo import blob

# (chunk id, blob bytes, raw length, K_blob)
Blob = tuple[bytes, bytearray, int, bytes]

_secrets: PutSecrets | None = None
_cdc: FastCDC | None = None


def _init(secret: bytes, chunker: dict[str, int]) -> None:
    global _secrets, _cdc
    _secrets = PutSecrets(secret)
    _cdc = make_cdc(chunker, _secrets)


class _Encryptor:
    """The ``consume`` step of one file: chunk, hash and encrypt, keeping the blobs."""

    def __init__(self, secrets: PutSecrets, cdc: FastCDC) -> None:
        self.secrets, self.cdc = secrets, cdc
        self.blobs: list[Blob] = []

    def __call__(self, fd: int, size: int, holes: list[int]) -> tuple[list[bytes], int]:
        self.blobs = []  # a re-read starts afresh
        seen: set[bytes] = set()
        data = DataReader(fd, size, holes).read_all() if holes else read_all(fd, size)
        ids = []
        for piece in cut(self.cdc, data):
            cid = blob.chunk_id(self.secrets, piece)
            ids.append(cid)
            if cid not in seen:
                seen.add(cid)
                ct, k = blob.encrypt_blob(self.secrets, cid, piece)
                self.blobs.append((cid, ct, len(piece), k))
        return ids, len(data)


def read_batch(paths: list[bytes]) -> list[tuple[ReadOutcome, list[Blob]]]:
    """Read and encrypt each file of a batch (runs in a worker process)."""
    assert _secrets is not None and _cdc is not None
    enc = _Encryptor(_secrets, _cdc)
    out = []
    for path in paths:
        enc.blobs = []
        outcome = read_stable(path, enc)
        out.append((outcome, enc.blobs if outcome.status in ("ok", "changing") else []))
    return out


class SmallFilePool:
    """A process pool started on first use (its start-up costs ~0.2 s, worth it only for many files)."""

    def __init__(self, secrets: PutSecrets, chunker: dict[str, int], workers: int | None = None) -> None:
        self._args = (secrets.secret, dict(chunker))
        self._workers = workers or os.cpu_count() or 2
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, paths: list[bytes]) -> Future[list[tuple[ReadOutcome, list[Blob]]]]:
        if self._pool is None:
            self._pool = process_pool(self._workers, "bunker.backup.small_files", _init, self._args)
        return self._pool.submit(read_batch, paths)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
