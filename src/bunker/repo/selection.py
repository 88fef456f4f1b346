"""Choosing snapshots: by id prefix or ``latest``, filtered by client (public), host, tag and
path (sealed: these filters need the master key).

``latest`` is the newest by *trusted* time (repo/retention.py: a signed time never counts later
than the storage stored the snapshot), never a retired snapshot. A chain head this machine
remembers (``KnownHead``: its client backed up from here) that the repository does not hold as a
trusted snapshot (missing, damaged, forged, or still waiting in this machine's spool) makes
``latest`` an error naming it: an older snapshot is never passed off as the newest. A snapshot that ``bunker prune``
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


@dataclass(frozen=True)
class KnownHead:
    """A chain head this machine remembers (it backed up as that client): certificate, sequence
    number and snapshot name; ``pending`` when the snapshot waits in this machine's spool."""

    cert: str
    seq: int
    name: str
    pending: bool = False
    spooled: tuple[str, int] | None = None  # written to the spool: the run it holds (backup/chain.py)


@dataclass
class Filters:
    client: str | None = None
    host: str | None = None
    tags: tuple[str, ...] = ()
    path: str | None = None
    host_certs: HostSelection | None = None  # resolve_host
    own_client: bool = False  # ``client`` is this machine's own, implied for `latest`

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


def select(
    repo: Repository, spec: str, f: Filters, master: MasterKey | None, known: Iterable[KnownHead] = ()
) -> SnapshotRecord:
    """One snapshot: ``latest`` (the newest trusted, not retired match by trusted time) or a unique
    id prefix (a retired snapshot too: its data may still be stored). ``known``: the chain heads
    this machine remembers; one of the clients ``latest`` chooses among that the repository does
    not hold as a trusted snapshot is an error naming it."""
    every = repo.snapshots()
    records = [r for r in every if r.trusted]
    if f.host and f.host_certs is None and master is not None:
        mine = [r for r in records if not f.client or owner(repo, r) == f.client]
        f.host_certs = resolve_host(repo, mine, f.host, master)
    if spec == "latest":
        for head in known:
            if _applies(repo, head, f):
                _require_head(repo, head, every)
        retired = repo.retired_snapshots()
        cands = [r for r in records if r.name not in retired and matches(r, f, master, repo)]
        if not cands and f.own_client:
            raise BunkerError(
                f"no snapshot of this machine's client {f.client!r} matches (on a machine that backs up, `latest` "
                "means its own client's)"
                + (" (forgotten snapshots are never `latest`)" if retired else ""),
                "name another client with --client NAME (`bunker snapshots` lists them), or a snapshot by its id"
                + (" (`bunker snapshots --all` lists forgotten ones too)" if retired else ""),
                exit_code=ExitCode.USAGE,
            )
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


def _applies(repo: Repository, head: KnownHead, f: Filters) -> bool:
    """Whether ``latest`` under ``f`` chooses among the snapshots of ``head``'s client."""
    if f.client:
        try:
            if repo.certificate(head.cert).client != f.client:
                return False
        except (BunkerError, encoding.FormatError):
            return False
    sel = f.host_certs
    return not (f.host and sel is not None and head.cert not in sel.bound and head.cert not in sel.claimants)


def _require_head(repo: Repository, head: KnownHead, every: list[SnapshotRecord]) -> None:
    """Raise unless the repository holds ``head`` as a trusted snapshot."""
    rec = next((r for r in every if r.name == head.name), None)
    if rec is not None and rec.trusted:
        return
    if any(r.trusted and r.snap.env.cert == head.cert and r.snap.env.seq > head.seq for r in every):
        return  # the chain went on past it (the same key on another machine): `check` judges the gap
    if head.spooled is not None and any(
        r.trusted and r.snap.env.cert == head.cert and (r.snap.env.session, r.snap.env.counter) == head.spooled
        for r in every
    ):
        return  # delivered from the spool under another name (signed again)
    try:
        who = f"client {repo.certificate(head.cert).client!r}"
    except (BunkerError, encoding.FormatError):
        who = f"the client of {head.cert}"
    older = "; to restore an older snapshot, name it by its id (`bunker snapshots` lists them)"
    if head.pending:
        raise BunkerError(
            f"{who}'s newest snapshot #{head.seq} ({head.name}) is not in the repository yet: it waits in this "
            "machine's local spool",
            "run `bunker forward` (it needs the repository to be reachable), then run this command again" + older,
            exit_code=ExitCode.INTEGRITY,
        )
    damaged = repo.damaged_snapshots().get(head.name)
    what = (
        f"is damaged ({damaged})"
        if damaged is not None
        else f"is not trusted ({rec.problem})"
        if rec is not None
        else "is missing from the repository: snapshots were deleted or the repository was rolled back"
    )
    raise BunkerError(
        f"{who}'s newest snapshot #{head.seq} ({head.name}), which this machine remembers, {what}; `latest` "
        "would be an older snapshot",
        "run `bunker check` to see what else is affected, and restore the snapshot from a mirror if you have one"
        + older,
        exit_code=ExitCode.INTEGRITY,
    )


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
