"""``bunker forward``: deliver a spool's objects to the upstream repository.

Order (DESIGN.md §6): packs, index, reference objects, then snapshots. Each object is sent, read
back and checked against its name (BLAKE3 of the bytes) before the local copy is deleted, so
nothing leaves the spool before the upstream holds a good copy. The whole delivery runs under a
lease. Before a snapshot is sent, every pack its pack set names is rechecked upstream: an offline
run may have deduplicated against packs that a prune removed meanwhile; such a snapshot stays in
the spool and is reported, never delivered with holes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bunker import dirs, encoding
from bunker.backup.chain import load_head
from bunker.backup.run import client_tag
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.node.spool import Spool, verify_by_name
from bunker.node.vanished import Repaired, drop_superseded, repair_spooled_chain
from bunker.repo import refs
from bunker.repo.leases import Lease
from bunker.repo.objects import content_hash, is_hash_name
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
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
            "damaged": self.damaged,
            "left": self.left,
        }


def forward(
    spool: Spool, repo: Repository, put: PutKey, on_object: Callable[[ObjectInfo], None] | None = None
) -> ForwardReport:
    """Send every waiting object of ``spool`` to ``repo`` (the upstream, reachable).

    Raises StorageError when the upstream stops answering: what was confirmed is gone from the
    spool, the rest stays for the next attempt."""
    report = ForwardReport()
    local = spool.backend()
    pending = spool.pending()
    if not pending:
        spool.clear_leftovers()
        return report
    cert = repo.check_put_key(put)
    lease = Lease(repo, put.client_key, cert.client, cert.name, "forward")
    lock = threading.Lock()
    try:
        lease.write()  # in the try: a signal right after it still releases the lease
        bulk = [i for i in pending if not i.name.startswith("snapshots/")]
        snaps = [i for i in pending if i.name.startswith("snapshots/")]

        def send(info: ObjectInfo) -> None:
            outcome = _deliver(repo, local, info)
            with lock:
                if outcome == "sent":
                    report.sent += 1
                    report.sent_bytes += info.size
                elif outcome == "present":
                    report.present += 1
                else:
                    report.damaged.append(info.name)
            lease.refresh_if_due()
            if on_object is not None:
                on_object(info)

        # packs before index before refs: one prefix at a time, in parallel within it
        for prefix in ("packs/", "index/", "refs/", "retired/", "gc/"):
            group = [i for i in bulk if i.name.startswith(prefix)]
            if not group:
                continue
            pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="bunker-forward")
            try:
                for fut in [pool.submit(send, i) for i in group]:
                    fut.result()
            finally:
                # interrupted or failed: the objects not sent yet stay in the spool for the next forward
                pool.shutdown(wait=True, cancel_futures=True)
        if snaps:
            upstream_packs = {i.name.split("/", 1)[1] for i in repo.backend.list("packs/")}
            mine = []
            for info in snaps:
                why = _unreadable_or_foreign(repo, local, info.name, cert.name, upstream_packs)
                if why:
                    report.held.append((info.name, why))
                else:
                    mine.append(info.name)
            head = load_head(dirs.state_dir(repo.repo_id, client_tag(put)))
            mine = drop_superseded(local, mine, head)
            ready, report.repaired = repair_spooled_chain(
                repo, put, cert, local, mine, upstream_packs, lease.refresh_if_due
            )
            for name in ready:
                found = local.stat(name)
                if found is None:
                    continue
                send(found)
                if name not in report.damaged:
                    report.snapshots.append(name)
        spool.clear_leftovers()
    finally:
        lease.release(report.snapshots)
    report.left = len(spool.pending())
    return report


def _deliver(repo: Repository, local: LocalBackend, info: ObjectInfo) -> str:
    """Make the upstream hold ``info.name``; delete the local copy once confirmed.
    Returns "sent", "present" or "damaged" (the local copy does not match its name: deleted)."""
    name = info.name
    if verify_by_name(repo.backend, name, info.size):
        local.delete(name)
        return "present"
    data = local.get(name)
    if is_hash_name(name) and content_hash(data) != name.split("/", 1)[1]:
        # useless to anyone (and never sent): a snapshot that needs it is repaired like one
        # whose pack vanished upstream
        local.delete(name)
        return "damaged"
    repo.backend.put(name, data)
    del data
    if not verify_by_name(repo.backend, name, info.size):
        raise CorruptObject(
            name,
            "the upstream does not return what was just sent to it",
            "the upstream storage is failing; the object stays in the local spool: check the storage, then run "
            "`bunker forward` again",
        )
    local.delete(name)
    return "sent"


def _unreadable_or_foreign(
    repo: Repository, local: LocalBackend, name: str, cert: str, upstream_packs: set[str]
) -> str:
    """Why the spooled snapshot ``name`` cannot be forwarded or repaired here ("" if it can)."""
    try:
        snap = parse_snapshot(local.get(name))
        packs = refs.read_set(snap.env.packset, repo.get_object)
    except (encoding.FormatError, ObjectMissing, CorruptObject) as exc:
        msg = exc.message if isinstance(exc, BunkerError) else str(exc)
        return f"its pack set cannot be read: {msg}"
    missing = [p for p in packs if p not in upstream_packs]
    if snap.env.cert != cert and missing:
        return (
            f"{len(missing)} of the {len(packs)} packs it needs are no longer upstream (e.g. packs/{missing[0]}), "
            "and it was written with another put key than this machine's, which alone could store them again"
        )
    return ""


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
                    f"deduplicated against vanished upstream while this machine was offline, and {r.lost_chunks} "
                    f"chunks could not be stored again because their files changed since"
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
                    f"vanished upstream while this machine was offline; {r.recovered_chunks} chunks were stored "
                    "again from the unchanged source files, the snapshot is complete",
                )
            )
    return out
