"""A writer session: dedup against the index, fill data and metadata packs, upload them in the
background, and write this session's index objects. Thread-safe: the archiver's workers call
``store`` concurrently; compression and encryption happen in the caller's thread (they release
the GIL), only the append to the open pack is serialized.

Order of writes (docs/format.md section 17): packs, then index, then snapshot.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from bunker.crypto.keyfile import PutKey
from bunker.repo import blob
from bunker.repo import index as index_objects
from bunker.repo.grouped_pack import GroupedPackWriter, GroupRun
from bunker.repo.index import make_index
from bunker.repo.index_cache import IndexCache
from bunker.repo.location_arrays import ColumnsBuilder
from bunker.repo.pack import KIND_DATA, PackWriter
from bunker.repo.pack_body import FinishedPack
from bunker.repo.repository import Repository
from bunker.storage.staged import StagedFile

MAX_UPLOADS_IN_FLIGHT = 2
GROUPED = "data/grouped:"  # + a worker's sealed group key: the open pack of that worker's blobs


def uploads_in_flight() -> int:
    """How many packs a run uploads at once: 2, or BUNKER_UPLOADS_IN_FLIGHT (1 to 16; 1 writes
    packs strictly one after the other, e.g. on a link that stalls with two streams)."""
    try:
        n = int(os.environ.get("BUNKER_UPLOADS_IN_FLIGHT", MAX_UPLOADS_IN_FLIGHT))
    except ValueError:
        return MAX_UPLOADS_IN_FLIGHT
    return min(max(n, 1), 16)


class SessionWriter:
    """Stores chunks for one session (backup run)."""

    def __init__(self, repo: Repository, put: PutKey, cert_name: str, index: IndexCache) -> None:
        self.repo = repo
        self.put = put
        self.cert_name = cert_name
        self.index = index
        self.secrets = put.secrets
        self.pack_target = repo.config.packs["target"]
        self.flush_seconds = float(repo.config.packs["flush_seconds"])
        self._lock = threading.Lock()
        self._pending: set[bytes] = set()  # reserved or in an unflushed pack
        # open packs by kind; GROUPED + a sealed key holds data blobs one worker process made
        # (grouped_pack.py)
        self._open: dict[str, PackWriter | GroupedPackWriter] = {}
        self._opened_at: dict[str, float] = {}
        self._uploads: list[Future[None]] = []
        in_flight = uploads_in_flight()
        self._upload_slots = threading.BoundedSemaphore(in_flight)
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="bunker-upload")
        self._new_entries = ColumnsBuilder()
        self.packs_written: list[str] = []
        self.bytes_stored = 0  # bytes of the packs stored so far
        self.bytes_added = 0  # stored (encrypted) bytes of new blobs
        self.raw_added = 0
        self.chunks_added = 0
        self.on_progress: Callable[[], None] | None = None
        self._error: BaseException | None = None
        self._last_index = time.monotonic()

    # -------------------------------------------------------------- chunk storage
    def known(self, cid: bytes) -> bool:
        """True if the chunk is stored or about to be (no need to encrypt it again)."""
        return cid in self.index.locations or cid in self._pending

    def store(self, cid: bytes, data: bytes | memoryview, kind: str = KIND_DATA) -> bool:
        """Store a chunk unless it is known; return True if it was new."""
        with self._lock:
            if cid in self.index.locations or cid in self._pending:
                return False
            self._pending.add(cid)
        ct, k_blob = blob.encrypt_blob(self.secrets, cid, data)
        self._append(kind, cid, ct, len(data), k_blob)
        return True

    def store_run(self, run: GroupRun) -> None:
        """Store the blobs of a worker's run (grouped_pack.py) that are not known yet; those
        known are cut out of the run's data."""
        full = None
        with self._lock:
            self._raise_upload_error()
            locations, pending = self.index.locations, self._pending
            rows, spans, at, dropped = [], [], 0, False
            for row in run.rows:
                cid, length = row[0], row[1]
                if cid in pending or cid in locations:
                    dropped = True
                else:
                    pending.add(cid)
                    rows.append(row)
                    spans.append((at, length))
                    self.bytes_added += length
                    self.raw_added += row[2]
                at += length
            if not rows:
                return
            data = run.data
            if dropped:
                view = memoryview(data)
                data = b"".join([view[o : o + n] for o, n in spans])
            self.chunks_added += len(rows)
            key = GROUPED + run.sealed.hex()
            gw = self._open.get(key)
            if not isinstance(gw, GroupedPackWriter):
                gw = GroupedPackWriter(
                    KIND_DATA, self.secrets, self.put.client_key, self.cert_name, run.sealed, self._stage()
                )
                self._open[key] = gw
                self._opened_at[key] = time.monotonic()
            self._added(gw.add, run.sealed, data, rows)
            if gw.size >= self.pack_target:
                full = self._open.pop(key)
        if full is not None:
            self._submit(full)

    def _stage(self) -> StagedFile | None:
        """A file to build a new pack in (Backend.stage), or None: in memory."""
        return self.repo.backend.stage("packs/")

    def _added(self, add: Callable[..., object], *args: object) -> None:
        """Add to an open pack; a failure there (its staged file lost: repo/pack_body.py) ends
        the run, since chunks already counted as stored went with it. Under the lock."""
        try:
            add(*args)
        except BaseException as exc:
            self._error = exc
            raise

    def _append(self, kind: str, cid: bytes, ct: bytearray, raw_length: int, k_blob: bytes) -> None:
        full = None
        with self._lock:
            self._raise_upload_error()
            pw = self._open.get(kind)
            if not isinstance(pw, PackWriter):
                pw = self._open[kind] = PackWriter(
                    kind, self.secrets, self.put.data_public, self.put.client_key, self.cert_name, self._stage()
                )
                self._opened_at[kind] = time.monotonic()
            self._added(pw.add, cid, ct, raw_length, k_blob)
            self.bytes_added += len(ct)
            self.raw_added += raw_length
            self.chunks_added += 1
            if pw.size >= self.pack_target:
                full = self._open.pop(kind)
        if full is not None:
            self._submit(full)

    def flush_if_old(self) -> bool:
        """Seal packs older than the flush interval (called periodically). True if any sealed."""
        now = time.monotonic()
        old = []
        with self._lock:
            for kind in list(self._open):
                if now - self._opened_at[kind] >= self.flush_seconds:
                    old.append(self._open.pop(kind))
        for pw in old:
            self._submit(pw)
        return bool(old)

    def _submit(self, pw: PackWriter | GroupedPackWriter) -> None:
        self._upload_slots.acquire()  # at most N sealed packs wait for their upload
        try:
            done = pw.seal()
        except BaseException as exc:  # its chunks count as stored: the run must not go on
            self._upload_slots.release()
            with self._lock:
                self._error = exc
            raise
        fut = self._pool.submit(self._upload, done, pw.locations())
        with self._lock:
            self._uploads.append(fut)

    def _upload(self, done: FinishedPack, rows: list[tuple[bytes, int, int, int]]) -> None:
        name = done.name
        try:
            if done.staged is not None:
                try:
                    self.repo.backend.put_staged(f"packs/{name}", done.staged.path)
                except BaseException:
                    done.staged.discard()
                    raise
            else:
                assert done.data is not None
                self.repo.backend.put(f"packs/{name}", done.data)
            with self._lock:
                self.index.add_pack(name, rows)
                self._new_entries.add_pack(name, rows)
                self._pending.difference_update([row[0] for row in rows])
                self.packs_written.append(name)
                self.bytes_stored += done.size
        except BaseException as exc:
            with self._lock:
                self._error = exc
            raise
        finally:
            self._upload_slots.release()
            if self.on_progress:
                self.on_progress()

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -------------------------------------------------------------- persistence
    def flush(self) -> str | None:
        """Seal all open packs, wait for uploads, and write an index object for what was added
        since the last flush. Returns the index object's name, or None if nothing was new."""
        with self._lock:
            open_packs = list(self._open.values())
            self._open.clear()
        for pw in open_packs:
            if len(pw):
                self._submit(pw)
            else:
                pw.discard()
        with self._lock:
            uploads, self._uploads = self._uploads, []
        for fut in uploads:
            fut.result()
        self._raise_upload_error()
        return self.write_index()

    def write_index(self) -> str | None:
        """Write an index object for the packs uploaded since the last one (does not wait for
        uploads in flight). Called every flush interval, so a killed run loses at most about
        that much work: the next run finds its packs in the index and deduplicates."""
        with self._lock:
            batches = self._new_entries.take(index_objects.INDEX_BATCH)
        self._last_index = time.monotonic()
        name = None
        while batches:
            batch = batches.pop(0)  # (each batch's columns go once its object is written)
            name = self.repo.put_object("index", make_index(batch, self.secrets, self.put.client_key, self.cert_name))
            self.index.record_written(name, batch, self.cert_name)
        return name

    def persist_if_due(self) -> None:
        """Seal packs older than the flush interval and index what has been uploaded."""
        self.flush_if_old()
        if time.monotonic() - self._last_index >= self.flush_seconds:
            self.write_index()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:  # an interrupted run: its open packs' staged files go
            open_packs = list(self._open.values())
            self._open.clear()
        for pw in open_packs:
            pw.discard()
