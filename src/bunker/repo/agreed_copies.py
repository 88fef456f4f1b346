"""What `bunker check` knows of where chunks are: for each chunk, the packs where an index entry
that agrees with the pack's trailer places it. A snapshot misses a chunk when none of those
packs is in its resolved pack set.

A small repository's are two dicts (chunk id -> first pack, and the further packs of a chunk
stored twice). From 65,536 chunks on they move into a CopyTable (copy_table.py: ~50 B per copy
instead of ~110 B for a dict entry), and a snapshot's chunk set is looked up a part at a time,
vectorized (docs/performance.md, "Scale"). Small repositories so never import numpy for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from bunker.repo.location_arrays import ID

if TYPE_CHECKING:
    from bunker.repo.copy_table import CopiesBuilder, CopyTable

LARGE = 1 << 16  # chunks from which the copies go into a table
_NONE: frozenset[str] = frozenset()


class AgreedCopies:
    """chunk id -> the packs where agreeing index entries place it (see the module's docstring)."""

    def __init__(self) -> None:
        self._first: dict[bytes, str] = {}
        self._also: dict[bytes, set[str]] = {}  # further packs of chunks stored twice
        self._names: dict[str, str] = {}  # one string per pack name
        self._builder: CopiesBuilder | None = None  # table mode: copies not in a table yet
        self._tables: list[CopyTable] = []

    def add(self, copies: Iterable[tuple[bytes, str]]) -> None:
        """Add (chunk id, pack) of index entries that agree with their pack's trailer."""
        if self._builder is not None:
            self._builder.add((cid, pack, 0) for cid, pack in copies)
            return
        first, names = self._first, self._names
        for cid, pack in copies:
            pack = names.setdefault(pack, pack)
            if first.setdefault(cid, pack) != pack:
                self._also.setdefault(cid, set()).add(pack)
        if len(first) >= LARGE:
            from bunker.repo.copy_table import CopiesBuilder

            self._builder = CopiesBuilder(lengths=False)
            self._builder.add((cid, pack, 0) for cid, pack in first.items())
            self._builder.add((cid, pack, 0) for cid, packs in self._also.items() for pack in packs)
            self._first, self._also = {}, {}

    def missing_in(self, packs: AbstractSet[str]) -> Callable[[bytes], tuple[int, bytes]]:
        """A lookup for one snapshot whose resolved pack set is ``packs``: given a chunk set's
        part (32-byte ids end to end), how many of its chunks no agreeing entry places in
        ``packs``, and the first of them (b"" if none)."""
        if self._builder is not None and len(self._builder):
            from bunker.repo.copy_table import CopiesBuilder, CopyTable

            self._tables.append(CopyTable(self._builder))  # (the table takes the builder's buffers)
            self._builder = CopiesBuilder(lengths=False)
        masks = [t.pack_mask(packs) for t in self._tables]
        first, also = self._first, self._also

        def lookup(ids: bytes) -> tuple[int, bytes]:
            if len(ids) % ID:
                raise ValueError("chunk ids of the wrong length")
            if self._tables:
                found = self._tables[0].found(ids, masks[0])
                for t, m in zip(self._tables[1:], masks[1:], strict=True):
                    found |= t.found(ids, m)
                lost = (~found).nonzero()[0]
                return len(lost), ids[ID * int(lost[0]) : ID * int(lost[0]) + ID] if len(lost) else b""
            n, first_lost = 0, b""
            for at in range(0, len(ids), ID):
                c = ids[at : at + ID]
                if first.get(c) not in packs and not also.get(c, _NONE) & packs:
                    n += 1
                    first_lost = first_lost or c
            return n, first_lost

        return lookup
