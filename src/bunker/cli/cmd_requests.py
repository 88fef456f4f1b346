"""bunker requests: the restore requests of the node this machine reaches the repository through
(docs/hierarchy.md, "Restore requests")."""

from __future__ import annotations

import datetime
import sys
from typing import Any

import click

from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.errors import BunkerError, ExitCode


def _when(t: Any) -> str:
    return datetime.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M") if t else "?"


def describe_request(r: dict[str, Any]) -> str:
    """One restore request for people (as node/requests.py journals it)."""
    route = ", ".join(r.get("route") or []) or "no upstream"
    state = str(r.get("state", "?"))
    pending = f"PENDING since {_when(r.get('since'))} via {route}, {r.get('tries', 0)} tries: {r.get('why', '')}"
    if "listing" in r:
        who = "every client" if r["listing"] == "*" else f"client {r['listing']!r}"
        if state == "fetched":
            arrived = f"arrived {_when(r.get('fetched'))} via {route}, {r.get('snapshots', 0)} snapshot(s)"
            return f"listing of {who}: {arrived}"
        return f"listing of {who}: {pending}"
    if state == "pending":
        how = pending
    elif state == "gone":
        how = f"GONE (asked since {_when(r.get('since'))}): {r.get('why', '')}"
    else:
        how = f"arrived {_when(r.get('fetched'))} via {route} (asked since {_when(r.get('since'))})"
    return f"{r.get('object', '?')}: {how}"


@cli.command()
@common
@click.option(
    "--listing",
    metavar="CLIENT",
    help="Ask the node to request from upstream the snapshots CLIENT wrote, wherever it backed up "
    "(a replacement machine at another site); `*` for every client. `bunker snapshots` then lists them.",
)
@handles_errors
def requests(listing: str | None, **kwargs: Any) -> None:
    """What the node this repository is reached through has requested from upstream for restores:
    each object, since when, over which upstreams, and whether it arrived (no key needed)."""
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    ask = getattr(repo.backend, "restore_requests", None)
    if listing is not None and ask is None:
        raise BunkerError(
            "--listing asks a node, and this repository is not reached through one",
            "list the snapshots here directly: `bunker snapshots --client NAME`",
            exit_code=ExitCode.USAGE,
        )
    rows = ask(listing or "") if ask is not None else None
    node = getattr(repo.backend, "server_node", "")
    out.document({"repository": repo.repo_id, "node": node or None, "requests": rows or []})
    if rows is None:
        out.line(
            "this repository is not reached through a node (or the node is too old to say): a restore reads "
            "everything directly, nothing is ever requested"
        )
        return
    if not rows:
        out.line(f"node {node!r} has no restore requests")
    for r in rows:
        out.line(describe_request(r))
    mine = [r for r in rows if r.get("listing") == listing] if listing else []
    if mine and mine[0].get("state") == "fetched":
        who = "" if listing == "*" else f" --client {listing}"
        out.info(f"the node holds the listing now: `bunker snapshots{who}` shows it, and a restore requests the data")
    elif mine:
        out.info(
            "the listing was requested and travels with the node's next bundle: run this again later "
            "(or `bunker snapshots` once `bunker requests` says it arrived)"
        )
        sys.exit(ExitCode.REQUESTED)
