"""Directories read whole by a worker process.

A backup of many small files was bound by the main process: each file cost it ~24 µs of Python
(its entry, the files-cache row, the tree rules, encoding, the hand-over to a worker and back)
while the workers waited for it (docs/performance.md). A directory that holds only small
regular files of one name each, none unchanged since the last run, is therefore handed to a
worker whole: the walk lists and ``lstat``s it as before (the tree-reuse digest needs that), and
the worker reads each file and builds everything else the main process would have: the entries
(through file_entry.py, as the main process builds them), the tree's bytes, its id and totals,
the files-cache row with the tree record, and the run-log events. The main process stores the
tree and the blobs and keeps the row. Anything else (a subdirectory, a large file, a hard link,
an unchanged file, a directory past the batch size) is walked file by file as before.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from bunker import encoding
from bunker.backup.file_entry import Event, apply_outcome, base_entry, cache_row, fit_entries, outcome_events
from bunker.backup.file_reader import At, ReadOutcome
from bunker.backup.files_cache import DirRecord, lookup
from bunker.backup.owners import OwnerNames
from bunker.backup.tree_reuse import Child, TreeRecord, record_tree
from bunker.fs import deep_path
from bunker.repo.tree import encode_tree

# a file as the walk's lstat saw it: name, mode, uid, gid, mtime and ctime in ns, size
WholeFile = tuple[bytes, int, int, int, int, int, int]
# what a worker is handed: the directory's path, its files, and the digest of its children
# (tree_reuse.py) when its tree may be recorded for reuse (nothing was logged of it so far)
WholeDir = tuple[bytes, list[WholeFile], bytes | None]
# what it gives back: the tree's bytes, its totals (entries, bytes of files, files), the
# files-cache row (packed), the chunk ids of its files, run-log events, bytes read
DirResult = tuple[bytes, tuple[int, int, int], bytes, list[bytes], list[Event], int]


def whole_files(
    children: list[Child], cache_old: DirRecord, max_file: int, max_bytes: int
) -> tuple[list[WholeFile], int] | None:
    """The files of a directory to hand to a worker whole, and their bytes; None when it holds
    anything else, a file larger than ``max_file``, more than ``max_bytes`` in all, or a file
    the files cache holds unchanged (that one is not read at all)."""
    files: list[WholeFile] = []
    total = 0
    for name, _, st in children:
        mode = st.st_mode
        if not stat.S_ISREG(mode) or st.st_size > max_file or st.st_nlink > 1:
            return None
        total += st.st_size
        if total > max_bytes:
            return None
        if cache_old and lookup(cache_old, name, st) is not None:
            return None
        files.append((name, mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return (files, total) if files else None


def build_dir(
    job: WholeDir,
    read: Callable[[bytes, At], ReadOutcome],
    tree_id: Callable[[bytes], bytes],
    owners: OwnerNames,
) -> DirResult:
    """Read a directory's files with ``read`` (path, and where in the directory open here: see
    file_reader.At) and build its tree (runs in a worker process)."""
    try:
        fd: int | None = deep_path.open(job[0], deep_path.READ_DIR)
    except OSError:
        fd = None  # each file is opened by its path, and what that meets is said of it
    try:
        return _build(job, read, tree_id, owners, fd)
    finally:
        if fd is not None:
            os.close(fd)


def _build(
    job: WholeDir,
    read: Callable[[bytes, At], ReadOutcome],
    tree_id: Callable[[bytes], bytes],
    owners: OwnerNames,
    fd: int | None,
) -> DirResult:
    path, files, digest = job
    prefix = path.rstrip(b"/") + b"/"
    entries: list[dict[str, Any]] = []
    rows: DirRecord = {}
    ids: list[bytes] = []
    events: list[Event] = []
    nbytes = 0
    for name, mode, uid, gid, mtime_ns, ctime_ns, size in files:
        fpath = prefix + name
        e = base_entry(name, "f", mode, uid, gid, mtime_ns, ctime_ns, owners)
        e["sz"] = size
        r = read(fpath, None if fd is None else (fd, name))
        if r.problems or r.status != "ok":
            events += outcome_events(r, fpath)
        if not apply_outcome(e, r, owners):
            continue
        if r.status == "ok":
            rows[name] = cache_row(r)
        ids += r.chunks
        nbytes += r.size
        entries.append(e)
    kept, bad = fit_entries(entries, path)
    events += bad
    data = encode_tree(kept)
    totals = (len(kept), sum(e["sz"] for e in kept), len(kept))
    if digest is not None and not events:  # as the walk records a tree: nothing said of it
        record_tree(rows, TreeRecord(digest, tree_id(data), [], totals))
    return data, totals, encoding.pack_local(rows), ids, events, nbytes
