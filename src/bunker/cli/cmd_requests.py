"""bunker requests: the restore requests of the node this machine reaches the repository through
(docs/hierarchy.md, "Restore requests")."""

from __future__ import annotations

import datetime
from typing import Any

from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options


def _when(t: Any) -> str:
    return datetime.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M") if t else "?"


def describe_request(r: dict[str, Any]) -> str:
    """One restore request for people (as node/requests.py journals it)."""
    route = ", ".join(r.get("route") or []) or "no upstream"
    state = str(r.get("state", "?"))
    if state == "pending":
        how = f"PENDING since {_when(r.get('since'))} via {route}, {r.get('tries', 0)} tries: {r.get('why', '')}"
    elif state == "gone":
        how = f"GONE (asked since {_when(r.get('since'))}): {r.get('why', '')}"
    else:
        how = f"arrived {_when(r.get('fetched'))} via {route} (asked since {_when(r.get('since'))})"
    return f"{r.get('object', '?')}: {how}"


@cli.command()
@common
@handles_errors
def requests(**kwargs: Any) -> None:
    """What the node this repository is reached through has requested from upstream for restores:
    each object, since when, over which upstreams, and whether it arrived (no key needed)."""
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    ask = getattr(repo.backend, "restore_requests", None)
    rows = ask() if ask is not None else None
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
