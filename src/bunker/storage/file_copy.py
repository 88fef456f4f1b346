"""Copying one open file into another without holding it in memory.

The kernel copies where it can (``sendfile``: the bytes never pass through this process, and no
buffer of theirs is allocated and faulted in); where it cannot (a destination opened for
appending, a filesystem without it), the file goes through in :data:`COPY_STEP` pieces.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

SENDFILE_STEP = 1 << 30
COPY_STEP = 1 << 20  # read/write steps where sendfile does not work
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV)


def copy_fd(src: int, dst: int, write: Callable[[int, memoryview], int] = os.write) -> int:
    """Copy all of ``src`` (from its start) to ``dst`` at its current offset; return the number
    of bytes. ``write``: how a piece is written where the kernel cannot copy (the caller's own
    write, so that what it does to writes applies)."""
    offset = 0
    while True:
        try:
            n = os.sendfile(dst, src, offset, SENDFILE_STEP)
        except OSError as exc:
            if exc.errno not in _NO_SENDFILE:
                raise
            break
        if n == 0:
            return offset
        offset += n
    while True:
        data = os.pread(src, COPY_STEP, offset)
        if not data:
            return offset
        view = memoryview(data)
        while view:
            view = view[write(dst, view) :]
        offset += len(data)
