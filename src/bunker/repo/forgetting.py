"""What `bunker forget` and `bunker unforget` decide, before anything is written.

A dry run and a real run compute one ``Plan`` from the same inputs, so they print the same
decisions and the same reasons; only writing the records differs.

Groups (docs/format.md section 13, ``path_set``): a policy applies to each client (the client
whose run it is, for an adopted snapshot) and path set on its own. With the master key the path
set is read from each sealed body and turned into its path-set id (``path_set_id`` under the S
of the snapshot's domain): the id a writer puts into its envelope, so old and new snapshots of
one path set fall into one group. With a put key (or none) the envelope's ``path_set`` is used;
envelopes without one (written before path-set ids) are grouped by client only, and the plan
counts them so the output can say so.

A snapshot whose retirement was withdrawn (``bunker unforget``) is *held*: a policy keeps it
whatever its rules say, so a nightly `forget` does not undo what the user brought back. Only
`bunker forget ID` retires it again.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.repo import refs, retention
from bunker.repo.index_cache import IndexCache
from bunker.repo.moves import PackMoves
from bunker.repo.records import Retirements
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.selection import body_of, owner, trusted_times
from bunker.repo.snapshot import path_set_id
from bunker.runlog import display_path

HELD = "unforgotten"  # the reason a held snapshot is kept
MIN_ID_DIGITS = 4


@dataclass
class Group:
    client: str
    path_set: str | None  # None: unknown (envelopes written before path-set ids, no master key)
    paths: tuple[str, ...] | None = None  # the sealed paths, when the master key opened them
    records: list[SnapshotRecord] = field(default_factory=list)


@dataclass
class Plan:
    """Every group with the policy's decision for each of its snapshots (newest first)."""

    by_paths: bool  # the master key opened the bodies
    groups: list[tuple[Group, list[retention.Decision]]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    by_client_only: dict[str, int] = field(default_factory=dict)  # client -> snapshots without a path-set id

    def forgotten(self) -> list[SnapshotRecord]:
        return [rec for g, ds in self.groups for rec, d in _pairs(g, ds) if not d.keep]

    def kept(self) -> int:
        return sum(1 for _, ds in self.groups for d in ds if d.keep)


def _pairs(g: Group, decisions: list[retention.Decision]) -> list[tuple[SnapshotRecord, retention.Decision]]:
    by_name = {r.name: r for r in g.records}
    return [(by_name[d.item.key], d) for d in decisions]


def sealed_paths(rec: SnapshotRecord, master: MasterKey) -> list[str | bytes] | None:
    """The paths sealed in a snapshot's body (None when it does not open or names none validly:
    any put key can seal a body, so its path list is checked like every other input)."""
    body = body_of(rec, master)
    raw = body.get("paths") if body is not None else None
    if isinstance(raw, list) and all(isinstance(p, (str, bytes)) for p in raw):
        return raw
    return None


def _groups(repo: Repository, records: list[SnapshotRecord], master: MasterKey | None, plan: Plan) -> list[Group]:
    groups: dict[tuple[str, str | None], Group] = {}
    secrets: dict[str, PutSecrets | None] = {}
    for rec in records:
        who, env = owner(repo, rec), rec.snap.env
        path_set: str | None = env.path_set or None
        paths: tuple[str, ...] | None = None
        if master is not None:
            raw = sealed_paths(rec, master)
            if env.domain not in secrets:
                try:
                    secrets[env.domain] = repo.domain_secrets(master, env.domain)
                except BunkerError:
                    secrets[env.domain] = None
            s = secrets[env.domain]
            if raw is None or s is None:
                plan.skipped.append(
                    {
                        "id": rec.name.split("/", 1)[1],
                        "client": who,
                        "why": "its body does not open with the master key or names no valid paths, so its path set "
                        "is unknown: kept (run `bunker check`)",
                    }
                )
                continue
            path_set = path_set_id(s, raw)
            paths = tuple(sorted(display_path(p) for p in set(raw)))
        elif path_set is None:
            plan.by_client_only[who] = plan.by_client_only.get(who, 0) + 1
        g = groups.setdefault((who, path_set), Group(who, path_set, paths))
        g.records.append(rec)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], groups[k].paths or (), k[1] or ""))]


def plan_policy(
    repo: Repository,
    policy: retention.Policy,
    client: str | None,
    master: MasterKey | None,
    retirements: Retirements,
    tz: datetime.tzinfo | None = None,
) -> Plan:
    """The decisions of ``policy`` for every trusted, not retired snapshot (of ``client``)."""
    plan = Plan(by_paths=master is not None)
    records = repo.snapshots()
    retired, held = retirements.retired(), retirements.unretired()
    times = trusted_times(records)
    candidates = []
    for rec in records:
        if (client and owner(repo, rec) != client) or rec.name in retired:
            continue
        if not rec.trusted:
            plan.skipped.append(
                {
                    "id": rec.name.split("/", 1)[1],
                    "client": rec.snap.env.client,
                    "why": f"not trusted ({rec.problem}): it counts for no rule and is not retired",
                }
            )
            continue
        candidates.append(rec)
    for g in _groups(repo, candidates, master, plan):
        items = [
            retention.Item(r.name, times[r.name], r.snap.env.seq, r.snap.env.complete, HELD if r.name in held else "")
            for r in g.records
        ]
        plan.groups.append((g, retention.apply_policy(items, policy, tz)))
    return plan


