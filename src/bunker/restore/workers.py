"""Worker processes that write small restored files (see small_files.py for why processes)."""

from __future__ import annotations

import functools
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from bunker.crypto.derive import PutSecrets
from bunker.fs import deep_path
from bunker.process_pool import process_pool
from bunker.repo.blob_reader import BlobRef, fetch_blob, open_blob, prefetch_blobs
from bunker.restore.file_writer import Piece, WriteResult, apply_meta, write_file
from bunker.storage import Backend, open_backend

# (path, pieces, metadata entry without its chunk list, parent directory created by this restore)
Item = tuple[bytes, list[Piece], dict[str, Any], bool]

_backend: Backend | None = None
_secrets: PutSecrets | None = None
_as_root = False
_numeric = False


def _init(
    url: str, secret: bytes, as_root: bool, numeric_owner: bool, target: bytes, target_id: tuple[int, int]
) -> None:
    global _backend, _secrets, _as_root, _numeric
    # the same directory the restore confined itself to (refused if it was replaced since)
    deep_path.confine(target, target_id)
    _backend = open_backend(url)
    _secrets = PutSecrets(secret)
    _as_root, _numeric = as_root, numeric_owner


# What a batch sends back: the files written whole without a note (counted, with their bytes),
# and the result of every other one by its place in the batch. Most files of a restore are the
# former, and a result for each would cost the main process a decoding and a callback per file.
BatchResult = tuple[int, int, list[tuple[int, WriteResult]]]


def wire_items(items: list[Item]) -> list[Item]:
    """A batch as it is sent to a worker: each located blob as a plain tuple (a named tuple
    costs pickle several times as much: the worker makes them BlobRefs again)."""
    return [
        (path, [tuple(p) if type(p) is BlobRef else p for p in pieces], entry, fresh)  # type: ignore[misc]
        for path, pieces, entry, fresh in items
    ]


def write_batch(items: list[Item]) -> BatchResult:
    """Write each file of a batch and apply its metadata (runs in a worker process). The batch's
    blobs are read first with a few merged range reads (they usually sit side by side in a pack)."""
    assert _backend is not None and _secrets is not None
    backend, secrets = _backend, _secrets
    items = [
        (path, [BlobRef._make(p) if len(p) == 6 else p for p in pieces], entry, fresh)
        for path, pieces, entry, fresh in items
    ]
    fetched = prefetch_blobs(backend, [p for _, pieces, _, _ in items for p in pieces if isinstance(p, BlobRef)])

    def fetch(ref: BlobRef) -> bytes:
        data = fetched.get((ref.pack, ref.offset))
        return fetch_blob(backend, secrets, ref) if data is None else open_blob(secrets, ref, data)

    ok = nbytes = 0
    others: list[tuple[int, WriteResult]] = []
    for i, (path, pieces, entry, fresh) in enumerate(items):
        meta = functools.partial(apply_meta, e=entry, as_root=_as_root, numeric_owner=_numeric)
        hole = entry.get("hole")
        r = write_file(
            path, pieces, fetch, fresh=fresh, meta=meta, size=entry.get("sz", 0), holes=hole, as_root=_as_root
        )
        if r.status == "ok" and not r.meta_notes:
            ok += 1
            nbytes += r.nbytes
        else:
            others.append((i, r))
    return ok, nbytes, others


class RestorePool:
    """A process pool started on first use; its processes resolve paths below ``target`` as
    the restore does (deep_path.confine), and only if it is still the directory ``target_id``
    ((st_dev, st_ino)) the restore confined itself to."""

    def __init__(
        self,
        url: str,
        secrets: PutSecrets,
        as_root: bool,
        numeric_owner: bool,
        target: bytes,
        target_id: tuple[int, int],
    ) -> None:
        self._args = (url, secrets.secret, as_root, numeric_owner, target, target_id)
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, items: list[Item]) -> Future[BatchResult]:
        if self._pool is None:
            self._pool = process_pool(os.cpu_count() or 2, "bunker.restore.workers", _init, self._args)
        return self._pool.submit(write_batch, wire_items(items))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
