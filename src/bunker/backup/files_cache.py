"""The files cache: per directory, each file's (inode, size, mtime, ctime), chunk ids and the tree
keys read with its content (holes, xattrs, ACL, inode flags), so an unchanged file is neither read
nor hashed again. Changing xattrs, ACLs or flags changes the ctime, so a hit is still exact.

One sqlite row per directory keeps lookups few (a no-change run over 200k files in 3k
directories makes 3k reads). A hit is trusted only if every chunk id is still in the index, so
a pruned or foreign repository can never make bunker skip a file whose data is gone. The row
also holds the directory's tree record under the empty name (tree_reuse.py): what lets a run
in which nothing changed there skip building its tree.

A cache that cannot be written (its disk is full, or read-only) costs speed, never the backup:
the cache keeps working in memory for the run, and ``problem`` says why (the run ends at warn).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from bunker import encoding
from bunker.private_files import SQLITE_SIDE_FILES, private_file

# name -> [ino, size, mtime_ns, ctime_ns, [chunk ids], {hole, x, acl, fl} or None]; and under
# TREE_KEY the directory's tree record (tree_reuse.py)
DirRecord = dict[bytes, list[Any]]
TREE_KEY = b""  # no directory entry has this name


class FilesCache:
    """sqlite-backed cache, written in one transaction per flush."""

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._pending: dict[bytes, bytes] = {}
        self.path = path
        self.problem = ""  # why the cache is not written (kept in memory for this run), if it is not
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        if path is not None:
            try:
                self._db = self._open(path)
            except (OSError, sqlite3.Error) as exc:
                self._db = sqlite3.connect(":memory:", check_same_thread=False)
                self._unwritable(exc)
        self._init()

    def _open(self, path: str) -> sqlite3.Connection:
        # it holds every backed-up path in plaintext: 0600 before sqlite opens it (sqlite gives
        # its -wal and -shm files the database file's mode)
        private_file(path, SQLITE_SIDE_FILES)
        db = sqlite3.connect(path, check_same_thread=False)
        try:
            self._init(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            if _no_room(exc):
                raise
            # a damaged cache only costs one full re-read: start afresh
            with contextlib.suppress(OSError):
                os.unlink(path)
            private_file(path, SQLITE_SIDE_FILES)
            db = sqlite3.connect(path, check_same_thread=False)
            self._init(db)
        return db

    def _unwritable(self, exc: BaseException) -> None:
        """Stop writing the cache file (what it holds stays usable in memory for this run)."""
        if not self.problem:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.problem = (
                f"the files cache {self.path} cannot be written ({why}): this run keeps it in memory, and the "
                "next run reads unchanged files again; free space on that disk (or make it writable)"
            )

    def _init(self, db: sqlite3.Connection | None = None) -> None:
        db = db or self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS dirs (path BLOB PRIMARY KEY, data BLOB NOT NULL)")
        # large files a killed run had partly stored: (dev, ino) -> identity and finished chunks
        db.execute("CREATE TABLE IF NOT EXISTS partial (key BLOB PRIMARY KEY, data BLOB NOT NULL)")

    def load_dir(self, path: bytes) -> DirRecord:
        """The cached records of one directory (empty if none or unreadable)."""
        with self._lock:
            raw = self._pending.get(path)
            if raw is None:
                row = self._db.execute("SELECT data FROM dirs WHERE path = ?", (path,)).fetchone()
                raw = row[0] if row else None
        if raw is None:
            return {}
        try:
            rec = encoding.unpack(raw)
        except encoding.FormatError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def save_dir(self, path: bytes, record: DirRecord) -> None:
        """Remember a directory's records (written on the next flush)."""
        with self._lock:
            self._pending[path] = encoding.pack_local(record)

    def save_packed_dir(self, path: bytes, packed: bytes) -> None:
        """:meth:`save_dir` of records packed already (encoding.pack_local, by a worker process)."""
        with self._lock:
            self._pending[path] = packed

    def flush(self) -> None:
        """Write pending records durably enough for a cache (one transaction). A cache file that
        cannot be written keeps them in memory (``problem`` says why)."""
        with self._lock:
            if self.problem and self.path is not None:
                return  # kept in memory for this run
            items, self._pending = list(self._pending.items()), {}
            if items:
                try:
                    with self._db:
                        self._db.executemany("INSERT OR REPLACE INTO dirs (path, data) VALUES (?, ?)", items)
                except sqlite3.Error as exc:
                    self._pending = dict(items) | self._pending
                    self._unwritable(exc)

    def save_partial(self, key: bytes, record: list[Any] | None) -> None:
        """Remember (or with None forget) how far a large file was stored: [size, mtime_ns,
        ctime_ns, [[chunk id, length], ...]] (written at once: only checkpoints call this)."""
        with self._lock:
            if self.problem and self.path is not None:
                return
            try:
                with self._db:
                    if record is None:
                        self._db.execute("DELETE FROM partial WHERE key = ?", (key,))
                    else:
                        self._db.execute(
                            "INSERT OR REPLACE INTO partial (key, data) VALUES (?, ?)", (key, encoding.pack(record))
                        )
            except sqlite3.Error as exc:
                self._unwritable(exc)

    def load_partial(self, key: bytes) -> list[Any] | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM partial WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            rec = encoding.unpack(row[0])
        except encoding.FormatError:
            return None
        return rec if isinstance(rec, list) and len(rec) == 4 else None

    def records(self) -> Iterator[tuple[bytes, DirRecord]]:
        """Every directory's file records (flushed ones), e.g. to find the files holding a
        chunk; without the tree records."""
        self.flush()
        with self._lock:
            rows = self._db.execute("SELECT path, data FROM dirs").fetchall()
            kept = dict(self._pending)  # not written: the cache file has no room
        rows = [(p, d) for p, d in rows if bytes(p) not in kept] + list(kept.items())
        for path, raw in rows:
            try:
                rec = encoding.unpack(raw)
            except encoding.FormatError:
                continue
            if isinstance(rec, dict):
                rec.pop(TREE_KEY, None)
                yield bytes(path), rec

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(sqlite3.Error):
            self._db.close()


def _no_room(exc: sqlite3.DatabaseError) -> bool:
    """sqlite could not write (full disk, quota, read-only, I/O error): not a damaged file."""
    text = str(exc).lower()
    return any(t in text for t in ("full", "disk i/o", "readonly", "read-only", "unable to open"))


def lookup(record: DirRecord, name: bytes, st: os.stat_result) -> tuple[list[bytes], dict[str, Any]] | None:
    """(chunk ids, other tree keys) of an unchanged file, or None if it changed or was never
    stored. Records of versions that kept no metadata (5 fields) never match: one re-read."""
    r = record.get(name)
    if (
        r is not None
        and len(r) == 6
        and r[3] == st.st_ctime_ns
        and r[2] == st.st_mtime_ns
        and r[1] == st.st_size
        and r[0] == st.st_ino
        and (r[5] is None or isinstance(r[5], dict))
    ):
        return r[4], r[5] or {}
    return None
