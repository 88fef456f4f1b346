"""``bunker forward``: deliver a spool's objects to the upstream repository.

Order (docs/format.md section 17): packs, index, reference objects, then snapshots. Each object is sent, read
back and checked against its name (BLAKE3 of the bytes) before the local copy is deleted, so
nothing leaves the spool before the upstream holds a good copy; a pack's copy stays until no
spooled snapshot may need it (upstream, nothing names it before its snapshot arrives, so a
prune may delete it as garbage if this delivery stops first). The whole delivery runs under a
lease. Deliveries of one spool may overlap (two `bunker forward`, a backup that forwards first):
a delivery holds each object it sends (node/spool.py ``delivering``), and one that finds an
object held or gone moves on; snapshots are linked one delivery at a time under the client's
chain lock. Before a snapshot is sent, every pack its pack set names is rechecked upstream: an
offline run may have deduplicated against packs that a prune removed meanwhile (node/vanished.py),
and the snapshot is renumbered onto the chain's real head if the repository has moved on since
this machine last saw it (node/deliver.py): never delivered with holes, never a fork.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bunker import dirs, encoding
from bunker.backup.chain import note_running, releasing
from bunker.backup.client_dirs import client_tag
from bunker.crypto.keyfile import PutKey
from bunker.errors import CorruptObject, ObjectMissing
from bunker.node.deliver import Renumbered, deliver_own_snapshots
from bunker.node.spool import BUSY, MINE, Spool, verify_by_name
from bunker.node.vanished import Repaired
from bunker.repo.certs import Certificate
from bunker.repo.condemnations import ListedPacks
from bunker.repo.index import decrypt_index, make_index, parse_index_frame
from bunker.repo.leases import Lease
from bunker.repo.objects import content_hash, is_hash_name
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.repo.trailer_index import index_from_trailers
from bunker.storage.backend import ObjectInfo
from bunker.storage.local import LocalBackend

UPLOAD_THREADS = 3  # each holds one object (a pack: up to a few tens of MiB) at a time


@dataclass
class ForwardReport:
    """What one delivery did."""

    sent: int = 0  # objects uploaded
    sent_bytes: int = 0
    present: int = 0  # already upstream (a run that lost the connection after a put went through)
    snapshots: list[str] = field(default_factory=list)  # delivered snapshot names
    held: list[tuple[str, str]] = field(default_factory=list)  # (snapshot, why) kept in the spool
    repaired: list[Repaired] = field(default_factory=list)  # signed again: packs had vanished upstream
    damaged: list[str] = field(default_factory=list)  # spool objects whose bytes do not match their name
    renumbered: list[Renumbered] = field(default_factory=list)  # signed again onto the chain's real head
    indexes_trimmed: int = 0  # spooled index objects sent without entries for packs gone or condemned upstream
    packs_indexed_again: int = 0  # packs sent again whose index objects had gone up and were dropped by a prune
    others: list[str] = field(default_factory=list)  # another client's snapshots: left for its own run
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (level, code, message) of the chain
    left: int = 0  # objects still in the spool afterwards

    def to_json(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "sent_bytes": self.sent_bytes,
            "already_upstream": self.present,
            "snapshots": [s.split("/", 1)[1] for s in self.snapshots],
            "held": [{"snapshot": s.split("/", 1)[1], "reason": r} for s, r in self.held],
            "repaired": [
                {
                    "snapshot": r.new.split("/", 1)[1],
                    "was": r.old.split("/", 1)[1],
                    "vanished_packs": r.vanished_packs,
                    "recovered_chunks": r.recovered_chunks,
                    "lost_chunks": r.lost_chunks,
                    "complete": r.complete,
                    "files": r.files,
                    "more_files": r.more_files,
                }
                for r in self.repaired
            ],
            "renumbered": [
                {
                    "snapshot": r.new.split("/", 1)[1],
                    "was": r.old.split("/", 1)[1],
                    "seq": r.new_seq,
                    "was_seq": r.old_seq,
                }
                for r in self.renumbered
            ],
            "other_clients": [s.split("/", 1)[1] for s in self.others],
            "damaged": self.damaged,
            "indexes_trimmed": self.indexes_trimmed,
            "packs_indexed_again": self.packs_indexed_again,
            "left": self.left,
        }


def forward(
    spool: Spool, repo: Repository, put: PutKey, on_object: Callable[[ObjectInfo], None] | None = None
) -> ForwardReport:
    """Send every waiting object of ``spool`` to ``repo`` (the upstream, reachable). Another
    delivery of the same spool may run at once (another `bunker forward`, a backup forwarding
    first): each object is sent by one of them, and a run that finds an object taken or
    delivered by another moves on.

    Raises StorageError when the upstream stops answering: what was confirmed is gone from the
    spool, the rest stays for the next attempt."""
    report = ForwardReport()
    local = spool.backend()
    pending = spool.pending()
    if not pending:
        spool.clear_leftovers()
        return report
    cert = repo.check_put_key(put)
    state_dir = dirs.state_dir(repo.repo_id, client_tag(put))
    lease = Lease(repo, put.client_key, cert.client, cert.name, "forward")
    lock = threading.Lock()
    try:
        lease.write()  # in the try: a signal right after it still releases the lease
        note_running(state_dir, lease.session)  # a claim this run leaves when killed is known dead here at once
        bulk = [i for i in pending if not i.name.startswith("snapshots/")]
        snaps = [i.name for i in pending if i.name.startswith("snapshots/")]
        trim: _IndexTrim | None = None  # once the packs are up
        kept: list[str] = []  # packs upstream whose local copies stay until no snapshot here needs them
        sent_packs: list[str] = []  # packs this delivery uploaded (absent upstream)
        # packs the spool's own index objects index: any other pack sent is one an earlier
        # delivery sent with its index object, whose entries a prune dropped with the pack
        indexed_here = _packs_indexed(local, [i.name for i in bulk if i.name.startswith("index/")], put)

        def send(info: ObjectInfo, wait: bool) -> bool:
            """Deliver one object unless another delivery holds it (False: left to it)."""
            with spool.delivering(info.name, wait=wait) as state:
                if state == BUSY:
                    return False
                keep = info.name.startswith("packs/")
                outcome = _deliver(repo, local, info, trim, keep) if state == MINE else "gone"
            with lock:
                if keep and outcome in ("sent", "present"):
                    kept.append(info.name)
                if outcome == "sent":
                    if keep:
                        sent_packs.append(info.name.split("/", 1)[1])
                    report.sent += 1
                    report.sent_bytes += info.size
                elif outcome == "present":
                    report.present += 1
                elif outcome == "damaged":
                    report.damaged.append(info.name)
            lease.refresh_if_due()
            if on_object is not None:
                on_object(info)
            return True

        def send_group(prefix: str) -> None:
            """One prefix's objects, in parallel; what another delivery is sending is waited for."""
            group = [i for i in bulk if i.name.startswith(prefix)]
            if not group:
                return
            pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="bunker-forward")
            try:
                futures = [pool.submit(send, i, False) for i in group]
                held = [i for i, fut in zip(group, futures, strict=True) if not fut.result()]
                for fut in [pool.submit(send, i, True) for i in held]:
                    fut.result()
            finally:
                # interrupted or failed: the objects not sent yet stay in the spool for the next forward
                pool.shutdown(wait=True, cancel_futures=True)

        # packs before index before refs, one prefix at a time; the runs' status records last
        send_group("packs/")
        # what the index objects and snapshots sent from now on may name: the spool's packs are
        # up; an earlier delivery's may have been condemned or deleted since (a killed forward
        # leaves packs that no snapshot names yet)
        packs = ListedPacks.read(repo)
        trim = _IndexTrim(put, cert, packs, lock)
        for prefix in ("index/", "refs/", "retired/", "gc/"):
            send_group(prefix)
        report.indexes_trimmed = trim.trimmed
        again = [p for p in sent_packs if p not in indexed_here and packs.usable(p)]
        report.packs_indexed_again = _index_again(repo, put, cert, again)
        if snaps:
            _send_snapshots(repo, put, cert, spool, local, snaps, lease, state_dir, report, packs)
        # a pack's local copy goes once no spooled snapshot may need it: a delivery stopped before
        # its snapshots went leaves packs upstream that nothing there names yet, which a prune
        # deletes as garbage; the next delivery sends them again from here
        if not any(i.name.startswith("snapshots/") for i in spool.pending()):
            for name in kept:
                local.delete(name)
        send_group("status/")
        spool.clear_leftovers()
    finally:
        with releasing(state_dir, lease.session):
            lease.release(report.snapshots)
    report.left = len(spool.pending())
    return report


