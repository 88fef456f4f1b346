"""numpy work on chunk ids and index columns: building the arrays of a LocationMap
(location_arrays.py), looking up many ids at once, sorting a ChunkIdSet's ids.

Only imported once an index or a set of chunk ids is large enough for it to pay (importing
numpy costs ~50 ms); layout and figures: docs/performance.md, "Scale".
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from bunker import encoding, heap
from bunker.repo.location_arrays import (
    CODES,
    EMPTY,
    ID,
    TRIM_AT,
    LocationArrays,
    LocationColumns,
    check_columns,
    runs,
)

DTYPES = (np.uint32, np.uint64, np.uint32, np.uint32)  # pack number, offset, length, raw length


def columns_of(a: LocationArrays) -> list[np.ndarray]:
    """Views (no copies) of the ids of ``a``, as an (n, 32) array, and its four columns."""
    return [np.frombuffer(a.ids, dtype=np.uint8).reshape(a.n, ID)] + [
        np.frombuffer(c, dtype=t) for c, t in zip((a.pack, a.offset, a.length, a.raw), DTYPES, strict=True)
    ]


def column_views(c: LocationColumns) -> tuple[np.ndarray, np.ndarray]:
    """Views of the pack numbers and of the locations ((n, 3): offset, length, raw length)."""
    return np.frombuffer(c.pack_numbers, dtype=np.uint32), np.frombuffer(c.cols, dtype=np.uint64).reshape(len(c), 3)


def column_maxima(c: LocationColumns) -> tuple[int, int, int]:
    """The largest offset, the largest length or raw length, and the largest pack number."""
    pnos, cols = column_views(c)
    return int(cols[:, 0].max()), int(cols[:, 1:].max()), int(pnos.max())


def used_pack_numbers(c: LocationColumns) -> set[int]:
    return set(np.unique(column_views(c)[0]).tolist())


def select_rows(c: LocationColumns, keep: list[bool]) -> LocationColumns:
    """The entries of ``c`` whose pack number ``keep`` marks True."""
    pnos, cols = column_views(c)
    mask = np.array(keep, dtype=bool)[pnos] if keep else np.zeros(0, dtype=bool)
    ids = np.frombuffer(c.ids, dtype=np.uint8).reshape(-1, ID)[mask].tobytes()
    return LocationColumns(ids, c.packs, array("I", pnos[mask].tobytes()), array("Q", cols[mask].tobytes()))


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
            pnos, cols = column_views(c)
            yield [ids, maps[k][pnos], cols[:, 0], cols[:, 1], cols[:, 2]]
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
