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
from bunker.errors import BunkerError, ExitCode, KeyRequired
from bunker.repo import retention
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.snapshot import open_body


@dataclass
class Filters:
    client: str | None = None
    host: str | None = None
    tags: tuple[str, ...] = ()
    path: str | None = None
    host_certs: HostSelection | None = None  # resolve_host

    @property
    def sealed(self) -> bool:
        return bool(self.host or self.tags or self.path)


@dataclass(frozen=True)
class HostSelection:
    """Whose snapshots ``--host`` selects (resolve_host)."""

    bound: dict[str, str]  # certificate -> client: bound to the host by the master key (all their snapshots)
    claimants: frozenset[str]  # when none is bound: the one unbound client whose bodies claim it
    rivals: dict[str, str]  # certificate -> client: unbound clients whose claims a binding overrides


def resolve_host(repo: Repository, records: Iterable[SnapshotRecord], host: str, master: MasterKey) -> HostSelection:
    """Whose snapshots ``--host host`` selects (docs/security.md, hosts): the certificates the
    master key bound to ``host``, all their snapshots; when none is, the one unbound client
    whose snapshot bodies claim it, those snapshots. Several unbound claimants are refused and
    listed, and claims a binding overrides are listed: a host is never guessed."""
    certs = list(repo.certificates())
    bound = {c.name: c.client for c in certs if c.open_host(master.data_private) == host}
    binds = {c.name for c in certs if c.host is not None}
    claims: dict[str, str] = {}
    for rec in records:
        cert = rec.snap.env.original_cert
        if not rec.trusted or cert in binds or cert in claims:
            continue
        body = body_of(rec, master)
        if body is not None and body.get("host") == host:
            claims[cert] = owner(repo, rec)
    if bound:
        return HostSelection(bound, frozenset(), claims)
    if len(claims) > 1:
        who = ", ".join(f"{client!r} ({cert.split('/', 1)[1][:12]})" for cert, client in sorted(claims.items()))
        raise BunkerError(
            f"host {host!r} is claimed by several clients, and no certificate binds it: {who}",
            "choose one with --client NAME; to bind a host for good, make its put key with `bunker key new-client "
            "NAME --host HOST` on the machine with the master key",
            exit_code=ExitCode.USAGE,
        )
    return HostSelection({}, frozenset(claims), {})


def body_of(rec: SnapshotRecord, master: MasterKey) -> dict[str, Any] | None:
    try:
        return open_body(rec.snap, master.data_private)
    except encoding.FormatError:
        return None


def adoption_problem(repo: Repository, rec: SnapshotRecord) -> str:
    """Why a snapshot's ``adopted`` claim is not honoured ("" when it is, or when there is none).
    A claim is honoured exactly when the snapshot is trusted (Repository.verify_snapshot_signature:
    a prune-capable signer of the same dedup domain, and a certificate of the named client)."""
    if rec.snap.env.adopted is None or rec.trusted:
        return ""
    return rec.problem


def owner(repo: Repository, rec: SnapshotRecord) -> str:
    """The client a snapshot is listed and retained under: the one whose run it holds when prune
    adopted it (and the claim is honoured), else the client that signed it."""
    a = rec.snap.env.adopted
    if a is None or not rec.trusted:
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
    bound_host = False
    if f.host:
        if f.host_certs is None:
            raise ValueError("resolve the host's certificates first (resolve_host)")
        bound_host = rec.snap.env.original_cert in f.host_certs.bound
        if not bound_host and rec.snap.env.original_cert not in f.host_certs.claimants:
            return False
    if bound_host and not (f.tags or f.path):
        return True
    body = body_of(rec, master)
    if body is None:
        return False
    if f.host and not bound_host and body.get("host") != f.host:
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
    if f.host and f.host_certs is None and master is not None:
        mine = [r for r in records if not f.client or owner(repo, r) == f.client]
        f.host_certs = resolve_host(repo, mine, f.host, master)
    if spec == "latest":
        retired = repo.retired_snapshots()
        cands = [r for r in records if r.name not in retired and matches(r, f, master, repo)]
        if not cands:
            raise BunkerError(
                "no snapshot matches"
                + (" (forgotten snapshots are never `latest`)" if retired else "")
                + _host_note(f),
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


def _host_note(f: Filters) -> str:
    """What a host filter chose, when claims were overridden by a binding."""
    sel = f.host_certs
    if sel is None or not sel.bound or not sel.rivals:
        return ""
    bound = ", ".join(repr(c) for c in sorted(sel.bound.values()))
    rivals = ", ".join(repr(c) for c in sorted(sel.rivals.values()))
    return (
        f"; host {f.host!r} is bound to client {bound}, so the snapshots of clients that only claim it "
        f"({rivals}) are not chosen"
    )
