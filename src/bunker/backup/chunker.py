"""Content-defined chunking (FastCDC with a keyed gear table, docs/format.md section 16), one definition for
backup threads, worker processes and verify: they must cut identically or dedup breaks."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO

from pyfastcdc import FastCDC

from bunker.crypto.derive import PutSecrets
from bunker.fs.fsmeta import DataReader, hole_bytes, hole_map


def make_cdc(chunker: dict[str, int], secrets: PutSecrets) -> FastCDC:
    """A chunker for the repository's parameters and the domain's gear seed (not thread-safe)."""
    return FastCDC(chunker["avg"], min_size=chunker["min"], max_size=chunker["max"], seed=secrets.chunker_seed)


def cut(cdc: FastCDC, data: bytes | memoryview) -> Iterable[bytes | memoryview]:
    """The chunks of an in-memory file: none for empty data, the data itself when it is not
    longer than the minimum chunk (small files are not split), else the FastCDC cut."""
    if not data:
        return ()
    if len(data) <= cdc.min_size:
        return (data,)
    return (c.data for c in cdc.cut_buf(data))


def file_pieces(f: BinaryIO, size: int, cdc: FastCDC) -> Iterable[bytes | memoryview]:
    """The chunks of an open regular file of ``size`` bytes, holes left out (SEEK_DATA/SEEK_HOLE),
    cut exactly as a backup cuts it (used to verify or store again what a backup stored)."""
    fd = f.fileno()
    holes = hole_map(fd, size)
    os.lseek(fd, 0, os.SEEK_SET)
    stream: BinaryIO | DataReader = DataReader(fd, size, holes) if holes else f
    if size - hole_bytes(holes) <= cdc.min_size:
        return cut(cdc, stream.read_all() if isinstance(stream, DataReader) else f.read())
    return (bytes(c.data) for c in cdc.cut_stream(stream))
