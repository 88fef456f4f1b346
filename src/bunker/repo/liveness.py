"""Liveness (part of ``bunker prune``): every chunk copy of a dedup domain's packs, and which of
them the live snapshots and checkpoints need.

A chunk held by pack P is live in P if a live snapshot (or checkpoint) whose pack set, resolved
through the move records, names P needs it (repack.py says why). A dict per pack of chunk id ->
Location, a map from each chunk to its packs and a set of live chunks per pack cost ~500 B per
chunk copy: 5 GB at 10 M chunks. :class:`Liveness` keeps the copies in a CopyTable instead
(copy_table.py: columns sorted by chunk id) with each copy's blob length and one flag per copy
for "live" (docs/performance.md, "Scale"). Marking takes a snapshot's chunk set one part at a
time, never the whole set as Python objects.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import numpy as np

from bunker import encoding, heap
from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import BadSignature, verify
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo import refs
from bunker.repo.blob_reader import read_trailer
from bunker.repo.copy_table import CopiesBuilder, CopyTable
from bunker.repo.index import decrypt_index, parse_index_frame
from bunker.repo.location_arrays import TRIM_AT
from bunker.repo.objects import MAGIC_INDEX, MAX_SIGNED_OBJECT
from bunker.repo.repository import Repository


def all_copies(repo: Repository, secrets: PutSecrets, existing: Iterable[str]) -> Liveness:
    """Every chunk copy of this dedup domain, nothing live yet: from the index objects (all of
    them, not first-wins), then from the trailers of ``existing`` packs no index names (killed
    runs). Unreadable index objects are skipped: check reports them, and their packs' trailers
    fill in."""
    found = CopiesBuilder()
    for info in list(repo.backend.list("index/")):
        if info.size > MAX_SIGNED_OBJECT:
            continue  # larger than any signed object may be: never fetched (check reports it)
        try:
            obj = parse_index_frame(repo.get_object(info.name))
            if obj.body.get("domain") != secrets.domain_id:
                continue
            verify(repo.certificate(obj.signer).verify_key, MAGIC_INDEX, obj.body_bytes, obj.sig)
            entries = decrypt_index(obj, secrets)
        except (encoding.FormatError, BadSignature, CorruptObject, ObjectMissing):
            continue
        found.add((cid, loc.pack, loc.length) for cid, loc in entries)
    for pack in existing:
        if found.has_pack(pack):
            continue
        try:
            blobs, _, _ = read_trailer(repo, pack, secrets)
        except (CorruptObject, ObjectMissing):
            continue  # another domain's pack, or damaged
        found.add((b.chunk_id, pack, b.length) for b in blobs)
    return Liveness(found)


class UnreadableRoot(Exception):
    """A root's chunk set could not be read: prune cannot tell what it needs."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(what, cause)
        self.what, self.cause = what, cause


def mark_live(
    liveness: Liveness,
    roots: Iterable[tuple[str, Collection[str], str]],
    fetch: Callable[[str], bytes],
    secrets: PutSecrets,
) -> None:
    """Mark what ``roots`` need: (what it is, its resolved pack set, its chunk set's top object)
    each. Snapshots of one client share most chunk-set parts: each part is read once and marked
    with the packs of every root that names it (a copy is live if some root names its chunk and
    its pack, so marking part by part with the union of those roots' packs is the same). Raises
    UnreadableRoot."""
    masks: dict[bytes, int] = {}  # each distinct pack set (as a flag per pack), numbered
    by_number: list[np.ndarray] = []
    users: dict[str, set[int]] = {}  # chunk-set part -> the pack sets of the roots naming it
    named_by: dict[str, str] = {}  # chunk-set part -> a root that names it (for messages)
    for what, packs, chunkset in roots:
        try:
            parts = refs.chunkset_parts(chunkset, fetch)
        except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
            raise UnreadableRoot(what, exc) from None
        mask = liveness.pack_mask(packs)  # a byte per pack: 20 KB at 20,000 packs
        k = masks.setdefault(mask.tobytes(), len(masks))
        if k == len(by_number):
            by_number.append(mask)
        for name in parts:
            users.setdefault(name, set()).add(k)
            named_by.setdefault(name, what)
    groups: dict[frozenset[int], list[str]] = {}
    for name, used_by in users.items():
        groups.setdefault(frozenset(used_by), []).append(name)
    for ks, names in groups.items():
        mask = np.logical_or.reduce([by_number[k] for k in ks])
        for name in names:
            try:
                ids = refs.read_chunkset_part(name, fetch, secrets)
            except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
                raise UnreadableRoot(named_by[name], exc) from None
            liveness.mark(ids, mask)


class Liveness(CopyTable):
    """Chunk copies per pack with their blob lengths, and which of them are live (see the
    module's docstring)."""

    def __init__(self, found: CopiesBuilder) -> None:
        super().__init__(found)
        n = len(self)
        self._live = np.zeros(n, dtype=bool)
        self._by_pack: tuple[np.ndarray, np.ndarray] | None = None
        self._sums: tuple[np.ndarray, np.ndarray] | None = None

    def mark(self, chunk_ids: bytes, packs: np.ndarray) -> None:
        """Mark live the copies of ``chunk_ids`` (32-byte ids end to end: a chunk set's part)
        held in packs that ``packs`` (from :meth:`pack_mask`) flags."""
        self._sums = None
        for _, rows in self.matches(chunk_ids, packs):
            self._live[rows] = True

    def live_bytes(self, pack: str) -> int:
        """Blob bytes of ``pack`` that live snapshots need."""
        return self._sum(pack, 1)

    def blob_bytes(self, pack: str) -> int:
        """All blob bytes of a pack (without its sealed keys and footer, which a copy has too)."""
        return self._sum(pack, 0)

    def live_ids(self, pack: str) -> set[bytes]:
        """The chunks of ``pack`` that live snapshots need."""
        rows = self._rows(pack)
        return {self._ids[r].tobytes() for r in rows[self._live[rows]].tolist()}

    def chunk_ids(self, pack: str) -> set[bytes]:
        """Every chunk ``pack`` holds."""
        return {self._ids[r].tobytes() for r in self._rows(pack).tolist()}

    def _sum(self, pack: str, live: int) -> int:
        pno = self._number.get(pack)
        if pno is None:
            return 0
        if self._sums is None:
            k, counted = len(self.packs), self._counted
            every = np.bincount(self._pack[counted], weights=self._length[counted], minlength=k)
            both = counted & self._live
            alive = np.bincount(self._pack[both], weights=self._length[both], minlength=k)
            self._sums = (every, alive)
        return int(self._sums[live][pno])

    def _rows(self, pack: str) -> np.ndarray:
        """The rows of the copies ``pack`` holds (each copy once)."""
        pno = self._number.get(pack)
        if pno is None:
            return np.zeros(0, dtype=np.int64)
        if self._by_pack is None:
            rows = np.argsort(self._pack, kind="stable")
            rows = rows[self._counted[rows]].astype(self._order.dtype)
            starts = np.zeros(len(self.packs) + 1, dtype=np.int64)
            np.cumsum(np.bincount(self._pack[rows], minlength=len(self.packs)), out=starts[1:])
            self._by_pack = (rows, starts)
            if len(rows) >= TRIM_AT:
                heap.give_back()
        rows, starts = self._by_pack
        return rows[starts[pno] : starts[pno + 1]]
