"""``bunker sync --prune``: delete from a mirror only what signed records justify.

A mirror takes no decision of its own: it follows the repository of record, and only where a
record signed by someone allowed to prune says so (docs/format.md section 15):

- a pack the mirror holds and the source no longer holds, that a valid condemnation record
  (``BKGC``) or move record (``BKMV``, once every pack its blobs moved to is in the mirror)
  condemns, once the grace period has passed since the record's signed time, and that no
  snapshot of either copy names (a pack condemned once and needed again is kept at the source;
  if the source then lost it, the mirror's copy repairs it);
- a snapshot the mirror holds and the source no longer holds, that a valid retirement record in
  force (not withdrawn by an unretire record) retires, once the grace has passed likewise;
- an index object the mirror holds and the source no longer holds (a prune or a rewrite of the
  index replaced it there), once the grace has passed since the mirror took it. No record names
  these, and none needs to: an index object is a cache of pack trailers, so a mirror that lacks
  one reads the trailers of the packs it covered instead (docs/format.md section 15); deleting
  it can cost time, never data.

Valid means what prune and check accept (Repository.verify_pruner): signed by the master key, or
by a certificate with ``prune`` that is not revoked. Records are read from both copies: the
source deletes a condemnation record after its packs, so the mirror's own copy of it (taken by
an earlier sync) is often the one left. Everything else the mirror holds and the source lacks is
kept and reported: a deletion nobody signed may be an attacker's or an accident at the source,
and the mirror is what repairs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bunker import encoding
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.repo.moves import MoveRecord, PackMoves, parse_move_record
from bunker.repo.objects import MAGIC_GC, MAGIC_MOVED, MAGIC_RETIRED, SignedObject, content_hash, parse_signed
from bunker.repo.records import Retirements, parse_condemnation
from bunker.repo.refs import read_set
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import Backend


@dataclass
class PruneMirrorReport:
    """What ``--prune`` deleted (or would delete), what waits for its grace, what it kept."""

    deleted: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    waiting: list[tuple[str, str]] = field(default_factory=list)  # (object, why not yet)
    ignored_records: list[tuple[str, str]] = field(default_factory=list)  # (record, why it counts for nothing)

    def to_json(self) -> dict[str, object]:
        return {
            "deleted": self.deleted,
            "deleted_bytes": self.deleted_bytes,
            "waiting": [{"object": n, "why": w} for n, w in self.waiting],
            "ignored_records": [{"record": n, "why": w} for n, w in self.ignored_records],
        }


@dataclass(frozen=True)
class _Record:
    name: str
    time: float  # the record's signed time: the grace counts from it


class MirrorPruner:
    """Decide and delete, given the listings a sync just made (repo/mirror_sync.py)."""

    def __init__(
        self,
        repo: Repository,
        src: Backend,
        dst: Backend,
        src_names: dict[str, dict[str, int]],
        dst_names: dict[str, dict[str, int]],
        *,
        grace: float,
        dry_run: bool = False,
        now: float | None = None,
    ) -> None:
        # records are verified against the source's config (its revocations) and the
        # certificates in the mirror, where the sync put every certificate of the source
        self.view = repo.with_backend(dst)
        self.src = src
        self.dst = dst
        self.src_names = src_names
        self.dst_names = dst_names
        self.grace = grace
        self.dry_run = dry_run
        self.now = time.time() if now is None else now
        self.report = PruneMirrorReport()

    def run(self) -> PruneMirrorReport:
        """Delete what records justify; returns the report (``extra`` of the sync report minus
        the deleted objects is what was kept)."""
        condemned, moves = self._gc_records()
        retired = self._retirements()
        named, unreadable = self._named_by_snapshots(set(retired))
        dst_packs = {n.split("/", 1)[1] for n in self.dst_names["packs"]}
        for name in sorted(set(self.dst_names["packs"]) - set(self.src_names["packs"])):
            pack = name.split("/", 1)[1]
            why = self._pack_due(pack, condemned, moves, dst_packs)
            if not why and unreadable:
                why = f"the pack set of {unreadable} cannot be read, so no pack is deleted (`bunker check --keyless`)"
            elif not why and pack in named:
                # condemned once and needed again (rescued at the source), then lost there: the
                # mirror's copy is the one that repairs it
                why = "a snapshot not retired still names it; the source lost it: copy it back with `bunker sync`"
            self._decide(name, why)
            if not why and not self.dry_run:
                dst_packs.discard(pack)
        for name in sorted(set(self.dst_names["snapshots"]) - set(self.src_names["snapshots"])):
            recs = retired.get(name)
            if recs:
                self._decide(name, self._grace_left(recs, "retirement record"))
        for name in sorted(set(self.dst_names.get("index", {})) - set(self.src_names.get("index", {}))):
            info = self.dst.stat(name)
            if info is not None:
                self._decide(name, self._grace_left([_Record(name, info.mtime)], "mirror's copy of"))
        return self.report

    # ------------------------------------------------------------------ records
    def _read(self, name: str) -> bytes | None:
        """A record's bytes from the mirror, else the source, checked against its name."""
        for backend in (self.dst, self.src):
            try:
                data = backend.get(name)
            except ObjectMissing:
                continue
            if content_hash(data) == name.split("/", 1)[1]:
                return data
        return None

    def _names(self, prefix: str) -> list[str]:
        return sorted(set(self.dst_names[prefix]) | set(self.src_names[prefix]))

    def _verified(self, name: str, data: bytes, magic: bytes, what: str) -> SignedObject | None:
        try:
            obj = parse_signed(data, magic)
            self.view.verify_pruner(obj, what)
            return obj
        except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
            why = exc.message if isinstance(exc, BunkerError) else str(exc)
            self.report.ignored_records.append((name, why))
            return None

    def _gc_records(self) -> tuple[dict[str, list[_Record]], PackMoves]:
        """pack -> the valid records that condemn it; and the valid move records."""
        condemned: dict[str, list[_Record]] = {}
        moves: list[MoveRecord] = []
        for name in self._names("gc"):
            data = self._read(name)
            if data is None or data[:4] not in (MAGIC_GC, MAGIC_MOVED):
                continue  # nodes' acknowledgements, checkpoint roots, holdings: they condemn nothing
            magic = data[:4]
            obj = self._verified(name, data, magic, "condemn packs" if magic == MAGIC_GC else "move packs")
            if obj is None:
                continue
            try:
                stamp = float(encoding.field(obj.body, "time", (int, float)))
                packs = parse_condemnation(data) if magic == MAGIC_GC else list(parse_move_record(data))
                if magic == MAGIC_MOVED:
                    moves.append(MoveRecord(name, parse_move_record(data), 0.0))
            except encoding.FormatError as exc:
                self.report.ignored_records.append((name, str(exc)))
                continue
            for p in packs:
                condemned.setdefault(p, []).append(_Record(name, stamp))
        return condemned, PackMoves(moves)

    def _retirements(self) -> dict[str, list[_Record]]:
        """snapshot -> the retirement records in force for it (a withdrawn one retires nothing)."""
        found = Retirements()
        times: dict[str, float] = {}
        for name in self._names("retired"):
            data = self._read(name)
            if data is None:
                continue
            try:
                self.view.read_retirement_record(name, data, found)
                if data[:4] == MAGIC_RETIRED:
                    body = parse_signed(data, MAGIC_RETIRED).body
                    times[name] = float(encoding.field(body, "time", (int, float)))
            except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
                self.report.ignored_records.append((name, exc.message if isinstance(exc, BunkerError) else str(exc)))
        return {snap: [_Record(r, times[r]) for r in recs if r in times] for snap, recs in found.active().items()}

    def _named_by_snapshots(self, retired: set[str]) -> tuple[set[str], str]:
        """Every pack a snapshot in either copy names (retired ones aside), read keylessly from
        pack sets; and the first snapshot whose pack set could not be read ("" when none)."""
        named: set[str] = set()
        for name in self._names("snapshots"):
            if name in retired:
                continue
            data = self._read(name)
            if data is None:
                continue
            try:
                packset = parse_snapshot(data).env.packset
                named.update(read_set(packset, self._ref))
            except (encoding.FormatError, BunkerError):
                return named, name
        return named, ""

    def _ref(self, name: str) -> bytes:
        data = self._read(name)
        if data is None:
            raise ObjectMissing(name)
        return data

    # ------------------------------------------------------------------ decisions
    def _grace_left(self, records: list[_Record], what: str) -> str:
        """ "" when the oldest record's grace has passed, else why the object waits."""
        oldest = min(records, key=lambda r: r.time)
        left = oldest.time + self.grace - self.now
        if left <= 0:
            return ""
        return (
            f"the {what} {oldest.name} is younger than the grace period; a sync --prune in {left / 3600:.1f} h or "
            "later deletes it"
        )

    def _pack_due(self, pack: str, condemned: dict[str, list[_Record]], moves: PackMoves, dst_packs: set[str]) -> str:
        recs = condemned.get(pack)
        if not recs:
            return "no valid record condemns it"
        if pack in moves.targets and not moves.covered(pack, dst_packs - {pack}):
            return "a repack moved its blobs into packs the mirror does not hold yet; a later sync copies them first"
        return self._grace_left(recs, "record")

    def _decide(self, name: str, why: str) -> None:
        """Delete ``name`` from the mirror when ``why`` is empty (and the source still lacks it),
        else note why it stays."""
        if why:
            if why != "no valid record condemns it":
                self.report.waiting.append((name, why))
            return
        # the source's listing may be a moment old (or lag, on an object store): a deletion is
        # final, so the source is asked once more
        if self.src.stat(name) is not None:
            return
        size = self.dst_names[name.split("/", 1)[0]].get(name, 0)
        if not self.dry_run:
            self.dst.delete(name)
        self.report.deleted.append(name)
        self.report.deleted_bytes += size
