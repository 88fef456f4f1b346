"""Reading one file so that what is stored is consistent: open without following symlinks,
compare (size, mtime, ctime) before and after, and re-read a bounded number of times while the
file keeps changing. Used by the archiver's threads (large files) and by the small-file worker
processes alike."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import NamedTuple

MAX_REREADS = 3
_NOATIME = getattr(os, "O_NOATIME", 0)
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

# consume(fd, size) reads the open file and returns (chunk ids, bytes read)
Consume = Callable[[int, int], tuple[list[bytes], int]]


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


def read_stable(path: bytes, consume: Consume) -> ReadOutcome:
    """Read ``path`` with ``consume`` until two fstat()s around the read agree."""
    for attempt in range(MAX_REREADS + 1):
        try:
            try:
                fd = os.open(path, _FLAGS | _NOATIME)
            except PermissionError:
                fd = os.open(path, _FLAGS)  # O_NOATIME needs ownership
        except FileNotFoundError:
            return ReadOutcome("vanished", [])
        except OSError as exc:
            return ReadOutcome("error", [], message=f"cannot open file: {_oserror(exc)}")
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return ReadOutcome("replaced", [])
            chunks, size = consume(fd, before.st_size)
            after = os.fstat(fd)
        except OSError as exc:
            return ReadOutcome("error", [], message=f"error while reading file: {_oserror(exc)}")
        finally:
            os.close(fd)
        stable = (
            size == after.st_size == before.st_size
            and after.st_mtime_ns == before.st_mtime_ns
            and after.st_ctime_ns == before.st_ctime_ns
        )
        if stable or attempt == MAX_REREADS:
            return ReadOutcome(
                "ok" if stable else "changing",
                chunks,
                after.st_ino,
                after.st_size,
                after.st_mtime_ns,
                after.st_ctime_ns,
            )
    raise AssertionError("not reached")


def read_all(fd: int, size_hint: int) -> bytes:
    """Read an open file to its end (asks one byte more than expected, to notice growth)."""
    parts = []
    want = size_hint + 1
    while True:
        b = os.read(fd, max(want, 1 << 16))
        if not b:
            break
        parts.append(b)
        want = 1 << 20
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _oserror(exc: OSError) -> str:
    return f"{exc.strerror or exc} (errno {exc.errno})"
