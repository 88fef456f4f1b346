"""Checkpoints of clients that never come back (issue 5, docs/format.md section 17).

A killed backup's last checkpoint waits in its lease for the client's next run, which makes it an
incomplete snapshot in the client's own chain (backup/checkpoint.py). A client whose machine died
for good never runs again: without this module its lease would pin the checkpoint's packs forever
and its last work would never be listed. ``bunker prune`` therefore adopts the checkpoint of a
session that has been dead (lease expired, by the storage's time) for at least the prune's grace
period. Only a client's own key extends its chain, so the snapshot goes into the *pruner's* chain,
signed by the pruner's certificate, and its envelope names whose run it was (``adopted``); listings
and retention put it under that client (repo/selection.py ``owner``). Then the session's lease
objects go. A client that comes back later finds no lease for its killed session and forgets it.

Only checkpoints of the pruner's own dedup domain are adopted: the snapshot's chunk set must be
readable with the domain's S, which the pruner holds only for its own domain. Others are left
alone and reported.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.backup.chain import note_running, releasing
from bunker.backup.checkpoint import checkpoint_snapshot, stale_checkpoint, used_sessions
from bunker.backup.commit import chain_head
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, CorruptObject, ObjectMissing, StorageError
from bunker.repo import refs
from bunker.repo.certs import Certificate
from bunker.repo.leases import Lease, Session, sessions, wait_until_listed
from bunker.repo.records import ChainBase
from bunker.repo.repository import Repository
from bunker.repo.selection import adoption_problem
from bunker.repo.snapshot import Adoption
from bunker.runlog import RunLog

# why a dead session's checkpoint was not adopted (``kept`` rows of the report)
WAITING, OTHER_DOMAIN = "waiting", "other-domain"
UNUSABLE = "unusable"  # cannot become a snapshot: its lease is removed (like the client's own run does)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


@dataclass
class AdoptionReport:
    """What a prune did (or, with ``dry_run``, would do) with dead sessions' checkpoints."""

    dry_run: bool = False
    adopted: list[dict[str, Any]] = field(default_factory=list)  # session, client, lease, time, snapshot, seq
    kept: list[dict[str, Any]] = field(default_factory=list)  # session, client, lease, time, why, reason
    events: list[dict[str, Any]] = field(default_factory=list)  # warnings of the pruner's chain

    def to_json(self) -> dict[str, object]:
        return {
            "checkpoints_adopted": len(self.adopted),
            "adopted": self.adopted,
            "checkpoints_not_adopted": self.kept,
            "adoption_events": self.events,
        }

    def lines(self) -> list[str]:
        """Human-readable lines for ``bunker prune``."""
        out = []
        verb = "would adopt" if self.dry_run else "adopted"
        for a in self.adopted:
            what = (
                f"as incomplete snapshot #{a['seq']} {a['snapshot'].split('/', 1)[1][:12]}"
                if a["snapshot"]
                else "as an incomplete snapshot"
            )
            out.append(
                f"{verb} the last checkpoint ({_when(a['time'])}) of a dead run of client {a['client']!r} {what} "
                f"in this pruner's chain, listed under {a['client']!r}; it restores what that run had stored"
            )
        for k in self.kept:
            out.append(f"  checkpoint of client {k['client']!r} ({k['lease']}): {k['reason']}")
        for e in self.events:
            out.append(f"  {e['level']}: {e['message']}")
        return out


def adopt_abandoned_checkpoints(
    repo: Repository, put: PutKey, cert: Certificate, state_dir: str, grace: float, *, dry_run: bool = False
) -> AdoptionReport:
    """Turn the last checkpoint of every session dead for at least ``grace`` seconds (storage
    time) into an incomplete snapshot in ``cert``'s chain (chain head kept in ``state_dir``),
    recording whose run it was, then remove the session's lease objects. ``cert`` must allow
    pruning (checked by the caller, as for the prune that follows)."""
    report = AdoptionReport(dry_run=dry_run)
    log = RunLog()
    lease = Lease(repo, put.client_key, cert.client, cert.name, "prune", chain_head(repo, cert, state_dir)[0])
    try:
        lease.write()  # in the try: a signal right after it still releases the lease
        note_running(state_dir, lease.session)  # a claim this prune leaves when killed is known dead here at once
        now = lease.storage_time()
        seen = [s for s in sessions(repo) if s.session != lease.session]
        done: dict[tuple[str, str], tuple[str, int]] | None = None  # runs adopted before (read once)
        used: set[str] | None = None  # sessions a trusted snapshot holds (read once)
        for s in sorted(seen, key=lambda s: (s.started, s.session)):
            if s.checkpoint is None or s.alive(now):
                continue
            row = _row(repo, s)
            dead_for = now - (s.refreshed + s.expires_after)
            why = _not_adoptable(repo, put, s, row, dead_for, grace, dry_run)
            if why is not None:
                row.update(why=why[0], reason=why[1])
                report.kept.append(row)
                if why[0] == UNUSABLE and not dry_run:
                    _remove(repo, s)
                continue
            if dry_run:
                report.adopted.append({**row, "snapshot": "", "seq": 0})
                continue
            if done is None:
                done, used = _already_adopted(repo), used_sessions(repo)
            if (s.cert, s.session) in done:  # a prune killed after writing the snapshot: the lease is left
                _remove(repo, s)
                name, seq = done[(s.cert, s.session)]
                report.adopted.append({**row, "snapshot": name, "seq": seq})
                continue
            assert used is not None
            if s.session in used:  # its client's own run made it a snapshot, or a lease put back
                row.update(why=UNUSABLE, reason="a snapshot already holds this run; its lease is removed")
                report.kept.append(row)
                _remove(repo, s)
                continue
            adoption = Adoption(s.cert, row["client"], s.session)
            try:
                committed = checkpoint_snapshot(
                    repo, put, cert, s.session, s.checkpoint, state_dir, log, adoption, lease=lease
                )
            except StorageError:
                raise
            except (BunkerError, encoding.FormatError, KeyError, TypeError, ValueError) as exc:
                row.update(why=UNUSABLE, reason=_unusable(exc, False))
                report.kept.append(row)
                _remove(repo, s)
                continue
            # the snapshot first, then the lease: a prune marking meanwhile sees one or the other
            # (on storage whose listings lag, the lease stays until the snapshot is listed: the
            # next prune finds it adopted and removes it)
            if wait_until_listed(repo, [committed.name]):
                _remove(repo, s)
            report.adopted.append({**row, "snapshot": committed.name, "seq": committed.seq})
            lease.refresh_if_due()
    finally:
        with releasing(state_dir, lease.session):
            lease.release()
    report.events = [{"level": e.level, "code": e.code, "message": e.message} for e in log.events]
    return report


