"""How long a node has heard nothing from upstream (docs/hierarchy.md, "Records flowing down").

Revocations, new certificates and condemnations reach a node only from above: through a direct
upstream each time the node delivers to it, through a link with each down bundle it imports. A
node that has heard nothing for its ``stale_after`` (default a week) may be missing a revocation:
it says so (warn) in `node status`, `node forward` and `node import`.
"""

from __future__ import annotations

import os
import time

from bunker.node.links import LinkCounters
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.node_settings import node_settings


def heard_path(nd: NodeDir, repo_id: str, upstream: str) -> str:
    return os.path.join(nd.state_dir(repo_id, "up", upstream), "heard.json")


def note_heard(nd: NodeDir, repo_id: str, upstream: str) -> None:
    """A direct upstream answered: its records came down in the same run."""
    write_json(heard_path(nd, repo_id, upstream), time.time())


def last_heard(nd: NodeDir, repo_id: str, upstream: str, kind: str) -> float:
    """When ``upstream`` last sent anything down for ``repo_id`` (0: never)."""
    if kind == "link":
        return LinkCounters(nd, upstream, repo_id).last_heard
    return float(read_json(heard_path(nd, repo_id, upstream), 0.0))


def stale_problems(nd: NodeDir) -> list[tuple[str, str, str]]:
    """A warning per (repository, upstream) not heard from within ``stale_after``."""
    out = []
    now = time.time()
    for repo_id in nd.repositories():
        for up in nd.config.upstreams:
            if up.kind == "direct" and up.repo != repo_id:
                continue
            heard = last_heard(nd, repo_id, up.name, up.kind)
            if now - max(heard, up.added) <= node_settings(nd, repo_id).stale_after:
                continue
            since = f"for {(now - heard) / 86400:.1f} days" if heard else "ever"
            out.append(
                (
                    "warn",
                    "upstream-stale",
                    f"node {nd.name} has heard nothing from upstream {up.name} {since} (repository {repo_id[:16]}): "
                    "revocations and condemnations made at the top may be missing here. Carry the link's disk "
                    f"back and run `bunker node import {nd.root}`, or check that {up.url} can be reached",
                )
            )
    return out


def records_asof_path(nd: NodeDir, repo_id: str) -> str:
    return os.path.join(nd.state_dir(repo_id), "records-asof.json")


def note_records_asof(nd: NodeDir, repo_id: str, asof: float) -> None:
    """The store now holds every record (configs, certificates, retirement and GC records) the
    repository of record held at ``asof``: a session starting from now on sees them all."""
    if asof > records_asof(nd, repo_id):
        write_json(records_asof_path(nd, repo_id), asof)


def records_asof(nd: NodeDir, repo_id: str) -> float:
    """Up to when the store holds the top's records (0: never heard)."""
    return float(read_json(records_asof_path(nd, repo_id), 0.0))
