"""prune: delete what no snapshot needs, in two phases with a grace period (repo/gc.py)."""

from __future__ import annotations

from typing import Any

import click

from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.cli.output import human_bytes
from bunker.node.spool import parse_age
from bunker.repo.gc import DEFAULT_GRACE, Pruner


@cli.command()
@common
@click.option(
    "--grace",
    metavar="AGE",
    help="Delete condemned packs only this long after they were condemned (default 24h; e.g. 1h, 2d).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be condemned and deleted; change nothing.")
@handles_errors
def prune(**kwargs: Any) -> None:
    """Delete packs no snapshot needs (put key with the prune capability). Runs alongside backups:
    packs are condemned first and deleted by a later prune, after the grace period and once every
    backup that might use them has ended."""
    grace = parse_age(kwargs.pop("grace")) if kwargs.get("grace") is not None else DEFAULT_GRACE
    kwargs.pop("grace", None)
    dry_run = kwargs.pop("dry_run")
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    put = context.load_put(opts, repo)
    report = Pruner(repo, put, grace=grace, dry_run=dry_run, progress=out.info).run()
    out.document({"repository": repo.backend.url, **report.to_json()})
    delete, condemn = ("would delete", "would condemn") if dry_run else ("deleted", "condemned")
    size = human_bytes(report.deleted_bytes)
    line = f"{report.snapshots_marked} snapshots need {report.packs_referenced} packs; {delete} "
    n = len(report.deleted)
    line += f"{n} pack{'' if n == 1 else 's'} ({size}), {condemn} {len(report.condemned)}"
    if report.rescued:
        line += f"; kept {len(report.rescued)} condemned packs that snapshots need again"
    out.line(line)
    for rec, why in report.waiting:
        out.line(f"  {rec}: not deleted yet: {why}")
