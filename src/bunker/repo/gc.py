"""Garbage collection (``bunker prune``): two phases, no locks (DESIGN.md §3, §6).

Phase 1 *condemns*: every pack of this dedup domain that no live snapshot's pack set names is
listed in a signed ``gc/`` record. A session reads the records right after writing its lease and
treats condemned packs as absent: it stores their chunks again rather than deduplicate against
them.

Phase 2 (a later prune) *deletes*: a record's packs go once the grace period has passed since the
storage stored the record and no session is still alive that started before the record plus the
grace (such a session may not have seen it). Packs that a snapshot names by then (a session that
had deduplicated against them finished) are kept. Index objects that name deleted packs are
written anew without them, then the record is removed.

All times are the storage's own (the prune's own lease gives "now"). Marking is conservative: a
snapshot whose pack set cannot be read stops the prune before anything is deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bunker import encoding
from bunker.crypto.keyfile import PutKey
from bunker.crypto.sign import BadSignature, verify
from bunker.errors import BunkerError, CorruptObject, ExitCode, KeyRequired, ObjectMissing
from bunker.repo import refs
from bunker.repo.index import decrypt_index, make_index, parse_index_frame
from bunker.repo.index_cache import IndexCache
from bunker.repo.leases import Lease, Session, sessions
from bunker.repo.objects import MAGIC_GC, MAGIC_INDEX, parse_signed
from bunker.repo.records import make_condemnation, parse_condemnation
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot

DEFAULT_GRACE = 24 * 3600.0


@dataclass(frozen=True)
class Condemnation:
    """A valid ``gc/`` record: its packs, and when the storage stored it."""

    name: str
    packs: tuple[str, ...]
    stored: float


def condemnations(repo: Repository) -> list[Condemnation]:
    """Every ``gc/`` record signed by the master key or a client allowed to prune (others are
    ignored: a forged record could only make clients store data again; check reports it)."""
    out = []
    for info in repo.backend.list("gc/"):
        try:
            data = repo.get_object(info.name)
            repo.verify_pruner(parse_signed(data, MAGIC_GC), "condemn packs")
            packs = parse_condemnation(data)
        except (encoding.FormatError, CorruptObject, ObjectMissing):
            continue
        out.append(Condemnation(info.name, tuple(packs), info.mtime))
    return out


def condemned_packs(repo: Repository) -> set[str]:
    """Packs a new session must treat as absent."""
    return {p for c in condemnations(repo) for p in c.packs}


@dataclass
class PruneReport:
    snapshots_marked: int = 0
    packs_referenced: int = 0
    condemned: list[str] = field(default_factory=list)  # packs condemned by this run
    deleted: list[str] = field(default_factory=list)  # packs deleted by this run
    deleted_bytes: int = 0
    rescued: list[str] = field(default_factory=list)  # condemned, then named by a snapshot: kept
    waiting: list[tuple[str, str]] = field(default_factory=list)  # (gc record, why it is not yet due)
    indexes_rewritten: int = 0
    leases_removed: int = 0  # of dead sessions
    dry_run: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "snapshots_marked": self.snapshots_marked,
            "packs_referenced": self.packs_referenced,
            "condemned": len(self.condemned),
            "deleted": len(self.deleted),
            "deleted_bytes": self.deleted_bytes,
            "rescued": len(self.rescued),
            "indexes_rewritten": self.indexes_rewritten,
            "dead_leases_removed": self.leases_removed,
            "waiting": [{"record": r, "reason": why} for r, why in self.waiting],
        }


class Pruner:
    """One prune run with a put key whose certificate allows pruning (its dedup domain only:
    other domains' indexes are not readable with its S)."""

    def __init__(
        self,
        repo: Repository,
        put: PutKey,
        *,
        grace: float = DEFAULT_GRACE,
        dry_run: bool = False,
        progress: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self.repo, self.put, self.grace, self.dry_run, self.progress = repo, put, grace, dry_run, progress
        self.cert = repo.check_put_key(put)
        if "prune" not in self.cert.capabilities:
            raise KeyRequired(
                f"client {self.cert.client!r} may not prune: its put key has no `prune` capability",
                "prune with a put key made by `bunker key new-client NAME --prune` (on the machine with the master "
                "key); nothing was deleted",
            )
        self.report = PruneReport(dry_run=dry_run)

    def run(self) -> PruneReport:
        """Phase 2 for the records that are due, then phase 1 for new garbage."""
        lease = Lease(self.repo, self.put.client_key, self.cert.client, self.cert.name, "prune")
        lease.write()
        try:
            now = lease.storage_time()
            seen = sessions(self.repo)
            live = [s for s in seen if s.alive(now) and s.session != lease.session]
            # a dead session with a checkpoint waits for its client's next run, which makes it an
            # incomplete snapshot: its lease stays, and what it names is kept
            dead = [s for s in seen if not s.alive(now) and s.checkpoint is None]
            sizes = {i.name.split("/", 1)[1]: i.size for i in self.repo.backend.list("packs/")}
            self.progress(f"marking: {len(sizes)} packs")
            referenced = self._mark(seen)
            lease.refresh_if_due()
            pending = condemnations(self.repo)
            done: set[str] = set()
            for rec in pending:
                why = self._not_due(rec, now, live)
                if why:
                    self.report.waiting.append((rec.name, why))
                    continue
                self._delete(rec, referenced, sizes)
                done.add(rec.name)
                lease.refresh_if_due()
            still = {p for r in pending if r.name not in done for p in r.packs}
            self._condemn(set(sizes), referenced, still | set(self.report.deleted) | set(self.report.rescued))
            self._clear_dead(dead)
        finally:
            lease.release()
        return self.report

    # ------------------------------------------------------------------ marking
    def _mark(self, seen: list[Session]) -> set[str]:
        retired = self.repo.retired_snapshots()
        referenced: set[str] = set()
        for s in seen:
            if s.checkpoint is not None:
                referenced.update(
                    self._packs_named(str(s.checkpoint.get("packset")), f"the checkpoint in {s.names[-1]}")
                )
        for info in self.repo.backend.list("snapshots/"):
            if info.name in retired:
                continue
            try:
                packset = parse_snapshot(self.repo.get_object(info.name)).env.packset
            except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
                raise self._unmarkable(info.name, exc) from None
            referenced.update(self._packs_named(packset, info.name))
            self.report.snapshots_marked += 1
        self.report.packs_referenced = len(referenced)
        return referenced

    def _packs_named(self, packset: str, what: str) -> list[str]:
        try:
            return refs.read_set(packset, self.repo.get_object)
        except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
            raise self._unmarkable(what, exc) from None

    @staticmethod
    def _unmarkable(what: str, exc: Exception) -> BunkerError:
        """Marking is conservative: what cannot be read stops the prune before any deletion."""
        msg = exc.message if isinstance(exc, BunkerError) else str(exc)
        return BunkerError(
            f"prune cannot tell which packs {what} needs: {msg}",
            "nothing was deleted; run `bunker check` and repair or forget what it names first",
            exit_code=ExitCode.INTEGRITY,
        )

    # ------------------------------------------------------------------ phase 1
    def _condemn(self, existing: set[str], referenced: set[str], excluded: set[str]) -> None:
        index = IndexCache(self.repo, self.put.secrets, None, for_dedup=False).load()
        index.add_unindexed_packs()  # packs of killed runs that no index names
        own = index.locations.packs() & existing
        garbage = sorted(own - referenced - excluded)
        self.report.condemned = garbage
        if garbage and not self.dry_run:
            data = make_condemnation(garbage, self.put.client_key, self.cert.name)
            self.repo.put_object("gc", data)

    def _clear_dead(self, dead: list[Session]) -> None:
        """Remove the leases of sessions that ended without removing them (killed): they no
        longer protect anything; removing them only tidies ``sessions/``."""
        self.report.leases_removed = len(dead)
        if self.dry_run:
            return
        for s in dead:
            for n in s.names:
                self.repo.backend.delete(n)

    # ------------------------------------------------------------------ phase 2
    def _not_due(self, rec: Condemnation, now: float, live: list[Session]) -> str:
        if now - rec.stored < self.grace:
            return f"grace period: due in {(self.grace - (now - rec.stored)) / 3600:.1f} h"
        blockers = [s for s in live if s.started < rec.stored + self.grace]
        if blockers:
            b = blockers[0]
            return (
                f"{len(blockers)} session(s) that may not have seen it are still running (e.g. a {b.kind} of "
                f"{b.client!r}); the next prune after they end deletes its packs"
            )
        return ""

    def _delete(self, rec: Condemnation, referenced: set[str], sizes: dict[str, int]) -> None:
        doomed = [p for p in rec.packs if p not in referenced]
        self.report.rescued += [p for p in rec.packs if p in referenced]
        if self.dry_run:
            self.report.deleted += [p for p in doomed if p in sizes]
            self.report.deleted_bytes += sum(sizes.get(p, 0) for p in doomed)
            return
        # index objects first: a reader that sees an index entry finds its pack, until the
        # pack goes; then the packs; the record last, so an interrupted prune redoes it
        self._rewrite_indexes(set(doomed))
        for p in doomed:
            self.repo.backend.delete(f"packs/{p}")
            if p in sizes:
                self.report.deleted.append(p)
                self.report.deleted_bytes += sizes[p]
        self.repo.backend.delete(rec.name)

    def _rewrite_indexes(self, doomed: set[str]) -> None:
        domain = self.put.secrets.domain_id
        for info in list(self.repo.backend.list("index/")):
            try:
                obj = parse_index_frame(self.repo.get_object(info.name))
                if obj.body.get("domain") != domain:
                    continue
                verify(self.repo.certificate(obj.signer).verify_key, MAGIC_INDEX, obj.body_bytes, obj.sig)
                entries = decrypt_index(obj, self.put.secrets)
            except (encoding.FormatError, BadSignature, CorruptObject, ObjectMissing):
                continue  # check reports it; it names no pack we can vouch for
            kept = [(cid, loc) for cid, loc in entries if loc.pack not in doomed]
            if len(kept) == len(entries):
                continue
            if kept:
                self.repo.put_object("index", make_index(kept, self.put.secrets, self.put.client_key, self.cert.name))
            self.repo.backend.delete(info.name)
            self.report.indexes_rewritten += 1
