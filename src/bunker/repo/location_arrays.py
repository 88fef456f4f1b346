"""The arrays behind LocationMap (location_map.py): chunk ids and their locations in flat
buffers grouped by bucket, built from batches of entries, and index entries as columns.

:class:`LocationArrays` is immutable once built; location_map.py adds what changes (new entries,
folding them in, locking). Layout and figures: docs/performance.md, "Scale".
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bunker import encoding, heap

ID = 32  # bytes of a chunk id
_OFFSET_LIMIT = 1 << 40  # offsets below 1 TiB (a pack is far smaller)
_LENGTH_LIMIT = 1 << 32  # a blob is far smaller than 4 GiB
TRIM_AT = 1 << 18  # arrays of this many entries and more give their temporaries back to the system


class Location(NamedTuple):
    """Where a chunk's blob is stored."""

    pack: str  # hex name (without "packs/")
    offset: int
    length: int
    raw_length: int


DTYPES = (np.uint32, np.uint64, np.uint32, np.uint32)  # pack number, offset, length, raw length
CODES = ("I", "Q", "I", "I")


class LocationArrays:
    """An immutable set of entries: ids grouped by bucket, columns in the same
    row order. Within a bucket, rows keep the order they were added in. ``ids`` is a bytearray
    and the columns are Python arrays: items index at Python speed (numpy's scalar indexing
    costs several times more), and numpy views them without a copy for vectorized work."""

    __slots__ = ("ids", "starts", "shift", "pack", "offset", "length", "raw", "n", "dups")

    def __init__(
        self,
        ids: bytearray,
        starts: array[int],
        shift: int,
        cols: tuple[array[int], array[int], array[int], array[int]],
        dups: frozenset[int] = frozenset(),
    ) -> None:
        self.ids, self.starts, self.shift = ids, starts, shift
        self.pack, self.offset, self.length, self.raw = cols
        self.n = len(ids) // ID
        # rows that repeat an id of an earlier row of their bucket (a chunk stored in two
        # packs): lookups find the earlier row first; length and iteration skip these
        self.dups = dups

    def row(self, cid: bytes) -> int:
        """The row of ``cid``, or -1."""
        starts = self.starts
        b: int = HEAD(cid)[0] >> self.shift
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
            for c, t in zip((self.pack, self.offset, self.length, self.raw), DTYPES, strict=True)
        ]


HEAD = struct.Struct(">I").unpack_from  # the bucket is read from an id's first 4 bytes
EMPTY = LocationArrays(bytearray(), array("I", [0, 0]), 32, (array("I"), array("Q"), array("I"), array("I")))


def build_arrays(parts: list[list[np.ndarray] | None]) -> LocationArrays:
    """Arrays of the entries of ``parts`` (each: ids as an (n, 32) array, then the four
    columns; in the order the entries were added). The list is consumed: each part is dropped
    once it is placed."""
    sizes = [0 if p is None else len(p[0]) for p in parts]
    prefix = np.concatenate([id_prefix(p[0]) for p in parts if p is not None] or [np.zeros(0, np.uint64)])

    def consumed() -> Iterator[list[np.ndarray]]:
        for i, part in enumerate(parts):
            parts[i] = None
            if part is not None and len(part[0]):
                yield part

    return _place([k for k in sizes if k], prefix, consumed())


def build_two_pass(
    first: Iterable[LocationColumns],
    again: Callable[[], Iterable[LocationColumns]],
    numbers: dict[str, int],
    names: list[str],
) -> LocationArrays:
    """The arrays of all batches in two passes: the first keeps only each id's 8-byte prefix
    to sort by, the second places every entry at its sorted row (so the batches are never all
    in memory at once). ``numbers``/``names``: the map's pack numbering, extended here. Raises
    FormatError if ``again()`` gives other batches than ``first``."""
    prefixes, sizes, maps = [], [], []
    for c in first:
        check_columns(c)
        if len(c):
            sizes.append(len(c))
            maps.append(pack_numbers(c.packs, numbers, names))
            prefixes.append(id_prefix(np.frombuffer(c.ids, dtype=np.uint8).reshape(len(c), ID)))
    prefix = np.concatenate(prefixes or [np.zeros(0, np.uint64)])
    del prefixes

    def placed() -> Iterator[list[np.ndarray]]:
        k = 0
        for c in again():
            if not len(c):
                continue
            if k >= len(maps):
                raise encoding.FormatError("the index changed while it was loaded")
            ids = np.frombuffer(c.ids, dtype=np.uint8).reshape(len(c), ID)
            yield [ids, maps[k][c.pack_numbers], c.cols[:, 0], c.cols[:, 1], c.cols[:, 2]]
            k += 1

    return _place(sizes, prefix, placed())


