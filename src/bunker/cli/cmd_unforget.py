"""unforget: withdraw the retirement of forgotten snapshots while their data is still stored.

A command of its own rather than `forget --undo`: the two do opposite things, and a `forget` line
in a cron job that lost its `--undo` (or gained a `--keep-*`) would retire instead of restore;
`unforget` takes ids only, never a policy. Withdrawing writes a signed unretire record naming
each retirement record in force (docs/format.md section 15); the retirement is never deleted, so
a deletion by whoever can write to the storage cannot pass for an unforget.
"""

from __future__ import annotations

from typing import Any

import click

from bunker.cli.cmd_forget import Signer, open_for_records, remember
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, ExitCode
from bunker.repo.forgetting import HELD, data_gone, resolve_ids
from bunker.repo.records import make_unretirement
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.selection import owner


def _secrets(
    repo: Repository, rec: SnapshotRecord, master: MasterKey | None, signer: Signer | None
) -> PutSecrets | None:
    """The S of the snapshot's dedup domain, when a key here has it (to check every chunk)."""
    if master is not None:
        try:
            return repo.domain_secrets(master, rec.snap.env.domain)
        except BunkerError:
            return None
    if signer is not None and signer.secrets is not None and signer.secrets.domain_id == rec.snap.env.domain:
        return signer.secrets
    return None


@cli.command()
@common
@click.argument("snapshot_ids", nargs=-1, required=True, metavar="ID...")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be brought back; change nothing.")
@handles_errors
def unforget(**kwargs: Any) -> None:
    """Bring back snapshots forgotten by `bunker forget` (id prefixes), while `bunker prune` has not
    deleted their data: each retirement gets a signed withdrawal, the snapshot is listed again,
    prune keeps its data, and later policy runs of forget keep it. Needs the same keys as forget."""
    ids, dry_run = list(kwargs.pop("snapshot_ids")), kwargs.pop("dry_run")
    opts, out = make_options(kwargs)
    repo, master, signer, cannot_sign = open_for_records(
        opts, out, dry_run, "unforget snapshots", "checking the data of forgotten snapshots and signing records"
    )
    retirements = repo.retirements()
    active = retirements.active()
    chosen = resolve_ids(repo.snapshots(), ids, "Nothing was unforgotten")
    todo: list[SnapshotRecord] = []
    rows: list[dict[str, Any]] = []
    gone: list[tuple[SnapshotRecord, str]] = []
    for rec in chosen:
        row = {"id": rec.name.split("/", 1)[1], "client": owner(repo, rec), "records": active.get(rec.name, [])}
        if rec.name not in active:
            row["why"] = "not forgotten: nothing to undo"
        else:
            why = data_gone(repo, rec, _secrets(repo, rec, master, signer))
            if why:
                gone.append((rec, why))
                row["why"] = f"its data is gone: {why}"
            else:
                todo.append(rec)
                row["why"] = "its data is all stored"
        rows.append(row)
    if gone:
        what = "; ".join(f"{rec.short_id}: {why}" for rec, why in gone)
        raise BunkerError(
            f"the data of {len(gone)} forgotten snapshot(s) is gone ({what}). They stay forgotten: their envelopes and "
            "logs remain (`bunker snapshots --all`), but they can no longer be restored. Nothing was unforgotten",
            "run `bunker unforget` again without "
            + " ".join(rec.short_id for rec, _ in gone)
            + " to bring back the others; restore what you need from the newest snapshot that has it, or from a "
            "mirror of the repository",
            exit_code=ExitCode.FATAL,
        )
    written: list[str] = []
    if not dry_run:
        assert signer is not None  # signer_for raised otherwise
        for rec in todo:
            for retirement in active[rec.name]:
                data = make_unretirement(retirement, rec.name, "bunker unforget", signer.key, signer.cert)
                written.append(repo.put_object("retired", data))
                remember(repo, written[-1], data)
    # a prune that marked before the withdrawal may have deleted the data meanwhile: look again
    lost = [(rec, why) for rec in todo if not dry_run and (why := data_gone(repo, rec, None))]
    out.document(
        {
            "repository": repo.backend.url,
            "id": repo.repo_id,
            "dry_run": dry_run,
            "signer": signer.who if signer else None,
            "snapshots": rows,
            "unforgotten": len(todo),
            "unretire_records": written,
            "lost_meanwhile": [rec.name.split("/", 1)[1] for rec, _ in lost],
        }
    )
    for r in rows:
        out.line(f"  {r['id'][:12]}  client {r['client']}: {r['why']}")
    for rec, why in lost:
        out.info(
            f"warning: snapshot {rec.short_id} was unforgotten, but a `bunker prune` that ran at the same time deleted "
            f"its data ({why}): it cannot be restored; restore what you need from another snapshot or a mirror"
        )
    if not todo:
        out.line("nothing to unforget")
    elif dry_run:
        out.line(
            f"dry run: {len(todo)} snapshot(s) would be unforgotten; nothing was written"
            + (f". A real run would be refused: {cannot_sign}" if cannot_sign else "")
        )
    else:
        out.line(
            f"unforgot {len(todo)} snapshot(s): {len(written)} unretire record(s) signed by "
            f"{signer.who if signer else '?'}. They are listed again, `bunker prune` keeps their data, and policy runs "
            f"of `bunker forget` keep them (reason {HELD!r}); `bunker forget ID` forgets one again"
        )
