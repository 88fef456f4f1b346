"""Garbage collection (``bunker prune``): two phases, no locks (docs/format.md section 15).

Phase 1 *condemns*: every pack of this dedup domain that no live snapshot's pack set names is
listed in a signed ``gc/`` record. A session reads the records right after writing its lease and
treats condemned packs as absent: it stores their chunks again rather than deduplicate against
them.

Phase 2 (a later prune) *deletes*: a record's packs go once the grace period has passed since the
storage stored the record and no session is still alive that started before the record plus the
grace (such a session may not have seen it). Packs that a snapshot names by then (a session that
had deduplicated against them finished) are kept. Index objects that name deleted packs are
written anew without them, then the record is removed.

Then it *repacks* (repo/repack.py): packs of which less than a threshold share is live, and small
packs, are copied (their live blobs only) into new packs, and a move record (repo/moves.py) says
where their blobs went. Every pack set is read through the move records. The old packs are
condemned by the move record and deleted by a later prune under the same rules, once every chunk
that a snapshot naming them needs is in the new packs; otherwise they are kept (rescued).

All times are the storage's own (the prune's own lease gives "now"). Marking is conservative: a
snapshot whose pack set cannot be read stops the prune before anything is deleted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bunker import encoding
from bunker.crypto.keyfile import PutKey
from bunker.crypto.sign import BadSignature, verify
from bunker.errors import BunkerError, CorruptObject, ExitCode, KeyRequired, ObjectMissing
from bunker.repo import refs
from bunker.repo.checkpoint_roots import checkpoint_roots
from bunker.repo.condemnations import Condemnation, condemnations
from bunker.repo.holding_records import spent_holdings
from bunker.repo.index import decrypt_index, make_index, parse_index_frame
from bunker.repo.index_cache import IndexCache
from bunker.repo.leases import MAX_LEASE_SECONDS, Lease, Session, sessions
from bunker.repo.liveness import Liveness, UnreadableRoot, all_copies, mark_live
from bunker.repo.moves import MoveRecord, PackMoves, make_move_record
from bunker.repo.node_acks import AckView
from bunker.repo.objects import MAGIC_INDEX, MAX_SIGNED_OBJECT
from bunker.repo.other_secret import (
    certificate_domains,
    index_with_other_secret,
    pack_with_other_secret,
    retire,
    snapshot_with_other_secret,
)
from bunker.repo.records import make_condemnation
from bunker.repo.repack import DEFAULT_THRESHOLD, choose, repack
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.repo.trailer_index import index_from_trailers

DEFAULT_GRACE = 24 * 3600.0


@dataclass(frozen=True)
class Root:
    """What marking keeps: a live snapshot or a checkpoint, with its pack set and chunk set."""

    what: str
    packset: str
    packs: tuple[str, ...]
    chunkset: str
    domain: str


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
    repacked: list[str] = field(default_factory=list)  # packs whose live blobs this run copied
    repack_written: list[str] = field(default_factory=list)  # the new packs
    repack_copied_bytes: int = 0
    repack_freed_bytes: int = 0  # what deleting the repacked packs will free
    repack_skipped: list[tuple[str, str]] = field(default_factory=list)  # (pack, why)
    move_records_removed: int = 0
    # what a damaged put key wrote (repo/other_secret.py): snapshots retired, index objects removed
    retired_other_secret: list[str] = field(default_factory=list)
    other_secret_indexes_removed: int = 0
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
            "repacked": len(self.repacked),
            "repack_packs_written": len(self.repack_written),
            "repack_copied_bytes": self.repack_copied_bytes,
            "repack_frees_bytes": self.repack_freed_bytes,
            "repack_skipped": [{"pack": p, "reason": why} for p, why in self.repack_skipped],
            "move_records_removed": self.move_records_removed,
            "retired_other_secret": self.retired_other_secret,
            "other_secret_indexes_removed": self.other_secret_indexes_removed,
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
        repack_threshold: float = DEFAULT_THRESHOLD,
        dry_run: bool = False,
        progress: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self.repo, self.put, self.grace, self.dry_run, self.progress = repo, put, grace, dry_run, progress
        self.repack_threshold = repack_threshold
        self.cert = repo.check_put_key(put)
        if "prune" not in self.cert.capabilities:
            raise KeyRequired(
                f"client {self.cert.client!r} may not prune: its put key has no `prune` capability",
                "prune with a put key made by `bunker key new-client NAME --prune` (on the machine with the master "
                "key); nothing was deleted",
            )
        self.report = PruneReport(dry_run=dry_run)
        self._condemned: set[str] = set()  # condemned packs that no snapshot needs (see run)
        self._naming: Counter[str] = Counter()
        self._other_secret: list[str] = []  # snapshots a damaged put key wrote: no roots (see _mark)
        self._acks: AckView | None = None  # nodes' session acknowledgements, read when first needed
        self._spent_roots: list[str] = []  # checkpoint roots whose session a snapshot here names
        self._pack_sets: dict[str, tuple[str, ...]] = {}  # pack set -> its packs (see _packs_named)
        self._pack_names: dict[str, str] = {}
        self._listed: set[str] = set()  # every snapshot here, retired or not
        self._places: set[tuple[str, int]] = set()  # (certificate, sequence number) of the live ones

    def run(self) -> PruneReport:
        """Phase 2 for the records that are due, then phase 1 for new garbage, then repack."""
        lease = Lease(self.repo, self.put.client_key, self.cert.client, self.cert.name, "prune")
        try:
            lease.write()  # in the try: a signal right after it still releases the lease
            now = lease.storage_time()
            invalid: list[tuple[str, str]] = []
            seen = sessions(self.repo, invalid)
            live = [s for s in seen if s.alive(now) and s.session != lease.session]
            # a dead session with a checkpoint waits for its client's next run (or a prune that
            # adopts it), which makes it an incomplete snapshot: its lease stays, and what it
            # names is kept
            dead = [s for s in seen if not s.alive(now) and s.checkpoint is None]
            sizes = {i.name.split("/", 1)[1]: i.size for i in self.repo.backend.list("packs/")}
            self.progress(f"marking: {len(sizes)} packs")
            moves = PackMoves.load(self.repo)
            roots = self._mark(seen)
            # they can never be restored, and `check` reports them until they are retired
            self.report.retired_other_secret = list(self._other_secret)
            if not self.dry_run:
                retire(self.repo, self._other_secret, self.put.client_key, self.cert.name)
            referenced = moves.resolve(p for r in roots for p in r.packs)
            self.report.packs_referenced = len(referenced)
            lease.refresh_if_due()
            pending = condemnations(self.repo)
            # what a rewritten index object leaves out besides the deleted packs: a pack it keeps
            # an entry for must not be deleted by a prune whose listing misses that fresh object
            self._condemned = {p for r in pending for p in r.packs if p not in referenced} | moves.sources()
            # how many records condemn each pack: a rescued pack is indexed again only once none does
            self._naming = Counter(p for r in pending for p in r.packs)
            self._naming.update(p for r in moves.records for p in r.moves)
            done: set[str] = set()
            for rec in pending:
                why = self._not_due(rec, now, live)
                if why:
                    self.report.waiting.append((rec.name, why))
                    continue
                self._delete(rec, referenced, sizes)
                done.add(rec.name)
                lease.refresh_if_due()
            due = [r for r in moves.records if any(p in sizes for p in r.moves)]
            liveness = None
            if due or self.repack_threshold > 0:
                self.progress("reading chunk sets")
                liveness = self._liveness(roots, moves, sizes)
                lease.refresh_if_due()
            self._finish_moves(moves, now, live, referenced, sizes, liveness)
            if not self.dry_run:
                # and nodes' holding records that speak of nothing missing here any more
                for name in self._spent_roots + spent_holdings(self.repo, self._listed, self._places):
                    self.repo.backend.delete(name)
            if self._acks is not None and not self.dry_run:
                for ack in self._acks.older:  # a node's newest acknowledgement says all the older ones did
                    self.repo.backend.delete(ack.name)
            lease.refresh_if_due()
            still = {p for r in pending if r.name not in done for p in r.packs}
            excluded = still | set(self.report.deleted) | set(self.report.rescued) | moves.sources()
            self._condemn(set(sizes), referenced, excluded)
            if liveness is not None and self.repack_threshold > 0:
                self._repack(liveness, referenced, excluded | set(self.report.condemned), sizes, lease)
            if not self.dry_run:
                # an index object stored before this run's lease (and, on storage whose listings
                # lag, the grace period before it) names only packs that its listing of packs shows
                self._rewrite_indexes(set(), set(sizes), now - self.grace)
            self._clear_dead(dead)
            self._clear_invalid([n for n, _ in invalid], now)
        finally:
            lease.release()
        return self.report

    # ------------------------------------------------------------------ marking
    def _mark(self, seen: list[Session]) -> list[Root]:
        retired = self.repo.retired_snapshots()
        domains = certificate_domains(self.repo)
        roots: list[Root] = []
        named: set[str] = set()  # sessions a live snapshot names
        for s in seen:
            if s.checkpoint is not None:
                what = f"the checkpoint in {s.names[-1]}"
                packset = str(s.checkpoint.get("packset"))
                try:
                    domain = self.repo.certificate(s.cert).domain
                except (CorruptObject, ObjectMissing) as exc:
                    raise self._unmarkable(what, exc) from None
                packs = self._packs_named(packset, what)
                roots.append(Root(what, packset, packs, str(s.checkpoint.get("chunkset")), domain))
        for info in self.repo.backend.list("snapshots/"):
            self._listed.add(info.name)
            if info.name in retired:
                continue
            try:
                snap = parse_snapshot(self.repo.get_object(info.name))
            except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
                raise self._unmarkable(info.name, exc) from None
            env = snap.env
            self._places.add((env.cert, env.seq))
            named.update(sid for sid in (env.session, env.adopted.session if env.adopted else "") if sid)
            if snapshot_with_other_secret(self.repo, snap, domains, self.put.secrets.domain_id):
                # written by a damaged put key of this domain's clients: no key can read its data, so
                # it keeps nothing; it is retired, and its packs go like any garbage
                self._other_secret.append(info.name)
                continue
            roots.append(
                Root(info.name, env.packset, self._packs_named(env.packset, info.name), env.chunkset, env.domain)
            )
            self.report.snapshots_marked += 1
        # dead sessions' checkpoints held by nodes below (repo/checkpoint_roots.py): kept until a
        # live envelope here names their session (its own run, or an adoption); then they go
        for cr in checkpoint_roots(self.repo):
            if cr.session in named:
                self._spent_roots.append(cr.name)
                continue
            what = f"the checkpoint in {cr.lease_name} (held by a node)"
            try:
                domain = self.repo.certificate(cr.cert).domain
            except (CorruptObject, ObjectMissing) as exc:
                raise self._unmarkable(what, exc) from None
            packset = str(cr.checkpoint.get("packset"))
            packs = self._packs_named(packset, what)
            roots.append(Root(what, packset, packs, str(cr.checkpoint.get("chunkset")), domain))
        return roots

    def _liveness(self, roots: list[Root], moves: PackMoves, sizes: dict[str, int]) -> Liveness:
        """Which chunks of each of this domain's packs a live snapshot or checkpoint needs."""
        liveness = all_copies(self.repo, self.put.secrets, sizes)
        seen: set[tuple[str, str]] = set()

        def marked() -> Iterator[tuple[str, set[str], str]]:
            for r in roots:  # (one resolved pack set at a time)
                if r.domain == self.put.secrets.domain_id and (r.packset, r.chunkset) not in seen:
                    seen.add((r.packset, r.chunkset))
                    yield r.what, moves.resolve(r.packs), r.chunkset

        try:
            mark_live(liveness, marked(), self.repo.get_object, self.put.secrets)
        except UnreadableRoot as exc:
            raise self._unmarkable(exc.what, exc.cause) from None
        return liveness

    def _packs_named(self, packset: str, what: str) -> tuple[str, ...]:
        """The packs a pack set names. Snapshots of one client name mostly the same packs: each
        name is kept once, and a pack set several roots share is read once (at 20,000 packs,
        a tuple of shared names is 160 KB per snapshot instead of 2.4 MB of strings)."""
        got = self._pack_sets.get(packset)
        if got is None:
            try:
                names = refs.read_set(packset, self.repo.get_object)
            except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
                raise self._unmarkable(what, exc) from None
            got = self._pack_sets[packset] = tuple(self._pack_names.setdefault(p, p) for p in names)
        return got

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
        own = index.named_packs & existing
        # packs this domain's writers signed under a damaged secret: no key reads them
        others = existing - own - referenced - excluded
        own |= {p for p in others if pack_with_other_secret(self.repo, p, self.put.secrets)}
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

    def _clear_invalid(self, names: list[str], now: float) -> None:
        """Remove lease objects that do not verify or name another object (damaged, forged or
        replayed) once they are older than any lease may live: they protect nothing, and `check`
        reports them until then."""
        mtimes = {i.name: i.mtime for i in self.repo.backend.list("sessions/")}
        old = [n for n in names if now - mtimes.get(n, now) > MAX_LEASE_SECONDS]
        self.report.leases_removed += len(old)
        if not self.dry_run:
            for n in old:
                self.repo.backend.delete(n)

    # ------------------------------------------------------------------ phase 2
    def _not_due(self, rec: Condemnation | MoveRecord, now: float, live: list[Session]) -> str:
        if now - rec.stored < self.grace:
            return f"grace period: due in {(self.grace - (now - rec.stored)) / 3600:.1f} h"
        blockers = [s for s in live if s.started < rec.stored + self.grace]
        if blockers:
            b = blockers[0]
            return (
                f"{len(blockers)} session(s) that may not have seen it are still running (e.g. a {b.kind} of "
                f"{b.client!r}); the next prune after they end deletes its packs"
            )
        # sessions on nodes below are seen only through their acknowledgements (repo/node_acks.py)
        if self._acks is None:
            self._acks = AckView(self.repo)
        waiting = self._acks.blockers(rec.stored)
        if waiting:
            cert, ack = waiting[0]
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ack.before)) if ack else ""
            last = f"its newest covers until {when} UTC" if ack else "none arrived yet"
            return (
                f"node {cert.node!r} has not yet acknowledged that the sessions it served before this record ended "
                f"and went up ({last}); it does with its next `bunker node forward` once they have. A node that is "
                "gone for good: `bunker key revoke-node NAME` at the top releases the wait"
            )
        return ""

    def _delete(self, rec: Condemnation, referenced: set[str], sizes: dict[str, int]) -> None:
        doomed = [p for p in rec.packs if p not in referenced]
        rescued = [p for p in rec.packs if p in referenced]
        self.report.rescued += rescued
        if self.dry_run:
            self.report.deleted += [p for p in doomed if p in sizes]
            self.report.deleted_bytes += sum(sizes.get(p, 0) for p in doomed)
            return
        # index objects first: a reader that sees an index entry finds its pack, until the
        # pack goes; then the packs; the record last, so an interrupted prune redoes it
        self._rewrite_indexes(set(doomed))
        self._naming.subtract(rec.packs)
        self._index_again(rescued)
        for p in doomed:
            self.repo.backend.delete(f"packs/{p}")
            if p in sizes:
                self.report.deleted.append(p)
                self.report.deleted_bytes += sizes[p]
        self.repo.backend.delete(rec.name)

    def _index_again(self, packs: list[str]) -> None:
        """Index rescued packs anew from their trailers: a rewrite may have left their entries out
        while they were condemned. Not while another record still condemns one: a prune that
        deletes it could miss the fresh index object in a listing that lags."""
        free = [p for p in packs if self._naming[p] == 0]
        index_from_trailers(self.repo, self.put.secrets, self.put.client_key, self.cert.name, free)

    def _rewrite_indexes(self, doomed: set[str], listed: set[str] | None = None, settled: float = 0.0) -> None:
        """Write anew, without the doomed packs' entries, the index objects that have any. Entries
        of other condemned packs are left out too (see ``run``). With ``listed`` (the packs a
        listing showed before ``settled``), also the index objects stored before ``settled`` that
        name packs the listing did not show: their packs were stored before them, so they are
        gone (a rewrite that missed them, or a killed prune), and the entries only mislead."""
        domain = self.put.secrets.domain_id
        drop = doomed | self._condemned
        for info in list(self.repo.backend.list("index/")):
            gone: set[str] = set()
            if info.size > MAX_SIGNED_OBJECT:
                continue  # larger than any signed object may be: never fetched (check reports it)
            try:
                obj = parse_index_frame(self.repo.get_object(info.name))
                if obj.body.get("domain") != domain:
                    if listed is not None and index_with_other_secret(self.repo, obj, domain):
                        # a damaged put key of this domain wrote it: its entries are unreadable to all
                        self.repo.backend.delete(info.name)
                        self.report.other_secret_indexes_removed += 1
                    continue
                verify(self.repo.certificate(obj.signer).verify_key, MAGIC_INDEX, obj.body_bytes, obj.sig)
                entries = decrypt_index(obj, self.put.secrets)
            except (encoding.FormatError, BadSignature, CorruptObject, ObjectMissing):
                continue  # check reports it; it names no pack we can vouch for
            if listed is not None and info.mtime < settled:
                gone = {loc.pack for _, loc in entries if loc.pack not in listed}
            if not any(loc.pack in doomed or loc.pack in gone for _, loc in entries):
                continue
            kept = [(cid, loc) for cid, loc in entries if loc.pack not in drop and loc.pack not in gone]
            if kept:
                self.repo.put_object("index", make_index(kept, self.put.secrets, self.put.client_key, self.cert.name))
            self.repo.backend.delete(info.name)
            self.report.indexes_rewritten += 1

    # ------------------------------------------------------------------ repack
    def _repack(
        self, liveness: Liveness, referenced: set[str], excluded: set[str], sizes: dict[str, int], lease: Lease
    ) -> None:
        target = int(self.repo.config.packs["target"])
        eligible = [p for p in referenced if p in sizes and liveness.has_pack(p) and p not in excluded]
        chosen = choose(liveness, sizes, eligible, self.repack_threshold, target)
        if not chosen:
            return
        self.progress(f"repacking {len(chosen)} packs")
        if self.dry_run:
            self.report.repacked = chosen
            self.report.repack_copied_bytes = sum(liveness.live_bytes(p) for p in chosen)
            self.report.repack_freed_bytes = sum(sizes[p] for p in chosen)
            return
        result = repack(
            self.repo,
            self.put.secrets,
            self.put.client_key,
            self.cert.name,
            chosen,
            liveness,
            target,
            tick=lease.refresh_if_due,
        )
        self.report.repack_skipped = result.skipped
        if result.moves:
            # after the new packs and their index: a prune killed before this leaves new packs
            # that nothing names, which the next prune condemns
            self.repo.put_object("gc", make_move_record(result.moves, self.put.client_key, self.cert.name))
        self.report.repacked = sorted(result.moves)
        self.report.repack_written = [n for n, _ in result.written]
        self.report.repack_copied_bytes = result.copied_bytes
        self.report.repack_freed_bytes = sum(sizes[p] for p in result.moves)

    def _finish_moves(
        self,
        moves: PackMoves,
        now: float,
        live: list[Session],
        referenced: set[str],
        sizes: dict[str, int],
        liveness: Liveness | None,
    ) -> None:
        """Phase 2 of the move records: an old pack of a due record goes if every chunk it holds
        that a live pack set needs is in packs its blobs moved to (by any record: listings that
        lag can make two prunes repack one pack); else it is kept (rescued), and every record
        naming it is written anew without it. A record goes once its old packs are gone and no
        live pack set names them."""
        due: list[MoveRecord] = []
        for rec in moves.records:
            if not any(p in sizes for p in rec.moves):
                if not set(rec.moves) & referenced:
                    self.report.move_records_removed += 1
                    if not self.dry_run:
                        self.repo.backend.delete(rec.name)
                continue
            why = self._not_due(rec, now, live)
            if why:
                self.report.waiting.append((rec.name, why))
            else:
                due.append(rec)
        if not due:
            return
        assert liveness is not None
        doomed: list[str] = []
        rescued: list[str] = []
        for p in sorted({p for rec in due for p in rec.moves if p in sizes}):
            held: set[bytes] = set()
            for t in moves.resolve([p]) - {p}:
                if t in sizes:
                    held.update(liveness.chunk_ids(t))
            (doomed if liveness.live_ids(p) <= held else rescued).append(p)
        self.report.rescued += rescued
        self.report.deleted += doomed
        self.report.deleted_bytes += sum(sizes[p] for p in doomed)
        if self.dry_run:
            return
        self._condemned -= set(rescued)
        self._rewrite_indexes(set(doomed))
        self._naming.subtract(p for rec in moves.records for p in rec.moves if p in rescued)
        self._index_again(rescued)
        for p in doomed:
            self.repo.backend.delete(f"packs/{p}")
        for rec in moves.records if rescued else []:
            if set(rec.moves) & set(rescued):
                # a backup that had deduplicated against them finished: they stay, no longer
                # condemned; the new copies of their blobs become garbage for a later prune
                kept = {old: list(new) for old, new in rec.moves.items() if old not in rescued}
                if kept:
                    self.repo.put_object("gc", make_move_record(kept, self.put.client_key, self.cert.name))
                self.repo.backend.delete(rec.name)
