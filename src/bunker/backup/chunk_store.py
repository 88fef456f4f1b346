"""Cutting file data into chunks and storing the new ones through the session writer.

Runs on the archiver's reader threads: each thread has its own FastCDC state (pyfastcdc objects
are not shared between threads), while the writer deduplicates and uploads for all of them. Small
files are read whole and cut in memory; large ones are streamed, and a large file that a killed
run had partly stored resumes after its stored chunks (resume.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from bunker.backup.chunker import Readable, cut, make_cdc, stream_chunks
from bunker.backup.file_reader import read_all
from bunker.backup.resume import PartialFiles, Tracked
from bunker.errors import BunkerError, ExitCode
from bunker.fs.fsmeta import DataReader, hole_bytes
from bunker.repo import blob
from bunker.repo.pack import KIND_META
from bunker.repo.session_writer import SessionWriter
from bunker.repo.tree import MAX_TREE, encode_tree

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

READ_WHOLE = 8 << 20  # files up to this size are read in one go and cut in memory


class Halted(Exception):
    """The run is stopping (:meth:`ChunkStore.halt`): the file being read is left out."""


class ChunkStore:
    """Chunks data and stores what the repository does not hold yet. ``count_bytes`` is told how
    many bytes were consumed (progress); ``resumed`` how many a resumed file did not read again."""

    def __init__(
        self,
        writer: SessionWriter,
        partial_files: PartialFiles,
        count_bytes: Callable[[int], None],
        resumed: Callable[[int], None],
    ) -> None:
        self.writer = writer
        self.partial_files = partial_files
        self._count, self._resumed = count_bytes, resumed
        self._local = threading.local()
        # tree id -> (entries, bytes of files, regular files) of the trees below it, every path counted
        # (FORMAT.md section 13, stats ``entries`` and ``entry_bytes``); every tree of a run is
        # stored through store_tree, so a directory's subtrees are always here already
        self._totals: dict[bytes, tuple[int, int, int]] = {}  # entries, entry_bytes, files
        self.halted = False

    def halt(self) -> None:
        """Make every read in progress stop at its next chunk with :class:`Halted` (an
        interrupted run: what is in flight is left to the next run)."""
        self.halted = True

    def _cdc(self) -> FastCDC:
        c = getattr(self._local, "cdc", None)
        if c is None:
            c = self._local.cdc = make_cdc(self.writer.repo.config.chunker, self.writer.secrets)
        return c

    def store_bytes(self, data: bytes | memoryview) -> list[bytes]:
        """Chunk and store data held in memory; return the chunk ids."""
        w = self.writer
        out = []
        for piece in cut(self._cdc(), data):
            if self.halted:
                raise Halted
            cid = blob.chunk_id(w.secrets, piece)
            out.append(cid)
            if not w.known(cid):
                w.store(cid, piece)
        return out

    def store_tree(self, entries: list[dict[str, Any]]) -> bytes:
        """Encode and store a tree (in a metadata pack); return its id."""
        data = encode_tree(entries)
        _check_size(data, len(entries))
        cid = blob.chunk_id(self.writer.secrets, data)
        if cid not in self._totals:
            n, nbytes, files = len(entries), 0, 0
            for e in entries:
                kind = e.get("t")
                if kind == "f":
                    nbytes += e.get("sz", 0)
                    files += 1
                elif kind == "d":
                    sub = self._totals[e["st"]]
                    n += sub[0]
                    nbytes += sub[1]
                    files += sub[2]
            self._totals[cid] = (n, nbytes, files)
        if not self.writer.known(cid):
            self.writer.store(cid, data, KIND_META)
        return cid

    def store_encoded_tree(self, data: bytes, totals: tuple[int, int, int]) -> bytes:
        """Store a tree encoded elsewhere (a directory read whole, whole_dirs.py) with its
        totals (entries, bytes of files, files); return its id."""
        _check_size(data, totals[0])
        cid = blob.chunk_id(self.writer.secrets, data)
        self._totals.setdefault(cid, totals)
        if not self.writer.known(cid):
            self.writer.store(cid, data, KIND_META)
        return cid

    def tree_totals(self, tid: bytes) -> tuple[int, int, int]:
        """(entries, bytes of files, files) below a tree stored or reused by this run."""
        return self._totals[tid]

    def reuse_tree(self, tid: bytes, totals: tuple[int, int, int]) -> None:
        """Count a tree an earlier run stored (backup/tree_reuse.py) as this run's, with its totals."""
        self._totals.setdefault(tid, totals)

    def tree_stats(self, root: bytes) -> dict[str, int]:
        """The ``entries`` and ``entry_bytes`` statistics of a root tree stored by this run."""
        n, nbytes, _ = self._totals[root]
        return {"entries": n, "entry_bytes": nbytes}

    def partial_stats(self, root: bytes) -> dict[str, int]:
        """The statistics of a checkpoint's partial tree: ``entries`` and ``entry_bytes``, and
        ``files`` and ``bytes`` counted in the tree itself (the names of regular files and their
        sizes), so that an incomplete snapshot claims exactly the files it restores."""
        n, nbytes, files = self._totals[root]
        return {"entries": n, "entry_bytes": nbytes, "files": files, "bytes": nbytes}

    def store_stream(self, f: Readable | BinaryIO, track: Tracked | None = None) -> tuple[list[bytes], int]:
        """Chunk and store a stream; return (chunk ids, bytes read). ``track``: a large file
        being read (resume.py), perhaps from where a killed run stopped."""
        out: list[bytes] = [p[0] for p in track.pairs] if track else []
        total = sum(int(p[1]) for p in track.pairs) if track else 0
        w = self.writer
        for data in stream_chunks(self._cdc(), f):
            if self.halted:
                raise Halted
            cid = blob.chunk_id(w.secrets, data)
            out.append(cid)
            total += len(data)
            if not w.known(cid):
                w.store(cid, data)
            if track is not None:
                track.add(cid, len(data))
            self._count(len(data))
        return out, total

    def consume(self, fd: int, size: int, holes: list[int]) -> tuple[list[bytes], int]:
        """Chunk and store an open regular file of ``size`` bytes with ``holes`` (fsmeta.hole_map):
        only its data regions are read. Returns (chunk ids, bytes of data)."""
        if holes:
            reader = DataReader(fd, size, holes)
            if size - hole_bytes(holes) > READ_WHOLE:
                return self.store_stream(reader)
            data = reader.read_all()
        elif size <= READ_WHOLE:
            data = read_all(fd, size)
        else:
            track, offset = self.partial_files.start(fd)
            if offset:  # a killed run stored this much of the unchanged file: not read again
                self._count(offset)
                self._resumed(offset)
            os.lseek(fd, offset, os.SEEK_SET)
            try:
                with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                    stored = self.store_stream(f, track)
            except Halted:
                raise  # still being read for the final checkpoint, which keeps its stored prefix
            except BaseException:
                self.partial_files.finish(track)
                raise
            self.partial_files.finish(track)
            return stored
        chunks = self.store_bytes(data)
        self._count(len(data))
        return chunks, len(data)


def _check_size(data: bytes, entries: int) -> None:
    if len(data) > MAX_TREE:
        raise BunkerError(
            f"a directory of {entries} entries encodes to {len(data)} bytes, more than a tree may hold "
            f"({MAX_TREE}, FORMAT.md section 14); no snapshot was written",
            "exclude part of that directory (--exclude) or spread its files over subdirectories, and back up again",
            exit_code=ExitCode.FATAL,
        )
