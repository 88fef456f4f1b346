"""The set of chunk ids a snapshot needs, compact enough for 10 million chunks.

A backup collects every chunk id its snapshot names (file contents and trees) to write the
snapshot's chunk set (docs/format.md section 12) and to check that each is stored. A Python set
of 32-byte ids costs ~100 B per chunk (1 GB at 10 M), and every checkpoint copied it.
:class:`ChunkIdSet` keeps the ids it has made unique in one sorted numpy array (32 B per chunk)
and only the ids added since in a list, which it merges in once the list grows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import numpy as np

from bunker.repo.location_arrays import ID, id_prefix, runs

_RUN = 1 << 16  # ids added before they are sorted into a run of their own (~5 MB as bytes)


def sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    """The rows of the arrays ``parts`` ((n, 32) uint8 each) sorted as bytes compare, each once.
    ``parts`` is emptied (so they are freed as soon as they are copied together). Fast on sorted
    parts (the stable sort merges runs)."""
    ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
    parts.clear()
    if len(ids) < 2:
        return ids
    prefix = id_prefix(ids)
    order = np.argsort(prefix, kind="stable")
    prefix.sort()
    ids = ids[order]
    del order
    same = np.flatnonzero(prefix[1:] == prefix[:-1])
    if len(same):
        # rows that share their first 8 bytes: (almost always) one id added twice; sorted as
        # bytes within each run, then later copies dropped
        keep = np.ones(len(ids), dtype=bool)
        for first, last in runs(same.tolist()):
            run = sorted({ids[r].tobytes() for r in range(first, last + 1)})
            ids[first : first + len(run)] = np.frombuffer(b"".join(run), dtype=np.uint8).reshape(len(run), ID)
            keep[first + len(run) : last + 1] = False
        ids = ids[keep]
    return ids


class ChunkIdSet:
    """A growing set of chunk ids. Adding is cheap and thread-safe. Added ids are sorted into
    runs that merge pairwise as they grow (a binary counter: each id is merged O(log n) times);
    reading the set (:meth:`array`, ``len``, iteration) merges them all into one."""

    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        self._runs: list[np.ndarray] = []  # sorted and unique each, larger first
        self._added: list[bytes] = []
        self._lock = threading.Lock()
        self.update(ids)

    def add(self, cid: bytes) -> None:
        with self._lock:
            self._added.append(cid)
            if len(self._added) >= _RUN:
                self._sort_added()

    def update(self, ids: Iterable[bytes]) -> None:
        with self._lock:
            self._added.extend(ids)
            if len(self._added) >= _RUN:
                self._sort_added()

    def _sort_added(self) -> None:
        added, self._added = self._added, []
        if not added:
            return
        if any(len(c) != ID for c in added):
            raise ValueError("a chunk id is 32 bytes")
        runs_ = self._runs
        runs_.append(sorted_unique([np.frombuffer(b"".join(added), dtype=np.uint8).reshape(len(added), ID)]))
        while len(runs_) >= 2 and len(runs_[-2]) <= 2 * len(runs_[-1]):
            pair = [runs_.pop(-2), runs_.pop()]
            runs_.append(sorted_unique(pair))

    def array(self) -> np.ndarray:
        """Every id once, sorted, as an (n, 32) uint8 array (not to be changed)."""
        with self._lock:
            self._sort_added()
            if len(self._runs) >= 2:
                all_runs, self._runs = self._runs, []
                self._runs.append(sorted_unique(all_runs))
            return self._runs[0] if self._runs else np.zeros((0, ID), dtype=np.uint8)

    def union(self, more: Iterable[bytes]) -> ChunkIdSet:
        """A new set of these ids and ``more`` (the array is shared, not copied)."""
        out = ChunkIdSet()
        out._runs = [self.array()]
        out.update(more)
        return out

    def __len__(self) -> int:
        return len(self.array())

    def __iter__(self) -> Iterator[bytes]:
        """The ids in sorted order, as bytes."""
        a = self.array()
        for i in range(len(a)):
            yield a[i].tobytes()
