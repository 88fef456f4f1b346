"""Reading one file so that what is stored is consistent: open without following symlinks,
compare (size, mtime, ctime) before and after, and re-read a bounded number of times while the
file keeps changing. Used by the archiver's threads (large files) and by the small-file worker
processes alike.

While the file is open, its holes (SEEK_HOLE/SEEK_DATA), extended attributes, ACL and inode flags
are read through the same descriptor, between the two fstat()s: changing any of them changes the
ctime, so they are as consistent as the content. Only the data regions are read."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any, NamedTuple

from bunker.fs import deep_path
from bunker.fs.fsmeta import bare_inode_flags, hole_bytes, hole_map, inode_meta

MAX_REREADS = 3
_NOATIME = getattr(os, "O_NOATIME", 0)
# O_NONBLOCK: an item replaced by a fifo since it was listed must not block the open
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# consume(fd, size, holes) reads the data regions of the open file (all of it when ``holes`` is
# empty, see fsmeta.hole_map) and returns (chunk ids, data bytes read)
Consume = Callable[[int, int, list[int]], tuple[list[bytes], int]]


# a file to read as a name in an open directory (its descriptor, the name) rather than by its
# path: the kernel then looks up one name, not every component of the path (a directory's files
# read one after another: ~1 µs a file less, and no contention on the shared components)
At = tuple[int, bytes] | None


class ReadOutcome(NamedTuple):
    """What reading one file gave. ``status``: ok, changing (stored, but it kept changing),
    vanished, replaced (no longer a regular file) or error (``message`` says what failed)."""

    status: str
    chunks: list[bytes]
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    message: str = ""
    meta: dict[str, Any] = {}  # the tree keys hole, x, acl, fl (shared default: never mutated)
    problems: tuple[str, ...] = ()  # xattrs or flags that could not be read


def read_stable(path: bytes, consume: Consume, at: At = None) -> ReadOutcome:
    """Read ``path`` with ``consume`` until two fstat()s around the read agree (and the bytes
    read are as many as the size said). A file whose size does not tell its length, as in /proc
    and /sys (0 or 4096 whatever they hold), is stable when two reads give the same content under
    the same fstat(); its size is then what was read. ``at``: see :data:`At`."""
    previous: list[bytes] | None = None
    for attempt in range(MAX_REREADS + 1):
        try:
            fd = _open(path, at)
        except FileNotFoundError:
            return ReadOutcome("vanished", [])
        except OSError as exc:
            return ReadOutcome("error", [], message=f"cannot open file: {_oserror(exc)}")
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return ReadOutcome("replaced", [])
            holes = hole_map(fd, before.st_size)
            meta, problems = inode_meta(fd)
            if holes:
                meta["hole"] = holes
                data_size = before.st_size - hole_bytes(holes)
            else:
                data_size = before.st_size
            chunks, size = consume(fd, before.st_size, holes)
            after = os.fstat(fd)
        except OSError as exc:
            return ReadOutcome("error", [], message=f"error while reading file: {_oserror(exc)}")
        finally:
            os.close(fd)
        unchanged = (
            after.st_size == before.st_size
            and after.st_mtime_ns == before.st_mtime_ns
            and after.st_ctime_ns == before.st_ctime_ns
        )
        stable = unchanged and size == data_size
        pseudo = unchanged and not stable and not holes and chunks == previous
        previous = chunks if unchanged and not holes else None
        if stable or pseudo or attempt == MAX_REREADS:
            return ReadOutcome(
                "ok" if stable or pseudo else "changing",
                chunks,
                after.st_ino,
                size if pseudo else after.st_size,
                after.st_mtime_ns,
                after.st_ctime_ns,
                meta=meta,
                problems=tuple(problems) if problems else (),
            )
    raise AssertionError("not reached")


def read_simple(path: bytes, take: Callable[[bytes], list[bytes]], at: At = None) -> ReadOutcome | None:
    """The common case of :func:`read_stable`, in the fewest calls: a regular file without
    holes or extended attributes that reads whole at its size, unchanged, at the first try.
    ``take`` gets its content and returns the chunk ids. None for any other file (nothing
    was taken then): read_stable reads it, with all it checks and reports. A small file's
    system calls and glue are most of what it costs to back up (docs/performance.md).
    ``at``: see :data:`At`."""
    try:
        fd = _open(path, at)
    except OSError:
        return None
    try:
        before = os.fstat(fd)
        size = before.st_size
        if not stat.S_ISREG(before.st_mode) or hole_map(fd, size):
            return None
        flags = bare_inode_flags(fd)
        if flags is None:
            return None
        data = os.pread(fd, max(size + 1, 1 << 16), 0)
        after = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if (
        len(data) != size
        or after.st_size != size
        or after.st_mtime_ns != before.st_mtime_ns
        or after.st_ctime_ns != before.st_ctime_ns
    ):
        return None
    return ReadOutcome(
        "ok", take(data), after.st_ino, size, after.st_mtime_ns, after.st_ctime_ns, meta={"fl": flags} if flags else {}
    )


def _open(path: bytes, at: At = None) -> int:
    """``path`` opened to be read, without following a symlink, its atime kept where we may."""
    try:
        return _open_with(path, at, _FLAGS | _NOATIME)
    except PermissionError:
        return _open_with(path, at, _FLAGS)  # O_NOATIME needs ownership


def _open_with(path: bytes, at: At, flags: int) -> int:
    return deep_path.open(path, flags) if at is None else os.open(at[1], flags, dir_fd=at[0])


def read_all(fd: int, size_hint: int) -> bytes:
    """Read an open file from its start to its end, whatever its file offset (asks one byte more
    than expected, to notice growth)."""
    parts = []
    want = size_hint + 1
    pos = 0
    while True:
        b = os.pread(fd, max(want, 1 << 16), pos)
        if not b:
            break
        parts.append(b)
        pos += len(b)
        want = 1 << 20
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _oserror(exc: OSError) -> str:
    return f"{exc.strerror or exc} (errno {exc.errno})"
