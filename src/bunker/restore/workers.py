"""Worker processes that write small restored files (see small_files.py for why processes)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets
from bunker.errors import BunkerError
from bunker.fs import deep_path
from bunker.process_pool import process_pool
from bunker.repo.blob_reader import BlobRef, fetch_blob, open_blob, prefetch_blobs
from bunker.restore.file_writer import Piece, WriteResult, apply_meta, write_file, write_whole
from bunker.storage import Backend, open_backend

# A piece as a batch carries it: located by the main process, with its blob's trailer entry
# as (pack, chunk id, key group, offset, length, raw length, wrapped key), its key unwrapped here
# (see :func:`write_batch`); resolved whole by the main process (a BlobRef as a plain tuple); or
# unresolved: (its length, why).
WirePiece = tuple[str, bytes, int, int, int, int, bytes] | tuple[str, int, int, int, bytes, bytes] | tuple[int, str]
# (path, pieces, metadata entry without its chunk list, parent directory created by this restore)
Item = tuple[bytes, list[Piece], dict[str, Any], bool]
WireItem = tuple[bytes, list[WirePiece], dict[str, Any], bool]

# What a batch sends back: the files written whole without a note (counted, with their bytes),
# and the result of every other one by its place in the batch. Most files of a restore are the
# former, and a result for each would cost the main process a decoding and a callback per file.
# A file with a blob key that does not unwrap here returns RETRY and is written by the main
# process instead, which reports exactly what is wrong with it.
BatchResult = tuple[int, int, list[tuple[int, WriteResult]]]
RETRY = "retry"

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


def _located(pieces: list[WirePiece], keys: dict[str, list[aead.Cipher]]) -> list[Piece] | None:
    """A file's pieces with the key of every located blob unwrapped; None when one does not
    unwrap (the main process writes that file)."""
    out: list[Piece] = []
    for p in pieces:
        if len(p) == 7:
            pack, cid, group, offset, length, raw, wrapped = p
            ciphers = keys.get(pack)
            if ciphers is None or not 0 <= group < len(ciphers):
                return None
            try:
                key = ciphers[group].unwrap_key(wrapped)
            except aead.DecryptionFailed:
                return None
            out.append(BlobRef(pack, offset, length, raw, cid, key))
        elif len(p) == 6:
            out.append(BlobRef._make(p))
        else:
            out.append(p)
    return out


def write_batch(keys: dict[str, list[bytes]], items: list[WireItem]) -> BatchResult:
    """Write each file of a batch and apply its metadata (runs in a worker process). ``keys``:
    the opened key groups of every pack a located piece names. The batch's blobs are read first
    with a few merged range reads (they usually sit side by side in a pack)."""
    assert _backend is not None and _secrets is not None
    backend, secrets = _backend, _secrets
    ciphers = {pack: [aead.Cipher(k) for k in group_keys] for pack, group_keys in keys.items()}
    others: list[tuple[int, WriteResult]] = []
    files: list[tuple[int, Item]] = []
    for i, (path, pieces, entry, fresh) in enumerate(items):
        located = _located(pieces, ciphers)
        if located is None:
            others.append((i, WriteResult(RETRY, 0)))
        else:
            files.append((i, (path, located, entry, fresh)))
    fetched = prefetch_blobs(backend, [p for _, (_, pieces, _, _) in files for p in pieces if isinstance(p, BlobRef)])

    def fetch(ref: BlobRef) -> bytes:
        data = fetched.get((ref.pack, ref.offset))
        return fetch_blob(backend, secrets, ref) if data is None else open_blob(secrets, ref, data)

    ok = nbytes = 0
    head, dir_fd = b"", None  # the directory of the files written last (a batch's files share a few)
    try:
        for i, (path, located, entry, fresh) in files:
            if path[: path.rfind(b"/")] != head or dir_fd is None:
                if dir_fd is not None:
                    os.close(dir_fd)
                head, dir_fd = path[: path.rfind(b"/")], None
                with contextlib.suppress(OSError):  # the file's own calls report why
                    dir_fd = deep_path.open_parent(path)
            if fresh and dir_fd is not None and len(located) <= 1:
                data = _whole_data(located, fetch)
                if data is not None and write_whole(dir_fd, path, data, entry, _as_root, _numeric):
                    ok += 1
                    nbytes += len(data)
                    continue
            meta = functools.partial(apply_meta, e=entry, as_root=_as_root, numeric_owner=_numeric)
            hole = entry.get("hole")
            r = write_file(
                path,
                located,
                fetch,
                fresh=fresh,
                meta=meta,
                size=entry.get("sz", 0),
                holes=hole,
                as_root=_as_root,
                dir_fd=dir_fd,
            )
            if r.status == "ok" and not r.meta_notes:
                ok += 1
                nbytes += r.nbytes
            else:
                others.append((i, r))
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return ok, nbytes, others


def _whole_data(located: list[Piece], fetch: Callable[[BlobRef], bytes]) -> bytes | None:
    """The data of a file of at most one piece, or None when it cannot be had (write_file then
    leaves the gap and says why)."""
    if not located:
        return b""
    piece = located[0]
    if type(piece) is not BlobRef:
        return None
    try:
        return fetch(piece)
    except BunkerError:
        return None


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

    def submit(self, keys: dict[str, list[bytes]], items: list[WireItem]) -> Future[BatchResult]:
        if self._pool is None:
            self._pool = process_pool(os.cpu_count() or 2, "bunker.restore.workers", _init, self._args)
        return self._pool.submit(write_batch, keys, items)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
