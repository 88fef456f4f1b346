"""Choosing snapshots: by id prefix or ``latest``, filtered by client (public), host, tag and
path (sealed: these filters need the master key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bunker import encoding
from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, ExitCode, KeyRequired
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


def matches(rec: SnapshotRecord, f: Filters, master: MasterKey | None) -> bool:
    if f.client and rec.snap.env.client != f.client:
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
    """One snapshot: ``latest`` (newest trusted match) or a unique id prefix."""
    records = [r for r in repo.snapshots() if r.trusted]
    if spec == "latest":
        cands = [r for r in records if matches(r, f, master)]
        if not cands:
            raise BunkerError("no snapshot matches", "list them with `bunker snapshots`", exit_code=ExitCode.USAGE)
        return max(cands, key=lambda r: (r.snap.env.time, r.snap.env.seq))
    spec = spec.removeprefix("snapshots/").lower()
    if len(spec) < 4:
        raise BunkerError(
            f"snapshot id {spec!r} is too short", "give at least 4 hex digits, or `latest`", exit_code=ExitCode.USAGE
        )
    cands = [r for r in records if r.name.split("/", 1)[1].startswith(spec) and matches(r, f, master)]
    if not cands:
        raise BunkerError(f"no snapshot {spec!r}", "list them with `bunker snapshots`", exit_code=ExitCode.USAGE)
    if len(cands) > 1:
        raise BunkerError(
            f"snapshot id {spec!r} is ambiguous ({len(cands)} match)", "give more hex digits", exit_code=ExitCode.USAGE
        )
    return cands[0]
