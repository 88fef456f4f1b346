"""chunk id -> where its blob is stored, compact enough for 10 million chunks on a client.

A dict of 32-byte keys costs ~190 B per chunk (the key object, the value, the table slot); at
10 M chunks that is 2 GB. :class:`LocationMap` keeps the bulk of its entries in flat arrays
instead (docs/performance.md, "Scale"):

- the chunk ids, 32 bytes each, in one ``bytes`` object, ordered by their first 8 bytes;
- the location columns (pack number, offset, length, raw length): 20 bytes per chunk;
- a bucket directory over the ids' leading bits, about one bucket per chunk (4-8 bytes), so a
  lookup reads one or two ids of its bucket and compares them whole.

That is ~56-60 bytes per chunk. Entries added after the arrays were built (the packs a backup
uploads) go to a small dict first and are folded into new arrays when it grows, so adding stays
cheap and the arrays are rebuilt a logarithmic number of times. Lookups of many ids at once
(:meth:`LocationMap.locate_many`) run vectorized; single lookups cost about half a microsecond.

Readers need no lock: the arrays are replaced whole (one attribute), and the dict of new entries
is replaced only after the arrays holding its entries are in place. Writers hold the map's lock.
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar, overload

import numpy as np

from bunker import encoding, heap

_T = TypeVar("_T")
ID = 32  # bytes of a chunk id
_OFFSET_LIMIT = 1 << 40  # offsets below 1 TiB (a pack is far smaller)
_LENGTH_LIMIT = 1 << 32  # a blob is far smaller than 4 GiB
_FOLD_AT = 1 << 16  # new entries kept in the dict before they are folded into the arrays
_TRIM_AT = 1 << 18  # arrays of this many entries and more give their temporaries back to the system


class Location(NamedTuple):
    """Where a chunk's blob is stored."""

    pack: str  # hex name (without "packs/")
    offset: int
    length: int
    raw_length: int


_DTYPES = (np.uint32, np.uint64, np.uint32, np.uint32)  # pack number, offset, length, raw length
_CODES = ("I", "Q", "I", "I")


class _Arrays:
    """An immutable, deduplicated set of entries: ids grouped by bucket, columns in the same
    row order. Within a bucket, rows keep the order they were added in. ``ids`` is a bytearray
    and the columns are Python arrays: items index at Python speed (numpy's scalar indexing
    costs several times more), and numpy views them without a copy for vectorized work."""

    __slots__ = ("ids", "starts", "shift", "pack", "offset", "length", "raw", "n")

    def __init__(
        self,
        ids: bytearray,
        starts: array[int],
        shift: int,
        cols: tuple[array[int], array[int], array[int], array[int]],
    ) -> None:
        self.ids, self.starts, self.shift = ids, starts, shift
        self.pack, self.offset, self.length, self.raw = cols
        self.n = len(ids) // ID

    def row(self, cid: bytes) -> int:
        """The row of ``cid``, or -1."""
        starts = self.starts
        b: int = _HEAD(cid)[0] >> self.shift
        lo, hi = starts[b], starts[b + 1]
        ids = self.ids
        while lo < hi:
            if ids.startswith(cid, lo * ID):  # compares in place, no slice is made
                return lo
            lo += 1
        return -1

    def columns(self) -> list[np.ndarray]:
        """Views (no copies) of the ids, as an (n, 32) array, and the four columns."""
        return [np.frombuffer(self.ids, dtype=np.uint8).reshape(self.n, ID)] + [
            np.frombuffer(c, dtype=t)
            for c, t in zip((self.pack, self.offset, self.length, self.raw), _DTYPES, strict=True)
        ]


_HEAD = struct.Struct(">I").unpack_from  # the bucket is read from an id's first 4 bytes
_EMPTY = _Arrays(bytearray(), array("I", [0, 0]), 32, (array("I"), array("Q"), array("I"), array("I")))


