"""The arrays behind LocationMap (location_map.py): chunk ids and their locations in flat
buffers grouped by bucket, and index entries as columns.

:class:`LocationArrays` is immutable once built (id_arrays.py builds them with numpy);
location_map.py adds what changes (new entries, folding them in, locking). Nothing here imports
numpy: a small repository's index stays in the map's dict and never needs it (importing numpy
costs ~50 ms, more than loading such an index). Layout and figures: docs/performance.md,
"Scale".
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

from bunker import encoding

ID = 32  # bytes of a chunk id
_OFFSET_LIMIT = 1 << 40  # offsets below 1 TiB (a pack is far smaller)
_LENGTH_LIMIT = 1 << 32  # a blob is far smaller than 4 GiB
TRIM_AT = 1 << 18  # arrays of this many entries and more give their temporaries back to the system
# columns of this many entries and more are checked and filtered with numpy, once it is imported
# (by a chunk index of 65,536 entries or more): importing it costs ~45 ms, the Python loops over
# 65,536 entries ~5 ms
VECTOR_AT = 4096
VECTOR_IMPORT_AT = 1 << 16


def _vectorized(n: int) -> bool:
    return n >= VECTOR_IMPORT_AT or (n >= VECTOR_AT and "numpy" in sys.modules)


class Location(NamedTuple):
    """Where a chunk's blob is stored."""

    pack: str  # hex name (without "packs/")
    offset: int
    length: int
    raw_length: int


# a Location or a plain tuple of the same fields (cheaper to make: a writer adds ~200,000 a minute)
LocationRow = tuple[str, int, int, int]

CODES = ("I", "Q", "I", "I")  # pack number, offset, length, raw length


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


HEAD = struct.Struct(">I").unpack_from  # the bucket is read from an id's first 4 bytes
EMPTY = LocationArrays(bytearray(), array("I", [0, 0]), 32, (array("I"), array("Q"), array("I"), array("I")))


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


def check_columns(c: LocationColumns) -> None:
    n = len(c)
    if len(c.ids) != n * ID or len(c.pack_numbers) != n or len(c.cols) != 3 * n:
        raise encoding.FormatError("index columns of unequal lengths")
    if not n:
        return
    if _vectorized(n):
        from bunker.repo.id_arrays import column_maxima

        offset, length, pno = column_maxima(c)
    else:
        cols = c.cols
        offset, length, pno = max(cols[0::3]), max(max(cols[1::3]), max(cols[2::3])), max(c.pack_numbers)
    if offset >= _OFFSET_LIMIT or length >= _LENGTH_LIMIT:
        raise encoding.FormatError("index location out of range")
    if pno >= len(c.packs):
        raise encoding.FormatError("index entry names a pack it does not list")


def check_entry(cid: bytes, offset: int, length: int, raw: int) -> None:
    if len(cid) != ID:
        raise encoding.FormatError("chunk id of the wrong length in an index entry")
    if not (0 <= offset < _OFFSET_LIMIT and 0 <= length < _LENGTH_LIMIT and 0 <= raw < _LENGTH_LIMIT):
        raise encoding.FormatError(f"index location out of range for chunk {cid.hex()[:16]}")


