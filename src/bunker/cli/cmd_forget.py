"""forget: apply a retention policy by writing signed retirement records. No data is deleted here:
a retired snapshot keeps its envelope and log, and `bunker prune` frees the data only it needed."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import click

from bunker import dirs, encoding
from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.crypto.keyfile import MasterKey
from bunker.crypto.sign import SigningKey
from bunker.errors import BunkerError, ExitCode, KeyRequired
from bunker.repo import retention
from bunker.repo.certs import parse_certificate
from bunker.repo.records import make_retirement
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.selection import body_of, owner, trusted_times
from bunker.runlog import display_path

RULE_OPTIONS = (
    "--keep-last N, --keep-hourly N, --keep-daily N, --keep-weekly N, --keep-monthly N, --keep-yearly N, "
    "--keep-within DURATION"
)


@dataclass(frozen=True)
class Signer:
    """Who signs the retirement records: the master key (cert ``""``) or a prune-capable client."""

    key: SigningKey
    cert: str
    who: str


@dataclass
class Group:
    client: str
    paths: tuple[str, ...] | None  # None: grouped by client only (paths are sealed)
    records: list[SnapshotRecord] = field(default_factory=list)


def _fmt_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(retention.clamp_time(t)).strftime("%Y-%m-%d %H:%M:%S")


def _policy(kwargs: dict[str, Any]) -> retention.Policy:
    within_text = kwargs.pop("keep_within")
    counts = {rule: kwargs.pop(f"keep_{rule}") for rule in retention.RULES}
    try:
        within = retention.parse_duration(within_text) if within_text is not None else None
    except ValueError as exc:
        raise BunkerError(str(exc), "e.g. --keep-within 2d", exit_code=ExitCode.USAGE) from None
    policy = retention.Policy(within=within, **counts)
    if policy.empty():
        raise BunkerError(
            "no retention rule given: forget needs at least one rule, it never forgets every snapshot",
            f"give one or more of {RULE_OPTIONS} (add --dry-run to see what they would keep)",
            exit_code=ExitCode.USAGE,
        )
    return policy


def _refusal(client: str, repo_id: str) -> KeyRequired:
    local = dirs.master_key_path(repo_id) if context.master_on_client(repo_id) else ""
    return KeyRequired(
        f"the put key of client {client!r} may not forget snapshots: its certificate lacks the prune capability. "
        "Nothing was forgotten; every snapshot stays",
        "on the machine that holds the master key, make a put key that may forget with "
        "`bunker key new-client NAME --prune --out FILE` and pass it with --put-key FILE, or run this command with "
        "--master-key FILE" + (f" (the master key is still on this machine: --master-key {local})" if local else ""),
    )


def _signer(
    opts: context.Options, repo: Repository, master: MasterKey | None, dry_run: bool
) -> tuple[Signer | None, str]:
    """The signer of the records, or (None, why not) in a dry run, which needs no key at all."""
    if master is not None:
        return Signer(master.signing, "", "the master key"), ""
    path = opts.put_key_file(repo.repo_id)
    if not path or not os.path.exists(path):
        if dry_run:
            return None, "there is no key here to sign retirement records"
        raise KeyRequired(
            f"forgetting snapshots needs a put key with the prune capability or the master key, and there is neither "
            f"here (looked for {path}). Nothing was forgotten",
            "pass --master-key FILE, or --put-key FILE with a put key made by "
            "`bunker key new-client NAME --prune --out FILE`",
        )
    put = context.load_put(opts, repo)
    if dry_run:
        # a dry run writes nothing, not even this client's certificate (check_put_key publishes it)
        try:
            cert = parse_certificate(put.certificate, repo.config.master_verify, repo.repo_id)
        except encoding.FormatError as exc:
            return None, f"the put key's certificate is not valid here ({exc})"
    else:
        cert = repo.check_put_key(put)
    if "prune" not in cert.capabilities:
        if dry_run:
            refusal = _refusal(cert.client, repo.repo_id)
            return None, f"{refusal.message.split('. ')[0]}; {refusal.hint}"
        raise _refusal(cert.client, repo.repo_id)
    return Signer(put.client_key, cert.name, f"client {cert.client!r} (prune)"), ""


def _groups(
    repo: Repository, records: list[SnapshotRecord], master: MasterKey | None, skipped: list[dict[str, str]]
) -> list[Group]:
    """Groups by client (a snapshot prune adopted from a dead run: the client whose run it was) and,
    with the master key, path set."""
    groups: dict[tuple[str, tuple[str, ...] | None], Group] = {}
    for rec in records:
        paths: tuple[str, ...] | None = None
        if master is not None:
            body = body_of(rec, master)
            raw = body.get("paths") if body is not None else None
            # any put key can seal a body: its path list is checked like every other input
            if not (isinstance(raw, list) and all(isinstance(p, (str, bytes)) for p in raw)):
                skipped.append(
                    {
                        "id": rec.name.split("/", 1)[1],
                        "client": owner(repo, rec),
                        "why": "its body does not open with the master key or names no valid paths, so its path set "
                        "is unknown: kept (run `bunker check`)",
                    }
                )
                continue
            paths = tuple(sorted(display_path(p) for p in raw))
        key = (owner(repo, rec), paths)
        groups.setdefault(key, Group(*key)).records.append(rec)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1] or ()))]


@cli.command()
@common
@click.option("--keep-last", type=click.IntRange(min=0), default=0, metavar="N", help="Keep the N newest snapshots.")
@click.option(
    "--keep-hourly",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Keep the newest snapshot of each of the last N hours that have one.",
)
@click.option("--keep-daily", type=click.IntRange(min=0), default=0, metavar="N", help="The same per day.")
@click.option("--keep-weekly", type=click.IntRange(min=0), default=0, metavar="N", help="The same per ISO week.")
@click.option("--keep-monthly", type=click.IntRange(min=0), default=0, metavar="N", help="The same per month.")
@click.option("--keep-yearly", type=click.IntRange(min=0), default=0, metavar="N", help="The same per year.")
@click.option(
    "--keep-within",
    metavar="DURATION",
    help="Keep every snapshot less than DURATION older than the newest of its group (2d, 12h, 1w, 3m, 1y, 1y6m).",
)
@click.option("--client", help="Only this client's snapshots.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be kept and forgotten, and why; change nothing.")
@handles_errors
def forget(**kwargs: Any) -> None:
    """Forget snapshots by a retention policy (per client and path set): each forgotten snapshot gets a
    signed retirement record and is hidden from `snapshots`. Its data stays until `bunker prune`."""
    client, dry_run = kwargs.pop("client"), kwargs.pop("dry_run")
    policy = _policy(kwargs)
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    master = None
    # like `snapshots`: the passphrase is asked only when the master key was named on purpose
    if opts.master_key or os.environ.get("BUNKER_MASTER_KEY"):
        master = context.load_master(opts, repo, "grouping by path set and signing retirement records")
    signer, cannot_sign = _signer(opts, repo, master, dry_run)

    records = repo.snapshots()
    retired = repo.retired_snapshots()
    times = trusted_times(records)
    skipped: list[dict[str, str]] = []
    candidates = []
    for rec in records:
        if (client and owner(repo, rec) != client) or rec.name in retired:
            continue
        if not rec.trusted:
            skipped.append(
                {
                    "id": rec.name.split("/", 1)[1],
                    "client": rec.snap.env.client,
                    "why": f"not trusted ({rec.problem}): it counts for no rule and is not retired",
                }
            )
            continue
        candidates.append(rec)
    groups = _groups(repo, candidates, master, skipped)

    doc_groups: list[dict[str, Any]] = []
    forgotten: list[SnapshotRecord] = []
    kept = 0
    for g in groups:
        by_name = {r.name: r for r in g.records}
        items = [retention.Item(r.name, times[r.name], r.snap.env.seq, r.snap.env.complete) for r in g.records]
        rows = []
        for d in retention.apply_policy(items, policy):
            rec = by_name[d.item.key]
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
            if d.keep:
                kept += 1
            else:
                forgotten.append(rec)
        paths = list(g.paths) if g.paths is not None else None
        doc_groups.append({"client": g.client, "paths": paths, "snapshots": rows})

    written: list[str] = []
    if not dry_run and forgotten:
        assert signer is not None  # _signer raised otherwise
        reason = f"bunker forget {policy.describe()}"
        for rec in forgotten:
            written.append(repo.put_object("retired", make_retirement(rec.name, reason, signer.key, signer.cert)))

    out.document(
        {
            "repository": repo.backend.url,
            "id": repo.repo_id,
            "dry_run": dry_run,
            "policy": policy.describe(),
            "grouping": "client+paths" if master is not None else "client",
            "signer": signer.who if signer else None,
            "groups": doc_groups,
            "skipped": skipped,
            "kept": kept,
            "forgotten": len(forgotten),
            "retirement_records": written,
        }
    )
    _print(out, policy, master is not None, doc_groups, skipped)
    total = kept + len(forgotten)
    if not total:
        out.line("no snapshots to consider" + (f" for client {client!r}" if client else ""))
    elif dry_run:
        out.line(
            f"dry run: {len(forgotten)} of {total} snapshot(s) would be forgotten; nothing was written"
            + (f". A real run would be refused: {cannot_sign}" if cannot_sign and forgotten else "")
        )
    elif forgotten:
        out.line(
            f"forgot {len(forgotten)} of {total} snapshot(s): {len(written)} retirement record(s) signed by "
            f"{signer.who if signer else '?'}. No data was deleted: `bunker prune` frees the space only they needed; "
            "until then they can still be restored by id (`bunker snapshots --all` lists them)"
        )
    else:
        out.line(f"all {total} snapshot(s) are kept by the policy; nothing to forget")


def _print(
    out: Any, policy: retention.Policy, by_paths: bool, groups: list[dict[str, Any]], skipped: list[dict[str, str]]
) -> None:
    tz = datetime.datetime.now().astimezone().tzname()
    out.line(f"policy: {policy.describe()} (periods in local time, {tz})")
    if not by_paths:
        out.line(
            "grouped by client only: the path sets are sealed and only the master key opens them "
            "(pass --master-key FILE to group by client and path set)"
        )
    for g in groups:
        paths = " ".join(g["paths"]) if g["paths"] is not None else "(any paths)"
        out.line("")
        out.line(f"client {g['client']}, paths {paths}")
        out.line(f"  {'id':12}  {'time':19}  {'seq':>5}  {'level':5}  {'action':6}  why")
        for r in g["snapshots"]:
            why = ", ".join(r["reasons"])
            signed = _fmt_time(r["signed_time"])
            if r["time"] <= r["signed_time"] - 1:
                why += f"; its signed time {signed} is later than the storage stored it: not used"
            elif r["time"] >= r["signed_time"] + 1:
                why += f"; its signed time {signed} predates an earlier snapshot of its chain: not used"
            out.line(
                f"  {r['id'][:12]}  {_fmt_time(r['time'])}  {r['seq']:>5}  {r['level']:5}  "
                f"{'keep' if r['keep'] else 'forget':6}  {why}".rstrip()
            )
    for s in skipped:
        out.line(f"skipped {s['id'][:12]} of client {s['client']}: {s['why']}")
