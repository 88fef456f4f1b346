"""Chunk copies (chunk id, pack) as columns sorted by chunk id, for the per-chunk work of prune
(liveness.py) and check (agreed_copies.py) at millions of chunks.

A dict per pack of chunk id -> location, or a dict of chunk id -> pack, costs 110-500 B per chunk
copy (1-5 GB at 10 M). :class:`CopyTable` keeps 32 B of id and 4 B of pack number per copy, an
order sorted by the id's first 8 bytes (12 B) and a flag per copy: ~50 B (docs/performance.md,
"Scale"). Many ids are looked up at once, vectorized: a chunk set's part, an index object.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

import numpy as np

from bunker import encoding, heap
from bunker.repo.location_arrays import ID, TRIM_AT, runs


def native_prefix(ids: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each id ((n, 32) uint8) as integers that sort as the ids do, in the
    machine's byte order (searchsorted converts an array of the other order on every call)."""
    prefix = ids[:, :8].copy().view(np.uint64).ravel()
    if np.little_endian:
        prefix.byteswap(inplace=True)  # (one copy: id_prefix's big-endian view would need two)
    return prefix


class CopiesBuilder:
    """Collects chunk copies (chunk id, pack, and a number per copy such as its blob length)
    in flat buffers."""

    def __init__(self, lengths: bool = True) -> None:
        """``lengths``: keep the number given with each copy (else it is dropped: 4 B per copy)."""
        self.ids = bytearray()
        self.pack = array("I")
        self.length = array("I") if lengths else None
        self.numbers: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.pack)

    def add(self, entries: Iterable[tuple[bytes, str, int]]) -> None:
        """Add (chunk id, pack, length) copies."""
        ids, pack, length, numbers = self.ids, self.pack, self.length, self.numbers
        for cid, name, n in entries:
            if len(cid) != ID:
                raise encoding.FormatError("chunk id of the wrong length")
            pno = numbers.get(name)
            if pno is None:
                pno = numbers[name] = len(numbers)
            ids += cid
            pack.append(pno)
            if length is not None:
                length.append(n)

    def has_pack(self, pack: str) -> bool:
        return pack in self.numbers


class CopyTable:
    """The copies of a :class:`CopiesBuilder` (which it takes over), sorted by chunk id; a copy
    listed twice (an index object and its rewrite both list it) is counted once."""

    def __init__(self, found: CopiesBuilder) -> None:
        self.packs = list(found.numbers)
        self._number = found.numbers
        n = len(found.pack)
        self._ids = np.frombuffer(found.ids, dtype=np.uint8).reshape(n, ID)
        self._pack = np.frombuffer(found.pack, dtype=np.uint32)
        self._length = np.frombuffer(found.length if found.length is not None else b"", dtype=np.uint32)
        prefix = native_prefix(self._ids)
        order = np.argsort(prefix, kind="stable")
        prefix.sort()
        self._counted = np.ones(n, dtype=bool)  # False: a copy that repeats one before it
        tied = np.flatnonzero(prefix[1:] == prefix[:-1])  # i: rows i and i + 1 share the prefix
        if len(tied):
            starts = np.ones(len(tied), dtype=bool)
            starts[1:] = tied[1:] != tied[:-1] + 1
            ends = np.ones(len(tied), dtype=bool)
            ends[:-1] = starts[1:]
            pairs = tied[starts & ends]  # runs of two rows (a chunk in two packs, or listed twice)
            a, b = order[pairs], order[pairs + 1]
            repeat = (self._pack[a] == self._pack[b]) & (self._ids[a] == self._ids[b]).all(axis=1)
            self._counted[b[repeat]] = False
            for lo, hi in runs(tied[~(starts & ends)].tolist()):  # longer runs (rare): one by one
                seen: set[tuple[bytes, int]] = set()
                for r in order[lo : hi + 1].tolist():
                    key = (self._ids[r].tobytes(), int(self._pack[r]))
                    if key in seen:
                        self._counted[r] = False
                    seen.add(key)
        self._order = order.astype(np.int32 if n < 1 << 31 else np.int64)
        del order
        self._sorted = prefix  # the id prefix of each copy in that order, for searchsorted
        if n >= TRIM_AT:
            heap.give_back()  # the decoded entries and the sort's temporaries

    def __len__(self) -> int:
        return len(self._pack)

    def has_pack(self, pack: str) -> bool:
        """Whether any copy is known in ``pack``."""
        return pack in self._number

    def pack_mask(self, packs: Iterable[str]) -> np.ndarray:
        """A flag per pack number: set for ``packs`` (names of no copy here are left out)."""
        mask = np.zeros(max(1, len(self.packs)), dtype=bool)
        numbers = [self._number[p] for p in packs if p in self._number]
        mask[numbers] = True
        return mask

    def matches(self, chunk_ids: bytes, packs: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """For ``chunk_ids`` (32-byte ids end to end: a chunk set's part), batches of (query
        positions, rows) of the copies of those chunks held in packs that ``packs`` (from
        :meth:`pack_mask`) flags; each chunk's copies (usually one) are visited in step with all
        the others'."""
        if len(chunk_ids) % ID:
            raise encoding.FormatError("chunk ids of the wrong length")
        q = np.frombuffer(chunk_ids, dtype=np.uint8).reshape(-1, ID)
        if not len(q) or not len(self._sorted):
            return
        qp = native_prefix(q)
        at = np.searchsorted(self._sorted, qp, side="left")
        end = np.searchsorted(self._sorted, qp, side="right")
        open_ = np.flatnonzero(at < end)
        while len(open_):
            rows = self._order[at[open_]]
            hit = (self._ids[rows] == q[open_]).all(axis=1) & packs[self._pack[rows]]
            if hit.any():
                yield open_[hit], rows[hit]
            at[open_] += 1
            open_ = open_[at[open_] < end[open_]]

    def found(self, chunk_ids: bytes, packs: np.ndarray) -> np.ndarray:
        """A flag per id of ``chunk_ids``: some copy of it is in a pack ``packs`` flags."""
        out = np.zeros(len(chunk_ids) // ID, dtype=bool)
        for positions, _ in self.matches(chunk_ids, packs):
            out[positions] = True
        return out
