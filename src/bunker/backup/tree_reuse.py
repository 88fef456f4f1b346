"""Reusing the tree of a directory in which nothing changed (a no-change run over many small files).

Building a directory's tree costs Python work per file: its entry, the files-cache lookup, the
tree rules, encoding and hashing. A run in which nothing changed rebuilds the same bytes. So the
files-cache row of a directory also keeps, under the empty name (no file has it), the tree a run
stored for it and a *digest* of what that tree was made from:

- each child's name and ``lstat`` fields: type and mode, owner ids, links, size, modification
  and change times, inode, device and the device it lives on; the owner names of those ids;
- the filesystem the directory was walked on (mount points below it are judged against it);
- ``ENTRY_VERSION``, the version of how entries are made.

Beside it: the subdirectories' tree ids (known only once they are finished) and the tree's
totals (entries, bytes, files) that a parent tree's statistics add up.

A later run lists and ``lstat``s the directory, computes the digest and, when it is the same,
every regular file hits the files cache with all its chunks in the index and the tree is in
the index, builds no entry for its files: it walks the subdirectories, and if their trees are
the recorded ones it uses the recorded tree id. Otherwise it builds the entries then, from the
``lstat`` results it kept, as it would have.

What the digest cannot see never gets recorded: a directory during whose walk the run logged
anything (an unreadable xattr, a vanished file, ...), one with a child of several hard links
(its entry depends on other directories), one larger than ``PRESTAT_MAX`` entries, and every
directory of a run with ``--atime``. A changed xattr, ACL or inode flag changes the ctime, so it
is seen (docs/format.md section 14 lists what an entry holds).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Container
from dataclasses import dataclass

import blake3

from bunker.backup.files_cache import TREE_KEY, DirRecord, lookup
from bunker.backup.owners import OwnerNames
from bunker.repo.location_map import LocationMap

ENTRY_VERSION = 1  # bump when what an entry holds changes: every directory is built once again
PRESTAT_MAX = 4096  # a larger directory is walked as before, without keeping its lstat results

Child = tuple[bytes, bytes, os.stat_result]  # name, path, lstat

_CHILD = struct.Struct("<IIIIQQqqQQQ")


@dataclass(frozen=True)
class TreeRecord:
    digest: bytes
    tree: bytes
    subtrees: list[bytes]
    totals: tuple[int, int, int]  # entries, bytes of files, files (chunk_store.ChunkStore)


def tree_record(record: DirRecord) -> TreeRecord | None:
    """The tree record of a files-cache row, or None (none, or not in this version's shape)."""
    raw = record.get(TREE_KEY)
    if not isinstance(raw, list) or len(raw) != 5 or raw[0] != ENTRY_VERSION:
        return None
    _, digest, tree, subtrees, totals = raw
    if not (
        isinstance(digest, bytes)
        and isinstance(tree, bytes)
        and isinstance(subtrees, list)
        and all(isinstance(t, bytes) for t in subtrees)
        and isinstance(totals, list)
        and len(totals) == 3
        and all(isinstance(n, int) for n in totals)
    ):
        return None
    return TreeRecord(digest, tree, subtrees, (totals[0], totals[1], totals[2]))


def record_tree(record: DirRecord, rec: TreeRecord) -> None:
    """Keep ``rec`` in the files-cache row ``record``."""
    record[TREE_KEY] = [ENTRY_VERSION, rec.digest, rec.tree, rec.subtrees, list(rec.totals)]


def has_links(children: list[Child]) -> bool:
    """True if a child other than a directory has several names (hardlinks.py decides its entry)."""
    return any(st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) for _, _, st in children)


def children_digest(dev: int, children: list[Child], owners: OwnerNames) -> bytes:
    """The digest of what the entries of ``children`` are made from (module docstring)."""
    pack = _CHILD.pack
    parts = [struct.pack("<QQ", ENTRY_VERSION, dev & (2**64 - 1))]
    uids: set[int] = set()
    gids: set[int] = set()
    for name, _, st in children:
        uids.add(st.st_uid)
        gids.add(st.st_gid)
        fields = (
            len(name),
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            st.st_rdev,
            st.st_dev,
        )
        try:
            parts.append(pack(*fields))
        except struct.error:  # a time past 2262 (ext4 holds them): in decimal, marked apart
            parts.append(b"\xff" + b",".join(b"%d" % f for f in fields) + b"\0")
        parts.append(name)
    # the names stored beside the ids: a renamed user changes every entry of theirs
    for uid in sorted(uids):
        parts.append(b"u%d=%s\0" % (uid, owners.user(uid).encode("utf-8", "surrogateescape")))
    for gid in sorted(gids):
        parts.append(b"g%d=%s\0" % (gid, owners.group(gid).encode("utf-8", "surrogateescape")))
    return blake3.blake3(b"".join(parts)).digest()


@dataclass(frozen=True)
class Deferral:
    """A directory whose recorded tree fits its children: what its files add to the run."""

    record: TreeRecord
    chunks: list[bytes]  # of its regular files
    files: int
    nbytes: int


def lstat_children(fd: int, pairs: list[tuple[bytes, bytes]]) -> list[Child]:
    """The lstat results of ``pairs`` (name, path) in the directory open as ``fd``, up to the
    first that fails (the walk then lstats it again by its path and says what happened)."""
    out: list[Child] = []
    lstat = os.lstat
    for name, path in pairs:
        try:
            st = lstat(name, dir_fd=fd)
        except OSError:
            break
        out.append((name, path, st))
    return out


def deferral(
    record: DirRecord, children: list[Child], digest: bytes, known: Callable[[bytes], bool], index: Container[bytes]
) -> Deferral | None:
    """The deferral of a directory whose files-cache row is ``record``: when its tree record has
    ``digest``, the tree is ``known`` to the session, and every regular file hits the files
    cache with each chunk in ``index``. Otherwise None: its entries are built."""
    rec = tree_record(record)
    if rec is None or rec.digest != digest or not known(rec.tree):
        return None
    chunks: list[bytes] = []
    files = nbytes = 0
    for name, _, st in children:
        if stat.S_ISREG(st.st_mode):
            cached = lookup(record, name, st)
            if cached is None:
                return None
            chunks += cached[0]
            files += 1
            nbytes += st.st_size
    if not (index.contains_all(chunks) if isinstance(index, LocationMap) else all(map(index.__contains__, chunks))):
        return None
    return Deferral(rec, chunks, files, nbytes)
