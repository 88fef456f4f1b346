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

A backup killed on a node leaves its lease in the node's store, out of reach here; the node sends a
checkpoint root up, which keeps the checkpoint's packs but is never adopted here, since the
client's next run through the node adopts the checkpoint. Once the node gave the session up (its
lease older than the node's ``abandon_after``, no client run there adopted it: node/abandon.py) it
sends a root marked ``abandoned`` (repo/checkpoint_roots.py), and a prune adopts that checkpoint
here the same way, once every object it names has arrived (docs/hierarchy.md, "Garbage collection
across the hierarchy").

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
from bunker.repo.checkpoint_roots import checkpoint_roots
from bunker.repo.leases import Lease, Session, sessions, wait_until_listed
from bunker.repo.moves import PackMoves
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
    # session, client, cert, lease, time, node, roots, snapshot, seq (node: the node that gave it up, or "")
    adopted: list[dict[str, Any]] = field(default_factory=list)
    # session, client, cert, lease, time, node, roots, why, reason
    kept: list[dict[str, Any]] = field(default_factory=list)
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
            origin = f", given up by node {a['node']!r}," if a.get("node") else ""
            out.append(
                f"{verb} the last checkpoint ({_when(a['time'])}) of a dead run of client {a['client']!r}{origin} "
                f"{what} "
                f"in this pruner's chain, listed under {a['client']!r}; it restores what that run had stored"
            )
        for k in self.kept:
            where = f" on node {k['node']!r}" if k.get("node") else ""
            out.append(f"  checkpoint of client {k['client']!r} ({k['lease']}{where}): {k['reason']}")
        for e in self.events:
            out.append(f"  {e['level']}: {e['message']}")
        return out


def adopt_abandoned_checkpoints(
    repo: Repository, put: PutKey, cert: Certificate, state_dir: str, grace: float, *, dry_run: bool = False
) -> AdoptionReport:
    """Turn the last checkpoint of every session dead for at least ``grace`` seconds (storage
    time), and of every session a node gave up (an abandoned checkpoint root), into an incomplete
    snapshot in ``cert``'s chain (chain head kept in ``state_dir``), recording whose run it was,
    then remove the session's lease objects (a root goes once an envelope names the session:
    repo/gc.py). ``cert`` must allow pruning (checked by the caller, as for the prune that
    follows)."""
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
        candidates = [
            _Candidate(s, now - (s.refreshed + s.expires_after))
            for s in sorted(seen, key=lambda s: (s.started, s.session))
            if s.checkpoint is not None and not s.alive(now)
        ]
        given_up = _given_up(repo, {s.session for s in seen})
        if given_up:
            done, used = _already_adopted(repo), used_sessions(repo)
            # a session an envelope names already: its roots are spent, and the prune removes them
            candidates += [c for c in given_up if c.s.session not in used and (c.s.cert, c.s.session) not in done]
        for c in candidates:
            s = c.s
            row = _row(repo, c)
            why = _not_arrived(repo, put, c) if c.roots else None
            if why is None:
                why = _not_adoptable(repo, put, s, row, c.dead_for, grace, dry_run)
            if why is not None:
                row.update(why=why[0], reason=why[1])
                report.kept.append(row)
                if why[0] == UNUSABLE and not dry_run:
                    _remove(repo, c)
                continue
            if dry_run:
                report.adopted.append({**row, "snapshot": "", "seq": 0})
                continue
            if done is None or used is None:
                done, used = _already_adopted(repo), used_sessions(repo)
            if (s.cert, s.session) in done:  # a prune killed after writing the snapshot: the lease is left
                _remove(repo, c)
                name, seq = done[(s.cert, s.session)]
                report.adopted.append({**row, "snapshot": name, "seq": seq})
                continue
            if s.session in used:  # its client's own run made it a snapshot, or a lease put back
                row.update(why=UNUSABLE, reason="a snapshot already holds this run; its lease is removed")
                report.kept.append(row)
                _remove(repo, c)
                continue
            adoption = Adoption(s.cert, row["client"], s.session)
            assert s.checkpoint is not None
            try:
                committed = checkpoint_snapshot(
                    repo, put, cert, s.session, s.checkpoint, state_dir, log, adoption, lease=lease
                )
            except StorageError:
                raise
            except (BunkerError, encoding.FormatError, KeyError, TypeError, ValueError) as exc:
                row.update(why=UNUSABLE, reason=_unusable(exc, False))
                report.kept.append(row)
                _remove(repo, c)
                continue
            # the snapshot first, then the lease: a prune marking meanwhile sees one or the other
            # (on storage whose listings lag, the lease stays until the snapshot is listed: the
            # next prune finds it adopted and removes it)
            if wait_until_listed(repo, [committed.name]):
                _remove(repo, c, spent=True)
            used.add(s.session)
            report.adopted.append({**row, "snapshot": committed.name, "seq": committed.seq})
            lease.refresh_if_due()
    finally:
        with releasing(state_dir, lease.session):
            lease.release()
    report.events = [{"level": e.level, "code": e.code, "message": e.message} for e in log.events]
    return report


@dataclass(frozen=True)
class _Candidate:
    """A dead session's checkpoint: from its lease here, or from checkpoint roots a node sent up
    (``roots``: every valid one of the session, abandoned or not; ``node``: the node that gave it
    up, by name)."""

    s: Session
    dead_for: float  # seconds since its lease expired (a session a node gave up: waited enough)
    node: str = ""
    roots: tuple[str, ...] = ()


def _given_up(repo: Repository, here: set[str]) -> list[_Candidate]:
    """A candidate for every session that a node gave up: a valid checkpoint root with
    ``abandoned`` (signed by a node the repository certifies; repo/checkpoint_roots.py), one per
    session, in the order the checkpoints were made. A plain root is never adopted here."""
    roots = [r for r in checkpoint_roots(repo) if r.session not in here]
    out: list[_Candidate] = []
    for r in roots:
        if not r.abandoned or any(c.s.session == r.session for c in out):
            continue
        cp_time = r.checkpoint.get("time")
        t = float(cp_time) if isinstance(cp_time, (int, float)) else 0.0
        # the checkpoint's lease carried as a dead session (started, refreshed: the checkpoint's time)
        s = Session(r.session, t, t, 0.0, "backup", "", (), r.cert, r.checkpoint, r.counter, r.base)
        same = tuple(x.name for x in roots if x.session == r.session and x.cert == r.cert)
        out.append(_Candidate(s, float("inf"), r.node_name, same))
    return sorted(out, key=lambda c: (c.s.started, c.s.session))


def _row(repo: Repository, c: _Candidate) -> dict[str, Any]:
    s = c.s
    try:
        client = repo.certificate(s.cert).client  # sessions() verified the lease with it
    except (CorruptObject, ObjectMissing):
        client = s.client
    cp_time = s.checkpoint.get("time") if s.checkpoint is not None else None
    return {
        "session": s.session,
        "client": client,
        "cert": s.cert,
        "lease": s.names[-1] if s.names else f"sessions/{s.session}.{s.counter}",
        "time": float(cp_time) if isinstance(cp_time, (int, float)) else s.refreshed,
        "node": c.node,  # the node that gave it up ("" for a lease in this repository's sessions/)
        "roots": list(c.roots),
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


def _not_arrived(repo: Repository, put: PutKey, c: _Candidate) -> tuple[str, str] | None:
    """(WAITING, reason) while a checkpoint a node gave up names reference objects or packs that
    have not reached this repository yet (they travel up like any data: a snapshot is never
    published with holes); None once all are here."""
    assert c.s.checkpoint is not None
    cp = c.s.checkpoint
    try:
        packs = refs.read_set(str(cp["packset"]), repo.get_object)
        refs.read_set(str(cp["chunkset"]), repo.get_object, put.secrets)
    except ObjectMissing as exc:
        return WAITING, _in_transit(c, f"its reference object {exc.object_name}")
    except (BunkerError, encoding.FormatError, KeyError, TypeError, ValueError):
        return None  # not a matter of waiting: _not_adoptable says what it is
    existing = {i.name.split("/", 1)[1] for i in repo.backend.list("packs/")}
    lacking = [p for p in packs if p not in existing]
    if lacking:
        moves = PackMoves.load(repo)
        lacking = [p for p in lacking if not moves.covered(p, existing)]
    if lacking:
        return WAITING, _in_transit(c, f"{len(lacking)} of the {len(packs)} packs it names")
    return None


def _in_transit(c: _Candidate, what: str) -> str:
    return (
        f"node {c.node!r} gave it up (its client did not adopt it there), but {what} has not reached this repository "
        f"yet; it is kept, and the first prune after the data arrived adopts it (run `bunker node forward` on "
        f"{c.node!r} and on the nodes between it and here)"
    )


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


def _remove(repo: Repository, c: _Candidate, *, spent: bool = False) -> None:
    """Remove a session's lease objects, newest first: the newest carries the checkpoint, so an
    interrupted removal leaves at most checkpoint-less objects (a prune clears those). The
    checkpoint roots of a session a node gave up go too when it cannot be adopted (nobody else
    will adopt it); once it is adopted (``spent``) the prune that follows removes them, as it
    removes every root whose session an envelope names (repo/gc.py)."""
    for n in reversed(c.s.names):
        with contextlib.suppress(BunkerError, OSError):
            repo.backend.delete(n)
    if not spent:
        for n in c.roots:
            with contextlib.suppress(BunkerError, OSError):
                repo.backend.delete(n)
