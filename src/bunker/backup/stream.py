"""Backing up one stream (``backup --stdin-name``): standard input becomes a single file at the
snapshot's root. It keeps no checkpoints: its input can be read only once."""

from __future__ import annotations

import os
import time
from typing import BinaryIO

from bunker.backup.archiver import Archiver, ArchiveResult


def stream_entry(archiver: Archiver, name: str, f: BinaryIO) -> ArchiveResult:
    """Back up one stream (standard input) as a single file ``name`` at the snapshot's root."""
    t0 = time.monotonic()
    try:
        chunks, size = archiver.store_stream(f)
    finally:
        archiver._pool.shutdown(wait=True)
    archiver.chunk_ids.update(chunks)
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    entry = {
        "n": os.fsencode(name),
        "t": "f",
        "m": 0o600,
        "u": uid,
        "g": gid,
        "U": archiver._owners.user(uid),
        "G": archiver._owners.group(gid),
        "mt": now,
        "ct": now,
        "sz": size,
        "c": chunks,
    }
    root = archiver._store_tree(archiver._fit([entry], b"/"))
    archiver.stats.update(files=1, files_new=1, bytes=size, duration_ms=int((time.monotonic() - t0) * 1000))
    archiver.stats.update(archiver.chunks.tree_stats(root))
    return ArchiveResult(root, archiver.chunk_ids, archiver.stats)
