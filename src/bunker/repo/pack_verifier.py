"""Verifying every blob of a pack with the master key, in worker processes (check --read-data).

Per blob the primitives take a few µs (AES-GCM, zstd, keyed BLAKE3) inside ~20 µs of Python, so
threads serialize on the GIL; processes use every core. The checker's main process verifies the
pack's footer, signature and trailer and opens its key groups; a worker gets the group keys,
reads the pack once, in pieces of up to :data:`PIECE` bytes into a buffer it keeps, and checks
its name, its body hash and each blob (a tree, in a ``meta`` pack, also against the rules every
reader of trees applies). A piece ends where a blob ends, so each blob is checked whole.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import blake3

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets
from bunker.errors import BunkerError, ObjectMissing, StorageError
from bunker.process_pool import process_pool
from bunker.repo import blob
from bunker.repo.pack import KIND_DATA, KIND_META, BlobEntry, decrypt_trailer, parse_footer, unwrap_blob_key
from bunker.repo.tree import decode_tree
from bunker.storage import Backend, open_backend

MAX_REPORTED_BLOBS = 10  # per pack: the count says how many more
JOBS_PER_WORKER = 2  # packs handed to the workers at once, per worker: one running, one waiting
# a check of packs of this many bytes or fewer in all verifies them in its own process: one
# thread verifies ~32 MiB in about the CPU time a forkserver and its workers take to start
IN_PROCESS_BYTES = 32 << 20


@dataclass(frozen=True)
class PackJob:
    """What a worker needs to verify one pack (``secret``: S of the pack's dedup domain).
    ``blobs`` None: the worker takes them from the trailer of the copy it reads (the main
    process read and checked that trailer already; a copy that differs fails the hashes), so a
    job waiting for a worker holds no list of the pack's blobs."""

    name: str
    size: int
    body_length: int
    body_hash: bytes
    group_keys: list[bytes]
    blobs: list[BlobEntry] | None = field(repr=False)
    secret: bytes = field(repr=False)
    kind: str = KIND_DATA  # the trailer's: a "meta" pack's blobs are trees


class PackResult(NamedTuple):
    bytes_read: int
    problems: list[str]
    verified: int
    vanished: bool = False  # deleted since it was listed (a prune): the caller decides what that means


_backend: Backend | None = None
_secrets: dict[bytes, PutSecrets] = {}


def _init(url: str) -> None:
    global _backend
    _backend = open_backend(url)


def verify_pack(job: PackJob, backend: Backend | None = None) -> PackResult:
    """Read a pack and verify its name, body hash and every blob (runs in a worker process).
    The pack is read in pieces of about :data:`PIECE` bytes, each ending where a blob ends, so a
    worker holds a piece, not the whole pack (16 MiB and more)."""
    backend = backend or _backend
    assert backend is not None
    try:
        return _verify_in_pieces(job, backend)
    except ObjectMissing:
        return PackResult(0, [], 0, vanished=True)  # deleted since it was listed (a prune)
    except StorageError:
        raise  # the storage failed, not the pack: the check stops with the storage's error
    except _Shrunk as exc:
        return PackResult(exc.bytes_read, [*exc.found, f"its size changed while checking (it had {job.size} B)"], 0)
    except BunkerError as exc:
        return PackResult(0, [f"cannot be read: {exc.message}"], 0)


PIECE = 8 << 20  # bytes of a pack a worker reads at a time (a blob longer than this: the blob)
# the buffer for them, kept from piece to piece: one per thread (a worker process verifies on one;
# a pool that verifies in the command's own process, on a thread of its own)
_buffers = threading.local()


class _Shrunk(Exception):
    """A read returned fewer bytes than the pack had when it was listed."""

    def __init__(self, bytes_read: int, found: list[str]) -> None:
        super().__init__(bytes_read)
        self.bytes_read, self.found = bytes_read, found


def pieces(blobs: list[BlobEntry], body_length: int, piece: int = PIECE) -> list[tuple[int, int]]:
    """(start, end) of the reads that cover a pack body of ``body_length`` bytes in order: each
    ends where a blob ends, and is at most ``piece`` bytes long unless one blob is longer."""
    ends = sorted({b.offset + b.length for b in blobs if 0 < b.offset + b.length <= body_length})
    out, pos, i = [], 0, 0
    while pos < body_length:
        while i < len(ends) and ends[i] <= pos:
            i += 1
        if i == len(ends):
            out.append((pos, body_length))  # the bytes after the last blob
            break
        j = i
        while j + 1 < len(ends) and ends[j + 1] - pos <= piece:
            j += 1
        out.append((pos, ends[j]))
        pos = ends[j]
    return out


def _verify_in_pieces(job: PackJob, backend: Backend) -> PackResult:
    found: list[str] = []  # damaged blobs
    read = 0

    def get(offset: int, length: int) -> memoryview:
        """``length`` bytes from ``offset``, in the thread's buffer (valid until the next get)."""
        nonlocal read
        buffer: bytearray = getattr(_buffers, "buffer", bytearray())
        if len(buffer) < length:
            buffer = _buffers.buffer = bytearray(length)
        view = memoryview(buffer)[:length]
        n = backend.read_into(job.name, offset, view)
        read += n
        if n != length:
            raise _Shrunk(read, found)
        return view

    # the footer first (the trailer may have to come from this copy), hashed last
    tail = bytes(get(job.body_length, job.size - job.body_length))
    secrets = _secrets.get(job.secret)
    if secrets is None:
        secrets = _secrets[job.secret] = PutSecrets(job.secret)
    blobs, kind = job.blobs, job.kind
    if blobs is None:
        try:
            trailer = decrypt_trailer(parse_footer(tail, job.size), secrets)
        except encoding.FormatError as exc:
            return PackResult(read, [f"its trailer does not open in the copy read now: {exc}"], 0)
        blobs, kind = trailer.blobs, trailer.kind
    keys = [aead.Cipher(k) for k in job.group_keys]
    bad = 0

    def check(b: BlobEntry, stored: memoryview) -> None:
        nonlocal bad
        try:
            k = unwrap_blob_key(keys[b.group], b)
            plain = blob.decrypt_blob(k, b.chunk_id, stored, b.raw_length)
            if not blob.verify_blob(secrets, b.chunk_id, plain):
                raise blob.BlobError("content does not match its chunk id")
            if kind == KIND_META:
                try:
                    decode_tree(plain)  # the rules every reader of the tree applies
                except encoding.FormatError as exc:
                    raise blob.BlobError(f"a tree that restore and ls refuse: {exc}") from None
        except (encoding.FormatError, blob.BlobError) as exc:
            bad += 1
            if bad <= MAX_REPORTED_BLOBS:
                found.append(f"chunk {b.chunk_id.hex()[:16]} at offset {b.offset}: {exc}")

    # one pass for both hashes: the body's (signed in the footer), then on to the whole pack's
    # (its name); several threads for big packs (as content_hash: the last pack has cores to spare)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if job.size >= 1 << 22 else 1)
    order = sorted(blobs, key=lambda b: b.offset)
    alone = []  # blobs that overlap others (no writer makes them): each read by itself
    k = 0
    for start, end in pieces(blobs, job.body_length, PIECE):
        view = get(start, end - start)
        hasher.update(view)
        while k < len(order) and order[k].offset < end:
            b = order[k]
            if b.offset >= start and b.offset + b.length <= end:
                check(b, view[b.offset - start : b.offset - start + b.length])
            else:
                alone.append(b)
            k += 1
        del view
    alone += order[k:]
    for b in alone:
        check(b, get(b.offset, b.length))  # (the trailer's decoder keeps blobs inside the body)
    body_hash = hasher.digest()
    hasher.update(tail)
    problems = []
    if hasher.hexdigest() != job.name.split("/", 1)[1]:
        problems.append("its bytes do not match its name (altered, truncated or bit rot)")
    if body_hash != job.body_hash:
        # the blob checks (in ``found``) name exactly which chunks are damaged
        problems.append("pack body does not match its signed hash (altered or bit rot)")
    problems += found
    if bad > MAX_REPORTED_BLOBS:
        problems.append(f"{bad - MAX_REPORTED_BLOBS} more damaged chunks in this pack")
    return PackResult(read, problems, len(blobs) - bad)


class PackVerifierPool:
    """Worker processes for :func:`verify_pack`, started on first use. At most
    :data:`JOBS_PER_WORKER` jobs per worker are submitted at once (a job may hold its pack's
    whole trailer): :meth:`submit` waits for room. A pool made with ``queued`` takes jobs
    without waiting and hands them to the workers from a thread of its own once :meth:`close`
    says there are no more, so its caller goes on with other work meanwhile.

    Made with ``backend`` (the caller's, for a check of few bytes: :data:`IN_PROCESS_BYTES`),
    it verifies on one thread of this process instead: starting a forkserver, a resource tracker
    and a worker per core costs more CPU (~0.3 s) than verifying a pack or two."""

    def __init__(self, url: str, queued: bool = False, backend: Backend | None = None) -> None:
        self._url = url
        self._backend = backend
        self._workers = os.cpu_count() or 2
        self._pool: Executor | None = None
        self._room = threading.BoundedSemaphore(JOBS_PER_WORKER * self._workers)
        self._running = 0  # jobs submitted whose ``done`` has not returned yet
        self._idle = threading.Condition()
        self._queue: list[tuple[PackJob, Callable[[Future[PackResult]], None]]] | None = [] if queued else None
        self._queue_lock = threading.Lock()
        self._feeder: threading.Thread | None = None
        self._stop = False  # shutdown without waiting: the feeder hands over no more
        self.error: BaseException | None = None  # what stopped the feeder (the storage failed)

    def submit(self, job: PackJob, done: Callable[[Future[PackResult]], None]) -> None:
        """Verify ``job`` in a worker; ``done(future)`` runs when it has (on another thread)."""
        if self._queue is not None:
            with self._queue_lock:
                self._queue.append((job, done))
            return
        self._hand_over(job, done)

    def _feed(self, jobs: list[tuple[PackJob, Callable[[Future[PackResult]], None]]]) -> None:
        try:
            for job, done in jobs:
                while not self._room.acquire(timeout=0.1):
                    if self._stop:
                        return
                if self._stop:
                    self._room.release()
                    return
                self._hand_over(job, done, room=True)
        except BaseException as exc:  # noqa: BLE001 - reported by shutdown, on the caller's thread
            self.error = exc
        finally:
            jobs.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def _hand_over(self, job: PackJob, done: Callable[[Future[PackResult]], None], room: bool = False) -> None:
        """Submit ``job`` once there is room (``room``: the caller took it already)."""
        if self._pool is None:
            if self._backend is not None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="bunker-verify")
            else:
                self._pool = process_pool(self._workers, "bunker.repo.pack_verifier", _init, (self._url,))
        if not room:
            self._room.acquire()
        with self._idle:
            self._running += 1
        try:
            fut = self._pool.submit(verify_pack, job, self._backend)
        except BaseException:
            self._ended()
            raise
        fut.add_done_callback(lambda f: self._finished(f, done))

    def _finished(self, fut: Future[PackResult], done: Callable[[Future[PackResult]], None]) -> None:
        try:
            done(fut)
        finally:
            self._ended()

    def _ended(self) -> None:
        self._room.release()
        with self._idle:
            self._running -= 1
            self._idle.notify_all()

    def close(self) -> None:
        """No more jobs: each worker ends once the jobs submitted are done (its memory with it),
        without waiting here. A queued pool starts handing its jobs over now."""
        if self._queue is not None:
            with self._queue_lock:
                jobs, self._queue = self._queue, None
            self._feeder = threading.Thread(target=self._feed, args=(jobs,), name="bunker-verify-feed", daemon=True)
            self._feeder.start()
            return
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def shutdown(self, wait_for_jobs: bool = False) -> None:
        """End the workers: once every job submitted is done and recorded (``wait_for_jobs``),
        else at once, cancelling the jobs not started. Raises what stopped the feeder."""
        if self._feeder is not None:
            self._stop = not wait_for_jobs
            self._feeder.join()
            self._feeder = None
            if self.error is not None and wait_for_jobs:
                error, self.error = self.error, None
                raise error
        if self._pool is None:
            return
        if wait_for_jobs:
            with self._idle:
                self._idle.wait_for(lambda: self._running == 0)
        self._pool.shutdown(wait=True, cancel_futures=not wait_for_jobs)
        self._pool = None