def _build(parts: list[list[np.ndarray] | None]) -> _Arrays:
    """Arrays of the entries of ``parts`` (each: ids as an (n, 32) array, then the four
    columns; in the order the entries were added); of equal ids only the first is kept.

    The parts are consumed: each is scattered into the new arrays at its sorted positions and
    dropped, and the heap is given back to the system as they go, so loading 10 M entries peaks
    at the staged parts plus 16 B per entry, not at several copies of them."""
    sizes = [0 if p is None else len(p[0]) for p in parts]
    total = sum(sizes)
    if total == 0:
        return _EMPTY
    prefix = np.empty(total, dtype=np.uint64)
    at = 0
    for p, k in zip(parts, sizes, strict=True):
        if p is not None:
            prefix[at : at + k] = p[0][:, :8].copy().view(">u8").ravel()
            at += k
    order = np.argsort(prefix, kind="stable")  # stable: equal prefixes keep the order added
    prefix.sort()  # in place: the same as prefix[order], without another copy
    keep = np.ones(total, dtype=bool)
    same = np.flatnonzero(prefix[1:] == prefix[:-1])
    if len(same):
        # runs of one 8-byte prefix: (almost always) one chunk stored in two packs; of each id
        # only its first row stays
        offsets = np.cumsum([0] + sizes)
        for first, last in _runs(same.tolist()):
            seen: set[bytes] = set()
            for r in range(first, last + 1):
                g = int(order[r])
                k = int(np.searchsorted(offsets, g, side="right")) - 1
                part = parts[k]
                assert part is not None
                key = part[0][g - int(offsets[k])].tobytes()
                keep[r] = key not in seen
                seen.add(key)
    if len(same):
        prefix = prefix[keep]
    n = len(prefix)
    bits = max(8, min(31, (n - 1).bit_length() - 1))  # one or two chunks per bucket
    prefix >>= np.uint64(64 - bits)  # in place: the bucket of each id, below 2**31
    counts = np.bincount(prefix.view(np.int64), minlength=1 << bits)
    del prefix
    starts = array("I", [0]) * ((1 << bits) + 1)
    np.cumsum(counts, out=np.frombuffer(starts, dtype=np.uint32)[1:], dtype=np.uint32)
    del counts
    # where each added row goes in the new arrays (-1: a later copy of an id, dropped)
    small = np.int32 if total < 1 << 31 else np.int64
    dest = np.empty(total, dtype=small)
    if len(same):
        dest[order] = np.where(keep, np.cumsum(keep, dtype=small) - 1, -1)
    else:
        dest[order] = np.arange(total, dtype=small)
    del order, keep
    ids = bytearray(n * ID)
    out = [np.frombuffer(ids, dtype=np.uint8).reshape(n, ID)]
    cols = [array(code, [0]) * n for code in _CODES]
    out += [np.frombuffer(c, dtype=t) for c, t in zip(cols, _DTYPES, strict=True)]
    at = given = 0
    for i, k in enumerate(sizes):
        part = parts[i]
        if part is None:
            continue
        d = dest[at : at + k]
        if len(same):
            kept = np.greater_equal(d, 0)
            d = d[kept]
            for dst, src in zip(out, part, strict=True):
                dst[d] = src[kept]
        else:
            for dst, src in zip(out, part, strict=True):
                dst[d] = src
        at += k
        parts[i] = None
        del part, d
        given += k
        if given >= 1 << 20 and total >= _TRIM_AT:  # every 1 M entries (52 MB) copied
            heap.give_back()
            given = 0
    del out
    return _Arrays(ids, starts, 32 - bits, (cols[0], cols[1], cols[2], cols[3]))


def _runs(positions: list[int]) -> Iterator[tuple[int, int]]:
    """Rows [first, last] of each run of equal neighbours, given the positions i where row i
    equals row i + 1 (ascending)."""
    first = last = -2
    for i in positions:
        if i != last:  # a new run
            if first >= 0:
                yield first, last
            first = i
        last = i + 1
    if first >= 0:
        yield first, last


def _np(a: array[int]) -> np.ndarray:
    return np.frombuffer(a, dtype={"I": np.uint32, "Q": np.uint64}[a.typecode])


