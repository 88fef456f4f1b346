"""Resuming large files (issue 5): a run killed in the middle of a large file restarts it from
the chunks it had stored, not from its start.

While a large file is read, its finished chunks (id and length) are tracked; each checkpoint
saves them in the files cache under the file's (device, inode), with its size, mtime and ctime.
The next run that reads the same unchanged file seeks past the prefix whose chunks are all in
the index and cuts on from there: content-defined chunking restarts identically at a cut point,
so the chunk ids that follow are the ones a whole read gives.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Container
from typing import Any

from bunker.backup.files_cache import FilesCache


class Tracked:
    """One large file being read: its identity and its finished chunks so far."""

    __slots__ = ("ident", "key", "pairs")

    def __init__(self, key: bytes, ident: tuple[int, int, int], pairs: list[list[Any]]) -> None:
        self.key, self.ident, self.pairs = key, ident, pairs

    def add(self, cid: bytes, length: int) -> None:
        self.pairs.append([cid, length])  # list.append is atomic: a checkpoint may copy meanwhile


class PartialFiles:
    """The large files being read by this run, for checkpoints and for the next run."""

    def __init__(self, cache: FilesCache, located: Container[bytes]) -> None:
        self.cache, self.located = cache, located
        self._lock = threading.Lock()
        self._reading: dict[bytes, Tracked] = {}
        self._finished: set[bytes] = set()

    def start(self, fd: int) -> tuple[Tracked, int]:
        """Begin reading the open file ``fd``: (tracker, offset to read from). The tracker starts
        with the chunks a killed run stored, if the file is unchanged since."""
        st = os.fstat(fd)
        key = struct.pack("<QQ", st.st_dev, st.st_ino)
        ident = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        pairs: list[list[Any]] = []
        offset = 0
        rec = self.cache.load_partial(key)
        if rec is not None and tuple(rec[:3]) == ident and isinstance(rec[3], list):
            for pair in rec[3]:
                if not (isinstance(pair, list) and len(pair) == 2 and pair[0] in self.located):
                    break
                pairs.append(pair)
                offset += int(pair[1])
        if offset > st.st_size:
            pairs, offset = [], 0
        t = Tracked(key, ident, pairs)
        with self._lock:
            self._reading[key] = t
        return t, offset

    def finish(self, t: Tracked) -> None:
        with self._lock:
            self._reading.pop(t.key, None)
            self._finished.add(t.key)

    def save(self) -> None:
        """At a checkpoint (after the packs were flushed): keep each file's stored prefix, and
        forget the records of files read to the end."""
        with self._lock:
            reading = list(self._reading.values())
            finished, self._finished = self._finished, set()
        for key in finished:
            self.cache.save_partial(key, None)
        for t in reading:
            prefix = []
            for pair in list(t.pairs):
                if pair[0] not in self.located:
                    break
                prefix.append(pair)
            if prefix:
                self.cache.save_partial(t.key, [*t.ident, prefix])