def _send_snapshots(
    repo: Repository,
    put: PutKey,
    cert: Certificate,
    spool: Spool,
    local: LocalBackend,
    names: list[str],
    lease: Lease,
    state_dir: str,
    report: ForwardReport,
    packs: ListedPacks,
) -> None:
    """Deliver the spooled snapshots ``names``: this client's onto its chain (node/deliver.py);
    another client's (a second put key on this machine) wait for that client's own run, which
    alone can sign them again should its chain have moved."""
    own = []
    for name in names:
        try:
            signer = parse_snapshot(local.get(name)).env.cert
        except ObjectMissing:
            continue  # another delivery sent it meanwhile
        except encoding.FormatError as exc:
            report.held.append((name, f"it cannot be read: {exc}"))
            continue
        if signer == cert.name:
            own.append(name)
        else:
            report.others.append(name)
    done = deliver_own_snapshots(repo, put, cert, local, own, packs, lease, state_dir)
    report.snapshots += done.snapshots
    report.sent += len(done.snapshots)
    report.sent_bytes += done.sent_bytes
    report.present += done.already
    report.held += done.held
    report.repaired += done.repaired
    report.renumbered += done.renumbered
    report.events += [(e.level, e.code, e.message) for e in done.log.events]


def _packs_indexed(local: LocalBackend, names: list[str], put: PutKey) -> set[str]:
    """The packs that the spooled index objects ``names`` of ``put``'s dedup domain index."""
    out: set[str] = set()
    for name in names:
        try:
            obj = parse_index_frame(local.get(name))
            if obj.body.get("domain") == put.secrets.domain_id:
                out.update(decrypt_index(obj, put.secrets).used_packs())
        except (ObjectMissing, encoding.FormatError):
            continue  # sent by another delivery meanwhile, or not readable (it is not sent either)
    return out


