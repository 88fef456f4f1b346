"""forget: retire snapshots by a retention policy, or by id, by writing signed retirement records.
No data is deleted here: a retired snapshot keeps its envelope and log, and `bunker prune` frees
the data only it needed. The decisions come from repo/forgetting.py; a dry run prints exactly
what the real run prints, but for the last line."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import click

from bunker import dirs, encoding
from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import MasterKey
from bunker.crypto.sign import SigningKey
from bunker.errors import BunkerError, ExitCode, KeyRequired
from bunker.repo import record_witness, retention
from bunker.repo.certs import parse_certificate
from bunker.repo.forgetting import Plan, group_rows, newest_of_path_set, plan_policy, resolve_ids
from bunker.repo.policy_memory import policy_in_force
from bunker.repo.records import Retirements, make_retirement
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.selection import owner, trusted_times

RULE_OPTIONS = (
    "--keep-last N, --keep-hourly N, --keep-daily N, --keep-weekly N, --keep-monthly N, --keep-yearly N, "
    "--keep-within DURATION"
)


@dataclass(frozen=True)
class Signer:
    """Who signs the records: the master key (cert ``""``) or a prune-capable client."""

    key: SigningKey
    cert: str
    who: str
    secrets: PutSecrets | None  # the put key's S (None for the master key: per domain)


def _fmt_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(retention.clamp_time(t)).strftime("%Y-%m-%d %H:%M:%S")


def _policy(kwargs: dict[str, Any], ids: tuple[str, ...], use_policy: bool) -> retention.Policy | None:
    """The rules given on the command line (None with ids, or with --policy)."""
    within_text = kwargs.pop("keep_within")
    counts = {rule: kwargs.pop(f"keep_{rule}") for rule in retention.RULES}
    if use_policy:
        if ids or within_text is not None or any(counts.values()):
            raise BunkerError(
                "--policy takes neither snapshot ids nor retention rules: the policy gives each client's rules",
                "run `bunker forget --policy` alone, or give rules here without --policy",
                exit_code=ExitCode.USAGE,
            )
        return None
    if ids:
        if within_text is not None or any(counts.values()):
            raise BunkerError(
                "forget takes either snapshot ids or retention rules, not both",
                "run `bunker forget ID...` to forget those snapshots, and the policy in a separate run",
                exit_code=ExitCode.USAGE,
            )
        return None
    try:
        within = retention.parse_duration(within_text) if within_text is not None else None
    except ValueError as exc:
        raise BunkerError(str(exc), "e.g. --keep-within 2d", exit_code=ExitCode.USAGE) from None
    policy = retention.Policy(within=within, **counts)
    if policy.empty():
        raise BunkerError(
            "no retention rule given: forget needs at least one rule, it never forgets every snapshot",
            f"give one or more of {RULE_OPTIONS} (add --dry-run to see what they would keep), or name the "
            "snapshots to forget: `bunker forget ID...`",
            exit_code=ExitCode.USAGE,
        )
    return policy


def _refusal(client: str, repo_id: str, what: str) -> KeyRequired:
    local = dirs.master_key_path(repo_id) if context.master_on_client(repo_id) else ""
    return KeyRequired(
        f"the put key of client {client!r} may not {what}: its certificate lacks the prune capability. "
        "Nothing was changed",
        "on the machine that holds the master key, make a put key that may forget with "
        "`bunker key new-client NAME --prune --out FILE` and pass it with --put-key FILE, or run this command with "
        "--master-key FILE" + (f" (the master key is still on this machine: --master-key {local})" if local else ""),
    )


def signer_for(
    opts: context.Options, repo: Repository, master: MasterKey | None, dry_run: bool, what: str
) -> tuple[Signer | None, str]:
    """The signer of the records, or (None, why not) in a dry run, which needs no key at all."""
    if master is not None:
        return Signer(master.signing, "", "the master key", None), ""
    path = opts.put_key_file(repo.repo_id)
    if not path or not os.path.exists(path):
        if dry_run:
            return None, "there is no key here to sign the records"
        raise KeyRequired(
            f"a put key with the prune capability or the master key is needed to {what}, and there is neither "
            f"here (looked for {path}). Nothing was changed",
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
        refusal = _refusal(cert.client, repo.repo_id, what)
        if dry_run:
            return None, f"{refusal.message.split('. ')[0]}; {refusal.hint}"
        raise refusal
    return Signer(put.client_key, cert.name, f"client {cert.client!r} (prune)", put.secrets), ""


def open_for_records(
    opts: context.Options, out: Any, dry_run: bool, what: str, purpose: str
) -> tuple[Repository, MasterKey | None, Signer | None, str]:
    """The repository, the master key (only when named on purpose: like `snapshots`, the
    passphrase is asked only then), the signer, and why a real run could not sign. Records this
    machine signed that the storage lost are counted as present, and put back by a real run."""
    repo = context.open_repository(opts)
    context.refuse_on_node(repo, what)
    master = None
    if opts.master_key or os.environ.get("BUNKER_MASTER_KEY"):
        master = context.load_master(opts, repo, purpose)
    signer, cannot_sign = signer_for(opts, repo, master, dry_run, what)
    witness_records(repo, out, dry_run)
    return repo, master, signer, cannot_sign


def witness_records(repo: Repository, out: Any, dry_run: bool) -> list[str]:
    """Records this machine signed that the repository no longer lists (record_witness.py)."""
    names = record_witness.restore_witnessed(repo, dry_run)
    if names:
        out.info(record_witness.warning(names, dry_run))
    return names


def remember(repo: Repository, name: str, data: bytes) -> None:
    record_witness.remember(repo.repo_id, name, data)


@cli.command()
@common
@click.argument("snapshot_ids", nargs=-1, metavar="[ID]...")
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
@click.option(
    "--policy",
    "use_policy",
    is_flag=True,
    help="Apply each client's retention rules from the repository's policy (`bunker policy set`) instead of rules "
    "given here.",
)
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be kept and forgotten, and why; change nothing.")
@handles_errors
def forget(**kwargs: Any) -> None:
    """Forget snapshots by a retention policy (per client and path set), or the snapshots named by
    ID (id prefixes): each forgotten snapshot gets a signed retirement record and is hidden from
    `snapshots`. Its data stays until `bunker prune`; `bunker unforget ID` brings it back until then.
    A policy never forgets the newest snapshot of a path set, nor one brought back by unforget."""
    ids, client, dry_run = kwargs.pop("snapshot_ids"), kwargs.pop("client"), kwargs.pop("dry_run")
    use_policy = kwargs.pop("use_policy")
    policy = _policy(kwargs, ids, use_policy)
    opts, out = make_options(kwargs)
    repo, master, signer, cannot_sign = open_for_records(
        opts, out, dry_run, "forget snapshots", "grouping by path set and signing retirement records"
    )
    retirements = repo.retirements()
    if policy is None and not use_policy:
        _forget_ids(repo, out, list(ids), client, signer, cannot_sign, retirements, dry_run)
        return
    # (client, rules, their plan): one set of rules given here, or each client's from the policy
    plans: list[tuple[str | None, retention.Policy, Plan]] = []
    without_rules: list[str] = []
    policy_doc: Any
    if policy is not None:
        plans.append((client, policy, plan_policy(repo, policy, client, master, retirements)))
        policy_doc = policy.describe()
    else:
        current, events = policy_in_force(repo)
        for level, _code, message in events:
            out.info(f"{level}: {message}")
        if current is None:
            raise BunkerError(
                "--policy: the repository holds no policy",
                "set one with `bunker policy set FILE` (it may give retention rules per client), or give the rules "
                f"here: {RULE_OPTIONS}",
                exit_code=ExitCode.USAGE,
            )
        clients = [client] if client else sorted({owner(repo, r) for r in repo.snapshots()})
        for c in clients:
            rules = current.retention_for(c)
            if rules is None:
                without_rules.append(c)
            else:
                plans.append((c, rules, plan_policy(repo, rules, c, master, retirements)))
        policy_doc = {
            "version": current.version,
            "name": current.name,
            "clients": {c: rules.describe() for c, rules, _ in plans},
            "without_rules": without_rules,
        }
    forgotten = [(rules, rec) for _, rules, plan in plans for rec in plan.forgotten()]
    written: list[str] = []
    if not dry_run and forgotten:
        assert signer is not None  # signer_for raised otherwise
        version = f"policy version {policy_doc['version']}: " if isinstance(policy_doc, dict) else ""
        for rules, rec in forgotten:
            data = make_retirement(rec.name, f"bunker forget {version}{rules.describe()}", signer.key, signer.cert)
            written.append(repo.put_object("retired", data))
            remember(repo, written[-1], data)
    groups = [row for _, _, plan in plans for row in group_rows(plan)]
    merged = Plan(by_paths=master is not None)
    for _, _, plan in plans:
        merged.groups += plan.groups
        merged.skipped += plan.skipped
        for who, n in plan.by_client_only.items():
            merged.by_client_only[who] = merged.by_client_only.get(who, 0) + n
    out.document(
        {
            "repository": repo.backend.url,
            "id": repo.repo_id,
            "dry_run": dry_run,
            "policy": policy_doc,
            "grouping": "client+paths" if merged.by_paths else "client+path-set",
            "grouped_by_client_only": merged.by_client_only,
            "signer": signer.who if signer else None,
            "groups": groups,
            "skipped": merged.skipped,
            "kept": merged.kept(),
            "forgotten": len(forgotten),
            "retirement_records": written,
        }
    )
    for c, rules, plan in plans:
        _print_plan(out, rules, plan, group_rows(plan), f" for client {c!r}" if use_policy else "")
    for c in without_rules:
        out.line(f"client {c!r}: the policy gives it no retention rules: nothing of it is forgotten")
    total = merged.kept() + len(forgotten)
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
            "until then `bunker unforget ID` brings one back (`bunker snapshots --all` lists them)"
        )
    else:
        out.line(f"all {total} snapshot(s) are kept by the policy; nothing to forget")


def _print_plan(out: Any, policy: retention.Policy, plan: Plan, groups: list[dict[str, Any]], who: str = "") -> None:
    tz = datetime.datetime.now().astimezone().tzname()
    out.line(f"policy{who}: {policy.describe()} (periods in local time, {tz})")
    if plan.by_paths:
        out.line("grouped by client and path set (the master key opened the paths)")
    else:
        out.line("grouped by client and path set (path-set ids; the paths themselves are sealed)")
        for who, n in sorted(plan.by_client_only.items()):
            out.line(
                f"{n} snapshot(s) of client {who} were written before path-set ids: they form one group of any "
                "paths (pass --master-key FILE to group them by the paths sealed in them)"
            )
    for g in groups:
        if g["paths"] is not None:
            paths = "paths " + " ".join(g["paths"])
        elif g["path_set"] is not None:
            paths = f"path set {g['path_set'][:12]}"
        else:
            paths = "any paths (no path-set id)"
        out.line("")
        out.line(f"client {g['client']}, {paths}")
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
    for s in plan.skipped:
        out.line(f"skipped {s['id'][:12]} of client {s['client']}: {s['why']}")


def _forget_ids(
    repo: Repository,
    out: Any,
    ids: list[str],
    client: str | None,
    signer: Signer | None,
    cannot_sign: str,
    retirements: Retirements,
    dry_run: bool,
) -> None:
    """Retire the snapshots named by id (the newest of a path set too: the user said so)."""
    records = [r for r in repo.snapshots() if not client or owner(repo, r) == client]
    chosen = resolve_ids(records, ids, "Nothing was forgotten")
    active = retirements.active()
    retired = set(active)
    times = trusted_times(records)
    rows = []
    todo: list[SnapshotRecord] = []
    for rec in chosen:
        if rec.name in active:
            why = "already forgotten (" + ", ".join(n.split("/", 1)[1][:12] for n in active[rec.name]) + ")"
        else:
            why = "named on the command line"
            if newest_of_path_set(repo, rec, retired):
                why += "; it is the newest snapshot of its path set"
            if not rec.trusted:
                why += f"; not trusted ({rec.problem})"
            todo.append(rec)
        rows.append((rec, why, rec.name not in active))
    written: list[str] = []
    if not dry_run and todo:
        assert signer is not None  # signer_for raised otherwise
        for rec in todo:
            data = make_retirement(rec.name, "bunker forget ID", signer.key, signer.cert)
            written.append(repo.put_object("retired", data))
            remember(repo, written[-1], data)
    doc_rows: list[dict[str, Any]] = [
        {
            "id": rec.name.split("/", 1)[1],
            "client": owner(repo, rec),
            "seq": rec.snap.env.seq,
            "time": times.get(rec.name, rec.snap.env.time),
            "forget": forget_it,
            "why": why,
        }
        for rec, why, forget_it in rows
    ]
    out.document(
        {
            "repository": repo.backend.url,
            "id": repo.repo_id,
            "dry_run": dry_run,
            "policy": None,
            "signer": signer.who if signer else None,
            "snapshots": doc_rows,
            "forgotten": len(todo),
            "retirement_records": written,
        }
    )
    out.line(f"  {'id':12}  {'client':16}  {'time':19}  {'seq':>5}  {'action':6}  why")
    for r in doc_rows:
        out.line(
            f"  {r['id'][:12]}  {r['client'][:16]:16}  {_fmt_time(r['time'])}  {r['seq']:>5}  "
            f"{'forget' if r['forget'] else 'keep':6}  {r['why']}"
        )
    if not todo:
        out.line("nothing to forget: every snapshot named is forgotten already")
    elif dry_run:
        out.line(
            f"dry run: {len(todo)} snapshot(s) would be forgotten; nothing was written"
            + (f". A real run would be refused: {cannot_sign}" if cannot_sign else "")
        )
    else:
        out.line(
            f"forgot {len(todo)} snapshot(s): {len(written)} retirement record(s) signed by "
            f"{signer.who if signer else '?'}. No data was deleted: `bunker prune` frees the space only they needed; "
            "until then `bunker unforget ID` brings one back"
        )
