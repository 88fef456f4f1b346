"""Objects built in a file on this machine before they are stored (packs of a backup).

A backup's pack grows to 16 MiB blob by blob; held in memory, the open packs and those being
uploaded were ~45 MB of a backup's main process (docs/performance.md, "Another machine"). A
:class:`StagedFile` takes the bytes as they come instead; :meth:`Backend.put_staged` then stores
the finished file under its name: a local repository on the same filesystem links it in place,
any other backend copies or uploads it.

Where the file lives matters for a backup that falls back to its spool (storage/spooling.py):
the file must stay readable when the repository stops answering in the middle of a pack, so a
spooling backend stages in the spool, on this machine, never in the repository it may lose.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol


class WriteOps(Protocol):
    """The calls a staged file makes (storage/local.py's FileOps)."""

    def write(self, fd: int, data: memoryview) -> int: ...

    def close(self, fd: int) -> None: ...

    def unlink(self, path: str) -> None: ...


class StagedFile:
    """A new file (``path``, open for writing as ``fd``) that an object is written into piece by
    piece. Not thread-safe: the caller serializes writes."""

    def __init__(self, path: str, fd: int, ops: WriteOps) -> None:
        self.path = path
        self._fd: int | None = fd
        self._ops = ops
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; raises OSError (the file then holds a prefix of what was written)."""
        if self._fd is None:
            raise ValueError("the staged file is closed")
        view = memoryview(data).cast("B")
        while view:
            n = self._ops.write(self._fd, view)
            view = view[n:]
            self.size += n

    def read_back(self) -> bytes:
        """Everything written so far (to go on in memory when the file cannot grow)."""
        with open(self.path, "rb") as f:
            data = f.read()
        if len(data) != self.size:
            raise OSError(f"{self.path} holds {len(data)} bytes, {self.size} were written to it")
        return data

    def seal(self) -> None:
        """Finish the file: what :meth:`Backend.put_staged` takes. Its content is not synced
        here: a backend that keeps this very file (a hard link in place, in a repository or a
        spool on the same filesystem) syncs it before naming it; one that copies or uploads it
        makes its own copy durable, and this file then goes. A file nobody took (the run was
        killed) is a temporary file, swept later: losing its content loses nothing."""
        if self._fd is None:
            raise ValueError("the staged file is closed")
        self.close()

    def close(self) -> None:
        """Close the descriptor (the file stays)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._ops.close(fd)

    def discard(self) -> None:
        """Close and remove the file (nothing of it is needed any more); never raises."""
        with contextlib.suppress(OSError):
            self.close()
        with contextlib.suppress(OSError):
            self._ops.unlink(self.path)


def read_file(path: str) -> bytes:
    """A staged file's bytes (backends that upload from memory)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        return f.read()