def _index_again(repo: Repository, put: PutKey, cert: Certificate, packs: list[str]) -> int:
    """Index ``packs`` (sent again: their earlier index entries were dropped by the prune that
    deleted them) from their trailers in a new index object signed by this client; returns how
    many were indexed. A snapshot that names them is then whole in `check`'s eyes, as it was
    taken. Another client's pack (a second put key here) is left to its own run."""
    name, done = index_from_trailers(repo, put.secrets, put.client_key, cert.name, packs)
    if name is not None:
        info = repo.backend.stat(name)
        if info is None or not verify_by_name(repo.backend, name, info.size):  # (read back: its hash is its name)
            raise _not_returned(name)
    return done


class _IndexTrim:
    """Spooled index objects without their entries for packs the upstream no longer has, or
    that a prune condemned: sent as they are, those entries would name packs that are gone (or
    soon go), and `check` would rightly call the index damaged. The entries that stay are
    written in a new index object signed by this client."""

    def __init__(self, put: PutKey, cert: Certificate, packs: ListedPacks, lock: threading.Lock) -> None:
        self.put, self.cert, self.packs, self.lock = put, cert, packs, lock
        self.trimmed = 0  # index objects written anew or dropped

    def __call__(self, data: bytes) -> bytes | None:
        """The index object to send instead of ``data`` (empty: none, every entry went), or None
        to send ``data`` as it is (every entry stays, or it is not of this client's dedup
        domain: then a later prune rewrites it, repo/gc.py)."""
        try:
            obj = parse_index_frame(data)
            if obj.body.get("domain") != self.put.secrets.domain_id:
                return None
            entries = decrypt_index(obj, self.put.secrets)
        except encoding.FormatError:
            return None
        kept = [(cid, loc) for cid, loc in entries if self.packs.usable(loc.pack)]
        if len(kept) == len(entries):
            return None
        with self.lock:
            self.trimmed += 1
        return make_index(kept, self.put.secrets, self.put.client_key, self.cert.name) if kept else b""