class LocationMap(Mapping[bytes, Location]):
    """chunk id -> Location, about 60 bytes per chunk (see the module's docstring). The first
    location added for a chunk wins (equal chunks stored in two packs are both valid)."""

    __slots__ = ("_arrays", "_new", "_staged", "_packs", "_numbers", "_lock")

    def __init__(self) -> None:
        self._arrays = _EMPTY
        self._new: dict[bytes, tuple[int, int, int, int]] = {}
        # column batches not folded in yet (loading many index objects folds once): ids as an
        # (n, 32) array and the four columns
        self._staged: list[list[np.ndarray] | None] = []
        self._packs: list[str] = []
        self._numbers: dict[str, int] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- adding
    def add(self, cid: bytes, loc: Location) -> None:
        """Record ``loc`` for ``cid`` unless the chunk already has a location."""
        self.update([(cid, loc)])

    def update(self, entries: Iterable[tuple[bytes, Location]]) -> None:
        """Record many locations (first one per chunk wins)."""
        with self._lock:
            if self._staged:
                self._fold()
            arrays, new, numbers, packs = self._arrays, self._new, self._numbers, self._packs
            for cid, (pack, offset, length, raw) in entries:
                if cid in new or arrays.row(cid) >= 0:
                    continue
                pno = numbers.get(pack)
                if pno is None:
                    pno = numbers[pack] = len(packs)
                    packs.append(pack)
                _check(cid, offset, length, raw)
                new[cid] = (pno, offset, length, raw)
            if len(new) >= max(_FOLD_AT, arrays.n // 4):
                self._fold()

    def update_columns(self, c: LocationColumns) -> None:
        """Record many locations given as columns (first one per chunk wins, also against
        entries added before). They are folded in at the next lookup."""
        n = len(c)
        if n == 0:
            return
        if len(c.ids) != n * ID or len(c.pack_numbers) != n or c.cols.shape != (n, 3):
            raise encoding.FormatError("index columns of unequal lengths")
        if int(c.cols[:, 0].max()) >= _OFFSET_LIMIT or int(c.cols[:, 1:].max()) >= _LENGTH_LIMIT:
            raise encoding.FormatError("index location out of range")
        if int(c.pack_numbers.max()) >= len(c.packs):
            raise encoding.FormatError("index entry names a pack it does not list")
        ids, packs, pack_numbers, cols = c.ids, c.packs, c.pack_numbers, c.cols
        with self._lock:
            numbers, names = self._numbers, self._packs
            mine = []
            for p in packs:
                pno = numbers.get(p)
                if pno is None:
                    pno = numbers[p] = len(names)
                    names.append(p)
                mine.append(pno)
            self._staged.append(
                [
                    np.frombuffer(ids, dtype=np.uint8).reshape(n, ID),
                    np.array(mine, dtype=np.uint32)[pack_numbers],
                    cols[:, 0].astype(np.uint64),
                    cols[:, 1].astype(np.uint32),
                    cols[:, 2].astype(np.uint32),
                ]
            )

    def _fold(self) -> None:
        """New arrays of the current ones, the dict of new entries, then the staged columns (in
        that order, so the first location added wins). Under the lock."""
        staged = self._staged
        parts: list[list[np.ndarray] | None] = [self._arrays.columns()]
        if self._new:
            new = self._new
            vals = np.array(list(new.values()), dtype=np.uint64).reshape(len(new), 4)
            ids = np.frombuffer(b"".join(new), dtype=np.uint8).reshape(len(new), ID)
            parts.append([ids] + [vals[:, i].astype(t) for i, t in enumerate(_DTYPES)])
            del vals, ids, new
        for i in range(len(staged)):
            parts.append(staged[i])
            staged[i] = None  # the list stays non-empty: readers wait for this fold (see _find)
        built = _build(parts)
        self._arrays = built  # first: a reader that finds the dict emptied finds the entries here
        self._new = {}
        self._staged = []
        if built.n >= _TRIM_AT:
            heap.give_back()  # the temporaries were several times the arrays' size

    def _settle(self) -> None:
        """Fold staged column batches in before a lookup."""
        with self._lock:
            if self._staged:
                self._fold()

    # -------------------------------------------------------------- looking up
    def _find(self, cid: bytes) -> tuple[int, int, int, int] | None:
        if self._staged:
            self._settle()
        v = self._new.get(cid)
        if v is not None or len(cid) != ID:
            return v
        a = self._arrays
        r = a.row(cid)
        if r < 0:
            # folded meanwhile: the dict read above was the old one, the arrays now hold it
            v = self._new.get(cid)
            if v is not None or self._arrays is a:
                return v
            a = self._arrays
            r = a.row(cid)
            if r < 0:
                return None
        return a.pack[r], a.offset[r], a.length[r], a.raw[r]

    def __getitem__(self, cid: bytes) -> Location:
        v = self._find(cid)
        if v is None:
            raise KeyError(cid)
        return Location(self._packs[v[0]], v[1], v[2], v[3])

    @overload
    def get(self, cid: bytes, /) -> Location | None: ...
    @overload
    def get(self, cid: bytes, default: Location, /) -> Location: ...
    @overload
    def get(self, cid: bytes, default: _T, /) -> Location | _T: ...
    def get(self, cid: bytes, default: object = None, /) -> object:
        v = self._find(cid)
        return default if v is None else Location(self._packs[v[0]], v[1], v[2], v[3])

    def __contains__(self, cid: object) -> bool:
        # the hot lookup of a backup (is this chunk stored?): _Arrays.row inlined
        if self._staged:
            self._settle()
        if cid in self._new:
            return True
        if type(cid) is not bytes or len(cid) != ID:
            return False
        a = self._arrays
        starts = a.starts
        b: int = _HEAD(cid)[0] >> a.shift
        lo, hi = starts[b], starts[b + 1]
        ids = a.ids
        while lo < hi:
            if ids.startswith(cid, lo * ID):
                return True
            lo += 1
        # folded meanwhile: the dict read above was the old one, the new arrays hold the entry
        return cid in self._new or (self._arrays is not a and self._arrays.row(cid) >= 0)

    def __iter__(self) -> Iterator[bytes]:
        if self._staged:
            self._settle()
        a, new = self._arrays, dict(self._new)
        ids = a.ids
        for r in range(a.n):
            yield bytes(ids[r * ID : (r + 1) * ID])
        yield from new

    def __len__(self) -> int:
        if self._staged:
            self._settle()
        return self._arrays.n + len(self._new)

    def locate_many(self, chunk_ids: Sequence[bytes]) -> tuple[set[str], list[bytes]]:
        """The packs that hold ``chunk_ids`` and the ids that are not located, vectorized (a
        snapshot of 10 M chunks takes seconds, not minutes)."""
        n = len(chunk_ids)
        if n < 64:
            packs: set[str] = set()
            missing: list[bytes] = []
            for c in chunk_ids:
                v = self._find(c)
                if v is None:
                    missing.append(c)
                else:
                    packs.add(self._packs[v[0]])
            return packs, missing
        if self._staged:
            self._settle()
        a, new = self._arrays, self._new
        q = np.frombuffer(b"".join(chunk_ids), dtype=np.uint8).reshape(n, ID)
        rows = _rows(a, q)
        found = rows >= 0
        numbers = set(np.unique(_np(a.pack)[rows[found]]).tolist()) if a.n else set()
        missing = []
        for i in np.flatnonzero(~found).tolist():
            c = chunk_ids[i]
            v = new.get(c)
            if v is None and self._arrays is not a:  # folded meanwhile
                v = self._find(c)
            if v is None:
                missing.append(c)
            else:
                numbers.add(v[0])
        return {self._packs[p] for p in numbers}, missing

    def missing(self, chunk_ids: Sequence[bytes]) -> list[bytes]:
        """The ids of ``chunk_ids`` that are not located."""
        if len(chunk_ids) < 64:
            return [c for c in chunk_ids if self._find(c) is None]
        return self.locate_many(chunk_ids)[1]

    def packs(self) -> set[str]:
        """The packs that hold at least one chunk of the map."""
        if self._staged:
            self._settle()
        a = self._arrays
        numbers = set(np.unique(_np(a.pack)).tolist()) if a.n else set()
        numbers.update(v[0] for v in list(self._new.values()))
        return {self._packs[p] for p in numbers}

    def nbytes(self) -> int:
        """Bytes the arrays take (the dict of new entries not counted)."""
        if self._staged:
            self._settle()
        a = self._arrays
        return len(a.ids) + sum(x.itemsize * len(x) for x in (a.starts, a.pack, a.offset, a.length, a.raw))


def _rows(a: _Arrays, q: np.ndarray) -> np.ndarray:
    """Rows of the ids ``q`` ((m, 32) uint8) in ``a``, -1 where absent: each id's bucket is
    probed in step with all the others'."""
    m = len(q)
    if a.n == 0:
        return np.full(m, -1, dtype=np.int64)
    ids = np.frombuffer(a.ids, dtype=np.uint8).reshape(a.n, ID)
    starts = np.frombuffer(a.starts, dtype=np.uint32)
    b = (q[:, :4].copy().view(">u4").ravel() >> np.uint32(a.shift)).astype(np.int64)
    at = starts[b].astype(np.int64)
    end = starts[b + 1].astype(np.int64)
    rows = np.full(m, -1, dtype=np.int64)
    open_ = np.flatnonzero(at < end)
    while len(open_):
        r = at[open_]
        hit = (ids[r] == q[open_]).all(axis=1)
        rows[open_[hit]] = r[hit]
        at[open_] += 1
        left = ~hit & (at[open_] < end[open_])
        open_ = open_[left]
    return rows


def _check(cid: bytes, offset: int, length: int, raw: int) -> None:
    if len(cid) != ID:
        raise encoding.FormatError("chunk id of the wrong length in an index entry")
    if not (0 <= offset < _OFFSET_LIMIT and 0 <= length < _LENGTH_LIMIT and 0 <= raw < _LENGTH_LIMIT):
        raise encoding.FormatError(f"index location out of range for chunk {cid.hex()[:16]}")


@dataclass(frozen=True, slots=True)
class LocationColumns:
    """Index entries as columns: what one index object holds, read or cached without a Python
    object per entry."""

    ids: bytes  # the chunk ids end to end
    packs: list[str]  # the pack names the entries refer to by number
    pack_numbers: np.ndarray  # uint32, one per entry: an index into ``packs``
    cols: np.ndarray  # (n, 3) uint64: offset, length, raw length

    def __len__(self) -> int:
        return len(self.ids) // ID

    @classmethod
    def from_entries(cls, entries: Sequence[tuple[bytes, Location]]) -> LocationColumns:
        numbers: dict[str, int] = {}
        pnos = [numbers.setdefault(loc.pack, len(numbers)) for _, loc in entries]
        cols = np.array([loc[1:] for _, loc in entries], dtype=np.uint64).reshape(len(entries), 3)
        return cls(b"".join(cid for cid, _ in entries), list(numbers), np.array(pnos, dtype=np.uint32), cols)

    def entries(self) -> list[tuple[bytes, Location]]:
        """The entries as (chunk id, Location) pairs."""
        ids, packs = self.ids, self.packs
        rows = zip(self.pack_numbers.tolist(), self.cols.tolist(), strict=True)
        return [
            (ids[i * ID : (i + 1) * ID], Location(packs[p], off, n, raw)) for i, (p, (off, n, raw)) in enumerate(rows)
        ]

    def used_packs(self) -> set[str]:
        """The packs at least one entry names."""
        return {self.packs[p] for p in np.unique(self.pack_numbers).tolist()}

    def select(self, keep_pack: Callable[[str], bool]) -> LocationColumns:
        """The entries whose pack ``keep_pack`` accepts."""
        ok = np.array([keep_pack(p) for p in self.packs], dtype=bool)
        if ok.all():
            return self
        mask = ok[self.pack_numbers] if len(ok) else np.zeros(0, dtype=bool)
        ids = np.frombuffer(self.ids, dtype=np.uint8).reshape(-1, ID)[mask].tobytes()
        return LocationColumns(ids, self.packs, self.pack_numbers[mask], self.cols[mask])
