"""Content-defined chunking (FastCDC with a keyed gear table, docs/format.md section 16), one definition for
backup threads, worker processes and verify: they must cut identically or dedup breaks."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

from bunker.crypto.derive import PutSecrets
from bunker.fs.fsmeta import DataReader, hole_bytes, hole_map

if TYPE_CHECKING:
    from pyfastcdc import FastCDC


def make_cdc(chunker: dict[str, int], secrets: PutSecrets) -> FastCDC:
    """A chunker for the repository's parameters and the domain's gear seed (not thread-safe)."""
    from pyfastcdc import FastCDC  # (loaded with the first file to read: a run without any does without)

    return FastCDC(chunker["avg"], min_size=chunker["min"], max_size=chunker["max"], seed=secrets.chunker_seed)


def cut(cdc: FastCDC, data: bytes | memoryview) -> Iterable[bytes | memoryview]:
    """The chunks of an in-memory file: none for empty data, the data itself when it is not
    longer than the minimum chunk (small files are not split), else the FastCDC cut."""
    if not data:
        return ()
    if len(data) <= cdc.min_size:
        return (data,)
    return (c.data for c in cdc.cut_buf(data))


STREAM_BUFFER = 2 << 20  # bytes of a stream read at a time (more only for a chunk that needs more)


class Readable(Protocol):
    """A binary stream read with ``readinto`` (an unbuffered file, a DataReader, stdin's buffer)."""

    def readinto(self, b: memoryview, /) -> int | None: ...


def stream_chunks(cdc: FastCDC, f: Readable | BinaryIO) -> Iterator[memoryview]:
    """The chunks of a stream, cut exactly as FastCDC cuts its whole content, read into a buffer
    of :data:`STREAM_BUFFER` bytes that grows only for a chunk longer than it (pyfastcdc's own
    stream cutter holds twice the maximum chunk, 8 MiB with the default parameters, for each
    file being read). Each chunk is a view of the buffer, valid until the next is taken.

    Why the cuts are the same: FastCDC finds each cut from the bytes after the previous one
    only, at most the maximum chunk length on. A chunk that ends where the bytes read so far end
    (and is shorter than the maximum) may have been cut short by the buffer: it is cut again
    once more bytes are read."""
    readinto = getattr(f, "readinto", None) or functools.partial(_read_into, cast(BinaryIO, f))
    buf = bytearray(max(STREAM_BUFFER, 2 * cdc.min_size))
    filled, eof = 0, False
    while True:
        while not eof and filled < len(buf):
            n = readinto(memoryview(buf)[filled:])
            if not n:
                eof = True
            else:
                filled += n
        done = 0
        for c in cdc.cut_buf(memoryview(buf)[:filled]):
            end = c.offset + c.length
            if end == filled and not eof and c.length < cdc.max_size:
                break  # cut by the end of the bytes read, perhaps not by their content
            yield c.data
            done = end
        if eof and done == filled:
            return
        left = filled - done
        if left == len(buf):  # one chunk longer than the buffer: a larger one for it
            grown = bytearray(min(2 * len(buf), max(cdc.max_size, len(buf) + 1)))
            grown[:left] = buf
            buf = grown
        else:
            buf[:left] = buf[done:filled]
        filled = left


def _read_into(f: BinaryIO, b: memoryview) -> int:
    """``readinto`` for a stream that has only ``read``."""
    data = f.read(len(b))
    b[: len(data)] = data
    return len(data)


def file_pieces(f: BinaryIO, size: int, cdc: FastCDC) -> Iterable[bytes | memoryview]:
    """The chunks of an open regular file of ``size`` bytes, holes left out (SEEK_DATA/SEEK_HOLE),
    cut exactly as a backup cuts it (used to verify or store again what a backup stored)."""
    fd = f.fileno()
    holes = hole_map(fd, size)
    os.lseek(fd, 0, os.SEEK_SET)
    stream: BinaryIO | DataReader = DataReader(fd, size, holes) if holes else f
    if size - hole_bytes(holes) <= cdc.min_size:
        return cut(cdc, stream.read_all() if isinstance(stream, DataReader) else f.read())
    return (bytes(c) for c in stream_chunks(cdc, stream))
