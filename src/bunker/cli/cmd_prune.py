"""prune: delete what no snapshot needs, in two phases with a grace period (repo/gc.py)."""

from __future__ import annotations

from typing import Any

import click

from bunker import dirs
from bunker.backup.adoption import adopt_abandoned_checkpoints
from bunker.backup.client_dirs import client_tag
from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.cli.output import human_bytes
from bunker.node.spool import parse_age
from bunker.repo import record_witness
from bunker.repo.gc import DEFAULT_GRACE, Pruner
from bunker.repo.repack import DEFAULT_THRESHOLD


@cli.command()
@common
@click.option(
    "--grace",
    metavar="AGE",
    help="Delete condemned packs only this long after they were condemned, and adopt the last checkpoint of a "
    "backup only this long after it died (default 24h; e.g. 1h, 2d).",
)
@click.option(
    "--repack-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    metavar="SHARE",
    help="Repack packs of which less than this share of the blob bytes is live (and merge small packs); 0 turns "
    "repacking off.",
)
@click.option(
    "--dry-run", is_flag=True, help="Show what would be adopted, condemned, deleted and repacked; change nothing."
)
@handles_errors
def prune(**kwargs: Any) -> None:
    """Delete packs no snapshot needs (put key with the prune capability). Runs alongside backups:
    packs are condemned first and deleted by a later prune, after the grace period and once every
    backup that might use them has ended. The last checkpoint of a backup that died more than the
    grace period ago, whose client did not run again, becomes an incomplete snapshot first."""
    grace = parse_age(kwargs.pop("grace")) if kwargs.get("grace") is not None else DEFAULT_GRACE
    kwargs.pop("grace", None)
    dry_run = kwargs.pop("dry_run")
    threshold = kwargs.pop("repack_threshold")
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    context.refuse_on_node(repo, "prune")
    put = context.load_put(opts, repo)
    # refuses a key without `prune`
    pruner = Pruner(repo, put, grace=grace, repack_threshold=threshold, dry_run=dry_run, progress=out.info)
    # a retention record this machine signed that the storage lost (deleted outside bunker) is put
    # back before marking: deleting an unforget must not let this prune free the data
    witnessed = record_witness.restore_witnessed(repo, dry_run)
    if witnessed:
        out.info(record_witness.warning(witnessed, dry_run))
    # before marking: the adopted snapshots then hold the checkpoints' packs, and their leases are gone
    adoption = adopt_abandoned_checkpoints(
        repo, put, pruner.cert, dirs.state_dir(repo.repo_id, client_tag(put)), grace, dry_run=dry_run
    )
    report = pruner.run()
    out.document({"repository": repo.backend.url, **report.to_json(), **adoption.to_json()})
    delete, condemn = ("would delete", "would condemn") if dry_run else ("deleted", "condemned")
    size = human_bytes(report.deleted_bytes)
    m = report.snapshots_marked
    line = f"{m} snapshot{' needs' if m == 1 else 's need'} {report.packs_referenced} packs; {delete} "
    n = len(report.deleted)
    line += f"{n} pack{'' if n == 1 else 's'} ({size}), {condemn} {len(report.condemned)}"
    if report.rescued:
        line += f"; kept {len(report.rescued)} condemned packs that snapshots need again"
    if adoption.adopted:
        n = len(adoption.adopted)
        line += f"; {'would adopt' if dry_run else 'adopted'} {n} checkpoint{'' if n == 1 else 's'} of dead backups"
    if report.repacked:
        n = len(report.repacked)
        line += (
            f"; {'would repack' if dry_run else 'repacked'} {n} pack{'' if n == 1 else 's'} (copied "
            f"{human_bytes(report.repack_copied_bytes)} live, {human_bytes(report.repack_freed_bytes)} to delete later)"
        )
    out.line(line)
    for name in report.retired_other_secret:
        out.line(
            f"  {name}: {'would retire' if dry_run else 'retired'}: written with another secret (a damaged put key), "
            "nobody can restore it"
        )
    if report.other_secret_indexes_removed:
        out.line(f"  removed {report.other_secret_indexes_removed} index object(s) written with another secret")
    for pack, why in report.repack_skipped:
        out.line(f"  packs/{pack}: not repacked: {why}")
    for text in adoption.lines():
        out.line(text)
    for rec, why in report.waiting:
        out.line(f"  {rec}: not deleted yet: {why}")
