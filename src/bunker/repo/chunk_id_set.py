"""The set of chunk ids a snapshot needs, compact enough for 10 million chunks.

A backup collects every chunk id its snapshot names (file contents and trees) to write the
snapshot's chunk set (docs/format.md section 12) and to check that each is stored. A Python set
of 32-byte ids costs ~100 B per chunk (1 GB at 10 M), and every checkpoint copied it.
:class:`ChunkIdSet` keeps the ids it has made unique in one sorted numpy array (32 B per chunk)
and only the ids added since in a list, which it merges in once the list grows. A set that never
grew past that list (a small backup) is sorted in Python and never imports numpy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from bunker.repo.location_arrays import ID

if TYPE_CHECKING:
    import numpy as np

_RUN = 1 << 16  # ids added before they are sorted into a run of their own (~5 MB as bytes)
BLOCK = 1 << 16  # ids made bytes at once when the set is read in blocks


class ChunkIdSet:
    """A growing set of chunk ids. Adding is cheap and thread-safe. Added ids are sorted into
    runs that merge pairwise as they grow (a binary counter: each id is merged O(log n) times);
    reading the set (:meth:`sorted_ids`, ``len``, iteration) merges them all into one."""

    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        self._runs: list[np.ndarray] = []  # sorted and unique each, larger first
        self._added: list[bytes] = []
        self._small: tuple[bytes, ...] | None = None  # the sorted ids, while only ``_added`` holds them
        self._lock = threading.Lock()
        self.update(ids)

    def add(self, cid: bytes) -> None:
        with self._lock:
            self._added.append(cid)
            self._small = None
            if len(self._added) >= _RUN:
                self._sort_added()

    def update(self, ids: Iterable[bytes]) -> None:
        with self._lock:
            self._added.extend(ids)
            self._small = None
            if len(self._added) >= _RUN:
                self._sort_added()

    def _sort_added(self) -> None:
        added, self._added = self._added, []
        if not added:
            return
        _check(added)
        import numpy as np

        from bunker.repo.id_arrays import sorted_unique

        runs_ = self._runs
        runs_.append(sorted_unique([np.frombuffer(b"".join(added), dtype=np.uint8).reshape(len(added), ID)]))
        while len(runs_) >= 2 and len(runs_[-2]) <= 2 * len(runs_[-1]):
            pair = [runs_.pop(-2), runs_.pop()]
            runs_.append(sorted_unique(pair))

    def sorted_ids(self) -> tuple[bytes, ...] | np.ndarray:
        """Every id once, sorted: a tuple of ids while the set is small, else an (n, 32) uint8
        array (not to be changed)."""
        with self._lock:
            if not self._runs:
                if self._small is None:  # (a commit reads the set several times: sorted once)
                    _check(self._added)
                    self._small = tuple(sorted(set(self._added)))
                    self._added = list(self._small)
                return self._small
            self._sort_added()
            if len(self._runs) >= 2:
                from bunker.repo.id_arrays import sorted_unique

                all_runs, self._runs = self._runs, []
                self._runs.append(sorted_unique(all_runs))
            return self._runs[0]

    def union(self, more: Iterable[bytes]) -> ChunkIdSet:
        """A new set of these ids and ``more`` (the array is shared, not copied)."""
        out = ChunkIdSet()
        ids = self.sorted_ids()
        if isinstance(ids, tuple):
            out._added = list(ids)
        else:
            out._runs = [ids]
        out.update(more)
        return out

    def __len__(self) -> int:
        return len(self.sorted_ids())

    def blocks(self, size: int = BLOCK) -> Iterator[Sequence[bytes]]:
        """The ids in sorted order, in consecutive blocks of at most ``size`` (bytes objects
        for one block at a time: 10 M ids are never all held as bytes)."""
        ids = self.sorted_ids()
        if isinstance(ids, tuple):
            yield ids
            return
        for start in range(0, len(ids), size):
            raw = ids[start : start + size].tobytes()
            yield [raw[i : i + ID] for i in range(0, len(raw), ID)]

    def __iter__(self) -> Iterator[bytes]:
        """The ids in sorted order, as bytes."""
        ids = self.sorted_ids()
        if isinstance(ids, tuple):
            yield from ids
            return
        for i in range(len(ids)):
            yield ids[i].tobytes()


def _check(ids: list[bytes]) -> None:
    if any(len(c) != ID for c in ids):
        raise ValueError("a chunk id is 32 bytes")