def _row(repo: Repository, s: Session) -> dict[str, Any]:
    try:
        client = repo.certificate(s.cert).client  # sessions() verified the lease with it
    except (CorruptObject, ObjectMissing):
        client = s.client
    cp_time = s.checkpoint.get("time") if s.checkpoint is not None else None
    return {
        "session": s.session,
        "client": client,
        "cert": s.cert,
        "lease": s.names[-1],
        "time": float(cp_time) if isinstance(cp_time, (int, float)) else s.refreshed,
    }


def _not_adoptable(
    repo: Repository,
    put: PutKey,
    s: Session,
    row: dict[str, Any],
    dead_for: float,
    grace: float,
    dry_run: bool,
) -> tuple[str, str] | None:
    """(why, reason) when the checkpoint of dead session ``s`` is not adopted by this prune."""
    if dead_for < grace:
        return WAITING, (
            f"its run died {_hours(max(dead_for, 0.0))} ago (its lease expired); kept for its client's next run, "
            f"which adopts it into its own chain. If the client does not run again, a prune adopts it once the run "
            f"has been dead for the grace period ({_hours(grace)}), in {_hours(grace - dead_for)}"
        )
    try:
        domain = repo.certificate(s.cert).domain
    except (CorruptObject, ObjectMissing) as exc:
        return UNUSABLE, _unusable(exc, dry_run)
    if domain != put.secrets.domain_id:
        return OTHER_DOMAIN, (
            f"it belongs to dedup domain {domain[:16]}…, whose chunk sets this put key cannot read; it stays, and "
            "its packs with it. To adopt it, run `bunker prune` with a prune-capable put key of that domain "
            "(`bunker key new-client NAME --prune --domain DOMAIN` on the machine with the master key)"
        )
    head = repo.client_head(s.cert)
    stale = stale_checkpoint(s.base, ChainBase(head.snap.env.seq, head.name) if head else ChainBase(0, ""))
    if stale:
        return UNUSABLE, f"{stale}; its lease {'would be' if dry_run else 'is'} removed"
    try:
        cp = s.checkpoint
        assert cp is not None
        refs.read_set(str(cp["packset"]), repo.get_object)
        refs.read_set(str(cp["chunkset"]), repo.get_object, put.secrets)
    except StorageError:
        raise
    except (BunkerError, encoding.FormatError, KeyError, TypeError, ValueError) as exc:
        return UNUSABLE, _unusable(exc, dry_run)
    return None


def _unusable(exc: Exception, dry_run: bool) -> str:
    msg = exc.message if isinstance(exc, BunkerError) else str(exc)
    return (
        f"it cannot be turned into a snapshot ({msg}), so what that run stored cannot be restored; its lease "
        f"{'would be' if dry_run else 'is'} removed and the packs only it named are condemned like other garbage. "
        "Run `bunker check` to see whether other objects are damaged"
    )


def _already_adopted(repo: Repository) -> dict[tuple[str, str], tuple[str, int]]:
    """(certificate, session) -> (snapshot, seq) of every run a prune already adopted (a prune
    killed between writing the snapshot and removing the lease leaves both). Only honoured
    claims count: a backup-only key must not make prune drop a checkpoint by claiming it."""
    out = {}
    for rec in repo.snapshots():
        a = rec.snap.env.adopted
        if a is not None and rec.trusted and not adoption_problem(repo, rec):
            out[(a.cert, a.session)] = (rec.name, rec.snap.env.seq)
    return out


def _remove(repo: Repository, s: Session) -> None:
    """Remove a session's lease objects, newest first: the newest carries the checkpoint, so an
    interrupted removal leaves at most checkpoint-less objects (a prune clears those)."""
    for n in reversed(s.names):
        with contextlib.suppress(BunkerError, OSError):
            repo.backend.delete(n)