def _deliver(
    repo: Repository, local: LocalBackend, info: ObjectInfo, trim: _IndexTrim | None = None, keep: bool = False
) -> str:
    """Make the upstream hold ``info.name``; delete the local copy once confirmed (unless
    ``keep``). Returns "sent", "present", "gone" (no local copy left) or "damaged" (the local
    copy does not match its name: deleted). An index object goes through ``trim`` first
    ("trimmed": what of it may be sent went under a new name)."""
    name = info.name
    if verify_by_name(repo.backend, name, info.size):
        if not keep:
            local.delete(name)
        return "present"
    try:
        data = local.get(name)
    except ObjectMissing:
        return "gone"  # not while this delivery holds it; but nothing is lost: nothing to send
    if is_hash_name(name) and content_hash(data) != name.split("/", 1)[1]:
        # useless to anyone (and never sent): a snapshot that needs it is repaired like one
        # whose pack vanished upstream
        local.delete(name)
        return "damaged"
    if trim is not None and name.startswith("index/"):
        instead = trim(data)
        if instead is not None:
            if instead:
                sent = repo.put_object("index", instead)
                if not verify_by_name(repo.backend, sent, len(instead)):
                    raise _not_returned(sent)
            local.delete(name)
            return "trimmed"
    repo.backend.put(name, data)
    del data
    if not verify_by_name(repo.backend, name, info.size):
        raise _not_returned(name)
    if not keep:
        local.delete(name)
    return "sent"


def _not_returned(name: str) -> CorruptObject:
    return CorruptObject(
        name,
        "the upstream does not return what was just sent to it",
        "the upstream storage is failing; the object stays in the local spool: check the storage, then run "
        "`bunker forward` again",
    )


def forward_summary(report: ForwardReport, url: str) -> str:
    """One line for people: what went upstream."""
    mib = report.sent_bytes / (1 << 20)
    text = (
        f"forwarded {report.sent} objects ({mib:.1f} MiB) and {len(report.snapshots)} snapshots from the local spool "
        f"to {url}"
    )
    if report.present:
        text += f"; {report.present} were already there"
    return text


def forward_problems(report: ForwardReport, spool_root: str) -> list[tuple[str, str, str]]:
    """(level, code, message) for what the delivery could not do."""
    out: list[tuple[str, str, str]] = []
    for snap, why in report.held:
        out.append(
            (
                "err",
                "forward-held",
                f"spooled snapshot {snap.split('/', 1)[1][:12]} was not forwarded: {why}. It stays in {spool_root} "
                "and nothing of it is lost there; run `bunker check` on the repository to see what is missing",
            )
        )
    for name in report.damaged:
        out.append(
            (
                "err",
                "spool-damaged",
                f"{name} in the local spool {spool_root} was damaged (its bytes did not match its name): it was "
                "deleted, not forwarded; check this machine's disk (snapshots that needed it are repaired from the "
                "source files)",
            )
        )
    for r in report.repaired:
        if r.vanished_packs and r.lost_chunks:
            files = ", ".join(r.files) + (f" and {r.more_files} more" if r.more_files else "")
            out.append(
                (
                    "err",
                    "forward-incomplete",
                    f"snapshot {r.new.split('/', 1)[1][:12]} was forwarded incomplete: {r.vanished_packs} packs it "
                    "deduplicated against vanished upstream (or a prune condemned them) while this machine was "
                    f"offline, and {r.lost_chunks} chunks could not be stored again because their files changed since"
                    + (f" (affected: {files})" if files else " (directory listings)")
                    + "; the next backup stores the current content of those files",
                )
            )
        elif r.vanished_packs:
            out.append(
                (
                    "note",
                    "forward-recovered",
                    f"snapshot {r.new.split('/', 1)[1][:12]}: {r.vanished_packs} packs it deduplicated against "
                    "vanished upstream (or a prune condemned them) while this machine was offline; "
                    f"{r.recovered_chunks} chunks were stored again from the unchanged source files or copied from "
                    "condemned packs still there, the snapshot is complete",
                )
            )
    for n in report.renumbered:
        out.append(
            (
                "note",
                "forward-renumbered",
                f"spooled snapshot {n.old.split('/', 1)[1][:12]} was taken as #{n.old_seq} while this machine did not "
                f"know its chain's newest snapshot (its state directory was deleted or restored from an old copy, or "
                f"another run of this client got there first): it was linked as #{n.new_seq} "
                f"{n.new.split('/', 1)[1][:12]} and signed again, so the chain does not fork",
            )
        )
    if report.others:
        out.append(
            (
                "note",
                "forward-other-client",
                f"{len(report.others)} spooled snapshots in {spool_root} were written with another put key of this "
                "machine; that client's next backup (or `bunker forward --put-key ITS_KEY`) delivers them",
            )
        )
    out += report.events
    return out
