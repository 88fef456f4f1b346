"""chunk id -> where its blob is stored, compact enough for 10 million chunks on a client.

A dict of 32-byte keys costs ~190 B per chunk (the key object, the value, the table slot); at
10 M chunks that is 2 GB. :class:`LocationMap` keeps the bulk of its entries in flat arrays
instead (location_arrays.py; docs/performance.md, "Scale"):

- the chunk ids, 32 bytes each, in one buffer, ordered by their first 8 bytes;
- the location columns (pack number, offset, length, raw length): 20 bytes per chunk;
- a bucket directory over the ids' leading bits, one or two chunks per bucket (2-4 bytes per
  chunk), so a lookup reads one or two ids of its bucket and compares them whole.

That is ~56 bytes per chunk. A client's index is loaded in two passes
(:meth:`LocationMap.bulk_load`), so loading peaks at about the arrays' own size plus 12 bytes per
chunk. A map of fewer than 65,536 entries (a small repository's index) is only the dict of new
entries below: it never imports numpy (id_arrays.py, which builds the arrays). Entries added
after the arrays were built (the packs a backup uploads) go to a small dict first and are folded
into new arrays when it grows, so adding stays cheap and the arrays are rebuilt a logarithmic
number of times. Lookups of many ids at once
(:meth:`LocationMap.locate_many`) run vectorized; a single lookup costs well under a microsecond.

Readers need no lock: the arrays are replaced whole (one attribute), and the dict of new entries
is replaced only after the arrays holding its entries are in place. Writers hold the map's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, groupby
from typing import TYPE_CHECKING, TypeVar, overload

from bunker.repo.location_arrays import (
    EMPTY,
    HEAD,
    ID,
    Location,
    LocationColumns,
    LocationRow,
    check_columns,
    check_entry,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ID", "Location", "LocationColumns", "LocationMap"]

_T = TypeVar("_T")
_FOLD_AT = 1 << 16  # new entries kept in the dict before they are folded into the arrays


def _pack_of(entry: tuple[bytes, LocationRow]) -> str:
    return entry[1][0]


class LocationMap(Mapping[bytes, Location]):
    """chunk id -> Location, about 60 bytes per chunk (see the module's docstring). The first
    location added for a chunk wins (equal chunks stored in two packs are both valid)."""

    __slots__ = ("_arrays", "_new", "_packs", "_numbers", "_lock")

    def __init__(self) -> None:
        self._arrays = EMPTY
        self._new: dict[bytes, tuple[int, int, int, int]] = {}
        self._packs: list[str] = []
        self._numbers: dict[str, int] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- adding
    def add(self, cid: bytes, loc: Location) -> None:
        """Record ``loc`` for ``cid`` unless the chunk already has a location."""
        self.update([(cid, loc)])

    def update(self, entries: Iterable[tuple[bytes, LocationRow]]) -> None:
        """Record many locations (first one per chunk wins)."""
        with self._lock:
            for pack, group in groupby(entries, key=_pack_of):
                self._add_rows(self._number(pack), [(cid, o, n, r) for cid, (_, o, n, r) in group])
            self._fold_if_due()

    def add_pack(self, pack: str, rows: Sequence[tuple[bytes, int, int, int]]) -> None:
        """:meth:`update` with the blobs ``rows`` (chunk id, offset, length, raw length) of one
        pack, without a location tuple per blob: the packs a backup uploads (~0.6 µs a blob
        less, 0.1 s of the main process in a backup of 200,000 files)."""
        with self._lock:
            self._add_rows(self._number(pack), rows)
            self._fold_if_due()

    def _number(self, pack: str) -> int:
        """The number of ``pack`` in this map, given to it if it has none. Under the lock."""
        pno = self._numbers.get(pack)
        if pno is None:
            pno = self._numbers[pack] = len(self._packs)
            self._packs.append(pack)
        return pno

    def _add_rows(self, pno: int, rows: Iterable[tuple[bytes, int, int, int]]) -> None:
        """Record the rows of pack number ``pno`` whose chunks have no location yet. Under the lock."""
        arrays, new = self._arrays, self._new
        row = arrays.row if arrays.n else None
        for cid, offset, length, raw in rows:
            if cid in new or (row is not None and row(cid) >= 0):
                continue
            check_entry(cid, offset, length, raw)
            new[cid] = (pno, offset, length, raw)

    def _fold_if_due(self) -> None:
        if len(self._new) >= max(_FOLD_AT, self._arrays.n // 4):
            self._fold()

    def bulk_load(self, first: Iterable[LocationColumns], again: Callable[[], Iterable[LocationColumns]]) -> None:
        """Load many batches of entries (a client's index objects) in two passes, so the peak
        memory is the final arrays plus ~12 B per entry instead of twice the arrays
        (docs/performance.md, "Scale"). ``first`` is read once to sort; ``again()`` must give
        the same batches in the same order, which are then placed straight into the arrays.
        Raises FormatError if it does not (the map is then unchanged). Into a map that holds
        entries already, or when all of ``first`` stays below the size at which arrays are
        built, ``first`` is just added."""
        batches = iter(first)
        if not (self._arrays.n or self._new):
            held: list[LocationColumns] = []
            total = 0
            for c in batches:
                held.append(c)
                total += len(c)
                if total >= _FOLD_AT:
                    from bunker.repo.id_arrays import build_two_pass

                    with self._lock:
                        if not (self._arrays.n or self._new):  # (nothing was added meanwhile)
                            self._arrays = build_two_pass(chain(held, batches), again, self._numbers, self._packs)
                            return
                    break
            batches = chain(held, batches)
        for c in batches:
            check_columns(c)
            self._update_columns(c)

    def _update_columns(self, c: LocationColumns) -> None:
        """``update`` with the entries of checked columns (``check_columns``), without a
        Location object per entry: the index load of every run goes through here."""
        ids, cols, local = c.ids, c.cols, c.packs
        with self._lock:
            arrays, new = self._arrays, self._new
            pnos: list[int | None] = [None] * len(local)
            searched = arrays.n > 0
            for i, (pn, offset, length, raw) in enumerate(
                zip(c.pack_numbers, cols[0::3], cols[1::3], cols[2::3], strict=True)
            ):
                cid = ids[i * ID : (i + 1) * ID]
                if cid in new or (searched and arrays.row(cid) >= 0):
                    continue
                pno = pnos[pn]
                if pno is None:
                    pno = pnos[pn] = self._number(local[pn])
                new[cid] = (pno, offset, length, raw)
            self._fold_if_due()

    def _fold(self) -> None:
        """New arrays of the current ones and the dict of new entries, in that order (the
        first location added wins). Under the lock."""
        import numpy as np

        from bunker.repo.id_arrays import DTYPES, build_arrays, columns_of

        new = self._new
        vals = np.array(list(new.values()), dtype=np.uint64).reshape(len(new), 4)
        ids = np.frombuffer(b"".join(new), dtype=np.uint8).reshape(len(new), ID)
        parts: list[list[np.ndarray] | None] = [columns_of(self._arrays)]
        parts.append([ids] + [vals[:, i].astype(t) for i, t in enumerate(DTYPES)])
        del vals, ids
        self._arrays = build_arrays(parts)  # first: a reader that finds the dict emptied finds the entries here
        self._new = {}

    # -------------------------------------------------------------- looking up
    def _find(self, cid: bytes) -> tuple[int, int, int, int] | None:
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
        # the hot lookup of a backup (is this chunk stored?): LocationArrays.row inlined
        if cid in self._new:
            return True
        if type(cid) is not bytes or len(cid) != ID:
            return False
        a = self._arrays
        starts = a.starts
        b: int = HEAD(cid)[0] >> a.shift
        lo, hi = starts[b], starts[b + 1]
        ids = a.ids
        while lo < hi:
            if ids.startswith(cid, lo * ID):
                return True
            lo += 1
        # folded meanwhile: the dict read above was the old one, the new arrays hold the entry
        return cid in self._new or (self._arrays is not a and self._arrays.row(cid) >= 0)

    def contains_all(self, chunk_ids: Iterable[bytes]) -> bool:
        """Whether every one of ``chunk_ids`` is located: :meth:`__contains__` in one loop (a
        backup asks it for each unchanged directory's files)."""
        new, a, head = self._new, self._arrays, HEAD
        starts, ids, shift = a.starts, a.ids, a.shift
        for cid in chunk_ids:
            if cid in new:
                continue
            if type(cid) is not bytes or len(cid) != ID:
                return False
            b: int = head(cid)[0] >> shift
            lo, hi = starts[b], starts[b + 1]
            while lo < hi:
                if ids.startswith(cid, lo * ID):
                    break
                lo += 1
            else:
                if cid not in self:  # (folded meanwhile: the new arrays hold it)
                    return False
        return True

    def __iter__(self) -> Iterator[bytes]:
        a, new = self._arrays, dict(self._new)
        ids, dups = a.ids, a.dups
        for r in range(a.n):
            if not dups or r not in dups:
                yield bytes(ids[r * ID : (r + 1) * ID])
        yield from new

    def __len__(self) -> int:
        return self._arrays.n - len(self._arrays.dups) + len(self._new)

    def locate_many(self, chunk_ids: Sequence[bytes] | np.ndarray) -> tuple[set[str], list[bytes]]:
        """The packs that hold ``chunk_ids`` (bytes, or an (n, 32) uint8 array) and the ids that
        are not located, vectorized (a snapshot of 10 M chunks takes seconds, not minutes)."""
        a, new = self._arrays, self._new
        if not a.n and type(chunk_ids) is tuple:  # every entry in the dict (a small repository)
            get = new.get
            numbers: set[int] = set()
            missing: list[bytes] = []
            for cid in chunk_ids:
                v = get(cid)
                if v is None:
                    missing.append(cid)
                else:
                    numbers.add(v[0])
            return {self._packs[n] for n in numbers}, missing
        if len(chunk_ids) < 64 or not a.n:
            packs: set[str] = set()
            missing = []
            for c in chunk_ids:
                cid = c if type(c) is bytes else bytes(c)  # a row of an array: its 32 bytes
                v = self._find(cid)
                if v is None:
                    missing.append(cid)
                else:
                    packs.add(self._packs[v[0]])
            return packs, missing
        import numpy as np

        from bunker.repo.id_arrays import np_view, rows_of

        if isinstance(chunk_ids, np.ndarray):
            q = chunk_ids
        else:
            q = np.frombuffer(b"".join(chunk_ids), dtype=np.uint8).reshape(len(chunk_ids), ID)
        rows = rows_of(a, q)
        found = rows >= 0
        numbers = set(np.unique(np_view(a.pack)[rows[found]]).tolist())
        missing = []
        for i in np.flatnonzero(~found).tolist():
            c = q[i].tobytes()
            v = new.get(c)
            if v is None and self._arrays is not a:  # folded meanwhile
                v = self._find(c)
            if v is None:
                missing.append(c)
            else:
                numbers.add(v[0])
        return {self._packs[p] for p in numbers}, missing

    def packs_of(self, chunk_ids: Sequence[bytes]) -> list[str | None]:
        """The pack of each of ``chunk_ids`` (None where it is not located), vectorized when
        they are many: a restore locates a batch of files' chunks at once."""
        a = self._arrays
        if len(chunk_ids) < 64 or not a.n or not all(len(c) == ID for c in chunk_ids):
            out: list[str | None] = []
            for cid in chunk_ids:
                v = self._find(cid)
                out.append(None if v is None else self._packs[v[0]])
            return out
        import numpy as np

        from bunker.repo.id_arrays import np_view, rows_of

        rows = rows_of(a, np.frombuffer(b"".join(chunk_ids), dtype=np.uint8).reshape(len(chunk_ids), ID))
        numbers = np_view(a.pack)[np.maximum(rows, 0)].tolist()
        names, new = self._packs, self._new
        out = []
        for cid, r, p in zip(chunk_ids, rows.tolist(), numbers, strict=True):
            if r >= 0:
                out.append(names[p])
                continue
            v = new.get(cid)
            if v is None and self._arrays is not a:  # folded meanwhile
                v = self._find(cid)
            out.append(None if v is None else names[v[0]])
        return out

    def missing(self, chunk_ids: Sequence[bytes] | np.ndarray) -> list[bytes]:
        """The ids of ``chunk_ids`` that are not located."""
        return self.locate_many(chunk_ids)[1]

    def packs(self) -> set[str]:
        """The packs that hold at least one chunk of the map."""
        a = self._arrays
        numbers: set[int] = set()
        if a.n:
            import numpy as np

            from bunker.repo.id_arrays import np_view

            pack = np_view(a.pack)
            if a.dups:
                pack = np.delete(pack, sorted(a.dups))
            numbers.update(np.unique(pack).tolist())
        numbers.update(v[0] for v in list(self._new.values()))
        return {self._packs[p] for p in numbers}

    def nbytes(self) -> int:
        """Bytes the arrays take (the dict of new entries not counted)."""
        a = self._arrays
        return len(a.ids) + sum(x.itemsize * len(x) for x in (a.starts, a.pack, a.offset, a.length, a.raw))