class ColumnsBuilder:
    """Index entries gathered as columns, pack by pack (~52 B an entry; as a list of
    ``(chunk id, (pack, offset, length, raw length))`` tuples they took ~150): what a writer
    indexed since its last index object."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.ids = bytearray()
        self.packs: list[str] = []
        self._numbers: dict[str, int] = {}
        self.pack_numbers = array("I")
        self.cols = array("Q")

    def __len__(self) -> int:
        return len(self.pack_numbers)

    def add_pack(self, pack: str, rows: Sequence[tuple[bytes, int, int, int]]) -> None:
        """Add the blobs ``rows`` (chunk id, offset, length, raw length) of ``pack``."""
        pno = self._numbers.get(pack)
        if pno is None:
            pno = self._numbers[pack] = len(self.packs)
            self.packs.append(pack)
        for cid, offset, length, raw in rows:
            self.ids += cid
            self.cols.extend((offset, length, raw))
        self.pack_numbers.extend([pno] * len(rows))

    def take(self, batch: int) -> list[LocationColumns]:
        """Everything gathered, as columns of at most ``batch`` entries each (each naming only
        the packs its entries are in), and start again empty."""
        out = []
        for at in range(0, len(self), batch):
            numbers: dict[int, int] = {}
            pnos = array("I", [numbers.setdefault(p, len(numbers)) for p in self.pack_numbers[at : at + batch]])
            out.append(
                LocationColumns(
                    bytes(self.ids[ID * at : ID * (at + batch)]),
                    [self.packs[p] for p in numbers],
                    pnos,
                    self.cols[3 * at : 3 * (at + batch)],
                )
            )
        self._clear()
        return out


@dataclass(frozen=True, slots=True)
class LocationColumns:
    """Index entries as columns: what one index object holds, read or cached without a Python
    object per entry."""

    ids: bytes  # the chunk ids end to end
    packs: list[str]  # the pack names the entries refer to by number
    pack_numbers: array[int]  # "I", one per entry: an index into ``packs``
    cols: array[int]  # "Q", three per entry: offset, length, raw length

    def __len__(self) -> int:
        return len(self.ids) // ID

    def __iter__(self) -> Iterator[tuple[bytes, Location]]:
        """The entries as (chunk id, Location) pairs, made one at a time."""
        ids, packs, cols = self.ids, self.packs, self.cols
        for i, p in enumerate(self.pack_numbers):
            yield ids[i * ID : (i + 1) * ID], Location(packs[p], cols[3 * i], cols[3 * i + 1], cols[3 * i + 2])

    @classmethod
    def from_entries(cls, entries: Sequence[tuple[bytes, LocationRow]]) -> LocationColumns:
        numbers: dict[str, int] = {}
        pnos = array("I", [numbers.setdefault(loc[0], len(numbers)) for _, loc in entries])
        cols = array("Q", chain.from_iterable(loc[1:] for _, loc in entries))
        return cls(b"".join(cid for cid, _ in entries), list(numbers), pnos, cols)

    @classmethod
    def from_little_endian(cls, ids: bytes, packs: list[str], pack_numbers: bytes, cols: bytes) -> LocationColumns:
        """Columns of their stored form (the index cache): little-endian integers."""
        pnos, c = array("I"), array("Q")
        pnos.frombytes(pack_numbers)
        c.frombytes(cols)
        if sys.byteorder == "big":
            pnos.byteswap()
            c.byteswap()
        return cls(ids, packs, pnos, c)

    def little_endian(self) -> tuple[bytes, bytes]:
        """The pack numbers and the location columns as little-endian bytes."""
        if sys.byteorder == "little":
            return self.pack_numbers.tobytes(), self.cols.tobytes()
        pnos, cols = array("I", self.pack_numbers), array("Q", self.cols)
        pnos.byteswap()
        cols.byteswap()
        return pnos.tobytes(), cols.tobytes()

    def entries(self) -> list[tuple[bytes, Location]]:
        """The entries as (chunk id, Location) pairs."""
        return list(self)

    def used_packs(self) -> set[str]:
        """The packs at least one entry names."""
        if _vectorized(len(self)):
            from bunker.repo.id_arrays import used_pack_numbers

            numbers = used_pack_numbers(self)
        else:
            numbers = set(self.pack_numbers)
        return {self.packs[p] for p in numbers}

    def select(self, keep_pack: Callable[[str], bool]) -> LocationColumns:
        """The entries whose pack ``keep_pack`` accepts."""
        ok = [keep_pack(p) for p in self.packs]
        if all(ok):
            return self
        if _vectorized(len(self)):
            from bunker.repo.id_arrays import select_rows

            return select_rows(self, ok)
        rows = [i for i, p in enumerate(self.pack_numbers) if ok[p]]
        ids, cols = self.ids, self.cols
        return LocationColumns(
            b"".join(ids[i * ID : (i + 1) * ID] for i in rows),
            self.packs,
            array("I", [self.pack_numbers[i] for i in rows]),
            array("Q", chain.from_iterable(cols[3 * i : 3 * i + 3] for i in rows)),
        )
