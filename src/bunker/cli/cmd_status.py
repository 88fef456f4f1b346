"""bunker status: what the clients' status records say, keyless (docs/hierarchy.md, "Status of
the clients"), at the repository of record or on any copy."""

from __future__ import annotations

import datetime
import time
from typing import Any

import click

from bunker.cli import context
from bunker.cli.main import EXIT_FOR_LEVEL, cli, common, handles_errors, make_options
from bunker.node.spool import parse_age
from bunker.repo.status_records import SILENT_AFTER, status_rows


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def describe_row(row: dict[str, Any]) -> str:
    """One client's line: its newest run, or that it never reported; flagged when silent."""
    who = f"{row['client']!r}" + (" (revoked)" if row["revoked"] else "")
    if "ended" not in row:
        last = "no status record yet"
    else:
        snap = f"snapshot #{row['snapshot_seq']}" + ("" if row["complete"] else " (incomplete)")
        last = f"last {row['run']} {_when(row['ended'])}: level {row['level']}, exit {row['exit']}, " + (
            snap if row["snapshot"] else "no snapshot"
        )
    if row.get("reported_by"):
        last += f" — reported by node {row['reported_by']!r}: the client could not run"
    flag = f" — SILENT for more than {row['silent_after'] / 86400:g} days" if row["silent"] else ""
    if row.get("policy"):
        last += f", policy version {row['policy']}"
    return f"{who}: {last}{flag}"


@cli.command()
@common
@click.option(
    "--silent-after",
    metavar="AGE",
    help="Flag a client whose newest status record is older than AGE (e.g. 12h, 3d) [default: the policy's "
    f"silent-after for each client, else {SILENT_AFTER / 86400:g}d].",
)
@handles_errors
def status(**kwargs: Any) -> None:
    """Each client's last run, from the status records every backup leaves (no key needed)."""
    given = kwargs.pop("silent_after")
    silent_after = parse_age(given) if given is not None else None
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    rows, bad = status_rows(repo, time.time(), silent_after)
    silent = [r for r in rows if r["silent"]]
    failing = [r for r in rows if r.get("level") in ("err", "fatal")]
    # a broken record chain is a warning: a machine that lost its state starts again at #1
    level = "err" if bad or failing else "warn" if silent or any(r["problems"] for r in rows) else "ok"
    out.document({"repository": repo.repo_id, "clients": rows, "untrusted": bad, "level": level})
    for r in rows:
        out.line(describe_row(r))
        for p in r["problems"]:
            out.line(f"  problem: {p}")
    for b in bad:
        out.line(f"untrusted status record {b}")
    if silent:
        out.info(
            f"{len(silent)} client(s) left no status record within their silence limit: find out on "
            "those machines whether backups still run (a stopped timer, a machine gone, a node that withholds them)"
        )
    if bad:
        out.info("untrusted status records are ignored; they were altered, forged, or are another repository's")
    raise SystemExit(EXIT_FOR_LEVEL[level])