def id_prefix(ids: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each id ((n, 32) uint8) as big-endian integers: sorted, they sort
    the ids as bytes do (up to ties)."""
    return ids[:, :8].copy().view(">u8").ravel()


def _place(sizes: list[int], prefix: np.ndarray, parts: Iterable[list[np.ndarray]]) -> LocationArrays:
    """Arrays of the parts (of ``sizes`` entries each; ``prefix``: every entry's id prefix, in
    the same order), each entry scattered straight to its row. Of entries with equal ids the
    first stays found; the later rows are marked in ``dups``."""
    total = len(prefix)
    if total == 0:
        return EMPTY
    order = np.argsort(prefix, kind="stable")  # stable: equal ids keep the order added
    prefix.sort()  # in place: the same as prefix[order], without another copy
    same = np.flatnonzero(prefix[1:] == prefix[:-1])
    bits = max(8, min(31, (total - 1).bit_length() - 1))  # one or two entries per bucket
    prefix >>= np.uint64(64 - bits)  # in place: the bucket of each id, below 2**31
    counts = np.bincount(prefix.view(np.int64), minlength=1 << bits)
    del prefix
    starts = array("I", [0]) * ((1 << bits) + 1)
    np.cumsum(counts, out=np.frombuffer(starts, dtype=np.uint32)[1:], dtype=np.uint32)
    del counts
    dest = np.empty(total, dtype=np.int32 if total < 1 << 31 else np.int64)  # each entry's row
    dest[order] = np.arange(total, dtype=dest.dtype)
    del order
    ids = bytearray(total * ID)
    cols = [array(code, [0]) * total for code in CODES]
    out = [np.frombuffer(ids, dtype=np.uint8).reshape(total, ID)]
    out += [np.frombuffer(c, dtype=t) for c, t in zip(cols, DTYPES, strict=True)]
    at = k = given = 0
    for part in parts:
        n = len(part[0])
        if k >= len(sizes) or n != sizes[k]:
            raise encoding.FormatError("the index changed while it was loaded")
        d = dest[at : at + n]
        for dst, src in zip(out, part, strict=True):
            dst[d] = src
        at, k, given = at + n, k + 1, given + n
        del part
        if given >= 1 << 20 and total >= TRIM_AT:  # every 1 M entries (52 MB) placed
            heap.give_back()
            given = 0
    if k != len(sizes):
        raise encoding.FormatError("the index changed while it was loaded")
    del out
    dups: set[int] = set()
    for lo, hi in runs(same.tolist()):  # rows sharing a prefix: (almost always) one id twice
        seen: set[bytes] = set()
        for r in range(lo, hi + 1):
            key = bytes(ids[r * ID : (r + 1) * ID])
            if key in seen:
                dups.add(r)
            seen.add(key)
    if total >= TRIM_AT:
        heap.give_back()  # the freed parts and temporaries
    return LocationArrays(ids, starts, 32 - bits, (cols[0], cols[1], cols[2], cols[3]), frozenset(dups))


def runs(positions: list[int]) -> Iterator[tuple[int, int]]:
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


def np_view(a: array[int]) -> np.ndarray:
    return np.frombuffer(a, dtype={"I": np.uint32, "Q": np.uint64}[a.typecode])


def rows_of(a: LocationArrays, q: np.ndarray) -> np.ndarray:
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


def check_columns(c: LocationColumns) -> None:
    n = len(c)
    if len(c.ids) != n * ID or len(c.pack_numbers) != n or c.cols.shape != (n, 3):
        raise encoding.FormatError("index columns of unequal lengths")
    if n and (int(c.cols[:, 0].max()) >= _OFFSET_LIMIT or int(c.cols[:, 1:].max()) >= _LENGTH_LIMIT):
        raise encoding.FormatError("index location out of range")
    if n and int(c.pack_numbers.max()) >= len(c.packs):
        raise encoding.FormatError("index entry names a pack it does not list")


def pack_numbers(packs: Sequence[str], numbers: dict[str, int], names: list[str]) -> np.ndarray:
    """The map's numbers of ``packs`` (new names are numbered)."""
    mine = []
    for p in packs:
        pno = numbers.get(p)
        if pno is None:
            pno = numbers[p] = len(names)
            names.append(p)
        mine.append(pno)
    return np.array(mine, dtype=np.uint32)


def check_entry(cid: bytes, offset: int, length: int, raw: int) -> None:
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
