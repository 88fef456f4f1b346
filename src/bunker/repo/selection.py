"""Choosing snapshots: by id prefix or ``latest``, filtered by client (public), host, tag and
path (sealed: these filters need the master key).

``latest`` is the newest by *trusted* time (repo/retention.py: a signed time never counts later
than the storage stored the snapshot), never a retired snapshot. A snapshot that ``bunker prune``
adopted from a dead client's checkpoint (envelope field ``adopted``) belongs to that client here,
in listings and in retention, once ``owner`` has checked the claim."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bunker import encoding
from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, CorruptObject, ExitCode, KeyRequired, ObjectMissing
from bunker.repo import retention
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.snapshot import open_body


@dataclass
class Filters:
    client: str | None = None
    host: str | None = None
    tags: tuple[str, ...] = ()
    path: str | None = None

    @property
    def sealed(self) -> bool:
        return bool(self.host or self.tags or self.path)


def body_of(rec: SnapshotRecord, master: MasterKey) -> dict[str, Any] | None:
    try:
        return open_body(rec.snap, master.data_private)
    except encoding.FormatError:
        return None


def adoption_problem(repo: Repository, rec: SnapshotRecord) -> str:
    """Why a snapshot's ``adopted`` claim is not honoured ("" when it is, or when there is none).

    Only a prune-capable certificate adopts other clients' runs (a backup-only key must not add
    snapshots to another client's retention group), and the certificate the claim names must
    exist and carry the client name the claim gives."""
    a = rec.snap.env.adopted
    if a is None:
        return ""
    try:
        signer = repo.certificate(rec.snap.env.cert)
        original = repo.certificate(a.cert)
    except (CorruptObject, ObjectMissing) as exc:
        return f"the certificate its adoption names is not usable ({exc.message})"
    if "prune" not in signer.capabilities:
        return f"its signer {signer.client!r} has no prune capability, so it may not adopt another client's run"
    if original.client != a.client:
        return f"it names client {a.client!r}, but certificate {a.cert} belongs to {original.client!r}"
    return ""


def owner(repo: Repository, rec: SnapshotRecord) -> str:
    """The client a snapshot is listed and retained under: the one whose run it holds when prune
    adopted it (and the claim is honoured), else the client that signed it."""
    a = rec.snap.env.adopted
    if a is None or not rec.trusted or adoption_problem(repo, rec):
        return rec.snap.env.client
    return a.client


def trusted_times(records: Iterable[SnapshotRecord]) -> dict[str, float]:
    """The time retention trusts for every trusted snapshot (retention.chain_times: clamped to the
    storage's time, non-decreasing along each signed chain). An adopted snapshot carries the dead
    run's time, not a time of its signer's chain: it is clamped on its own."""
    return retention.chain_times(
        [
            retention.Stamp(
                r.name,
                r.name if r.snap.env.adopted is not None else r.snap.env.cert,
                r.snap.env.seq,
                r.snap.env.time,
                r.stored,
            )
            for r in records
            if r.trusted
        ]
    )


def matches(rec: SnapshotRecord, f: Filters, master: MasterKey | None, repo: Repository | None = None) -> bool:
    """``repo``: judge ``--client`` by ``owner`` (without it, by the signing client)."""
    if f.client and (owner(repo, rec) if repo is not None else rec.snap.env.client) != f.client:
        return False
    if not f.sealed:
        return True
    if master is None:
        raise KeyRequired(
            "filtering by --host, --tag or --path needs the master key (they are sealed)",
            "pass --master-key FILE, or filter by --client only",
        )
    body = body_of(rec, master)
    if body is None:
        return False
    if f.host and body.get("host") != f.host:
        return False
    if f.tags and not set(f.tags) <= set(body.get("tags", [])):
        return False
    return not (
        f.path and not any(p == f.path or p.startswith(f.path.rstrip("/") + "/") for p in body.get("paths", []))
    )


def select(repo: Repository, spec: str, f: Filters, master: MasterKey | None) -> SnapshotRecord:
    """One snapshot: ``latest`` (the newest trusted, not retired match by trusted time) or a unique
    id prefix (a retired snapshot too: its data may still be stored)."""
    records = [r for r in repo.snapshots() if r.trusted]
    if spec == "latest":
        retired = repo.retired_snapshots()
        cands = [r for r in records if r.name not in retired and matches(r, f, master, repo)]
        if not cands:
            raise BunkerError(
                "no snapshot matches" + (" (forgotten snapshots are never `latest`)" if retired else ""),
                "list them with `bunker snapshots --all`, and name one by its id",
                exit_code=ExitCode.USAGE,
            )
        times = trusted_times(records)
        return max(cands, key=lambda r: (times[r.name], r.snap.env.seq, r.name))
    spec = spec.removeprefix("snapshots/").lower()
    if len(spec) < 4:
        raise BunkerError(
            f"snapshot id {spec!r} is too short", "give at least 4 hex digits, or `latest`", exit_code=ExitCode.USAGE
        )
    cands = [r for r in records if r.name.split("/", 1)[1].startswith(spec) and matches(r, f, master, repo)]
    if not cands:
        raise BunkerError(f"no snapshot {spec!r}", "list them with `bunker snapshots`", exit_code=ExitCode.USAGE)
    if len(cands) > 1:
        raise BunkerError(
            f"snapshot id {spec!r} is ambiguous ({len(cands)} match)", "give more hex digits", exit_code=ExitCode.USAGE
        )
    return cands[0]