def group_rows(plan: Plan) -> list[dict[str, Any]]:
    """The plan as the JSON document's ``groups`` (and what the table is printed from)."""
    out = []
    for g, decisions in plan.groups:
        rows = []
        for rec, d in _pairs(g, decisions):
            e = rec.snap.env
            rows.append(
                {
                    "id": rec.name.split("/", 1)[1],
                    "seq": e.seq,
                    "time": d.item.time,
                    "signed_time": e.time,
                    "stored_time": rec.stored,
                    "level": e.level,
                    "complete": e.complete,
                    "keep": d.keep,
                    "reasons": d.reasons,
                }
            )
        out.append(
            {
                "client": g.client,
                "path_set": g.path_set,
                "paths": list(g.paths) if g.paths is not None else None,
                "snapshots": rows,
            }
        )
    return out


# ------------------------------------------------------------------------------- snapshots by id
def resolve_ids(records: list[SnapshotRecord], specs: list[str], nothing_done: str) -> list[SnapshotRecord]:
    """The snapshots that ``specs`` (id prefixes of at least 4 hex digits) name, each exactly one.
    Every spec that names none or several is reported at once, and then nothing is done."""
    problems = []
    out: list[SnapshotRecord] = []
    for spec in specs:
        s = spec.removeprefix("snapshots/").lower()
        if len(s) < MIN_ID_DIGITS or any(c not in "0123456789abcdef" for c in s):
            problems.append(f"{spec!r} is not a snapshot id (give at least {MIN_ID_DIGITS} hex digits)")
            continue
        cands = [r for r in records if r.name.split("/", 1)[1].startswith(s)]
        if not cands:
            problems.append(f"no snapshot id begins with {s!r}")
        elif len(cands) > 1:
            ids = ", ".join(r.name.split("/", 1)[1][:16] for r in cands[:5])
            problems.append(f"{s!r} is ambiguous: {len(cands)} snapshot ids begin with it ({ids})")
        elif cands[0] not in out:
            out.append(cands[0])
    if problems:
        raise BunkerError(
            "; ".join(problems) + f". {nothing_done}",
            "list the ids with `bunker snapshots --all` and give enough hex digits to name exactly one snapshot",
            exit_code=ExitCode.USAGE,
        )
    return out


def newest_of_path_set(repo: Repository, rec: SnapshotRecord, retired: set[str]) -> bool:
    """True when ``rec`` is the newest live trusted snapshot of its client and path set, as far
    as the envelopes tell (False when it has no path-set id)."""
    e = rec.snap.env
    if not e.path_set:
        return False
    records = repo.snapshots()
    times = trusted_times(records)
    who = owner(repo, rec)
    same = [
        r
        for r in records
        if r.trusted and r.name not in retired and r.snap.env.path_set == e.path_set and owner(repo, r) == who
    ]
    newest = max(same, key=lambda r: (times[r.name], r.snap.env.seq, r.name), default=None)
    return newest is not None and newest.name == rec.name


# ------------------------------------------------------------------------------- is the data there
def data_gone(repo: Repository, rec: SnapshotRecord, secrets: PutSecrets | None) -> str:
    """Why the data of snapshot ``rec`` is no longer all stored ("" when it is): packs of its pack
    set that prune deleted (and no repack covers), or, with the S of its domain, chunks of its
    chunk set that no pack of its resolved pack set holds (a repack copies only live blobs)."""
    env = rec.snap.env
    try:
        named = refs.read_set(env.packset, repo.get_object)
    except (BunkerError, encoding.FormatError) as exc:
        return f"its pack set {env.packset} cannot be read ({exc})"
    existing = {i.name.split("/", 1)[1] for i in repo.backend.list("packs/")}
    moves = PackMoves.load(repo)
    missing = [p for p in named if p not in existing and not moves.covered(p, existing)]
    if missing:
        return f"{len(missing)} of its {len(named)} packs were deleted by `bunker prune`"
    if secrets is None or secrets.domain_id != env.domain:
        return ""
    try:
        chunks = refs.read_set(env.chunkset, repo.get_object, secrets)
    except (CorruptObject, ObjectMissing, encoding.FormatError) as exc:
        return f"its chunk set {env.chunkset} cannot be read ({exc})"
    packs = moves.resolve(named) & existing
    index = IndexCache(repo, secrets, None, for_dedup=False, only_packs=packs, listed_packs=existing).load()
    _, lost = index.cover(chunks)
    if lost:
        return f"{lost} of its {len(chunks)} chunks are no longer stored (a repack by `bunker prune` left them behind)"
    return ""
