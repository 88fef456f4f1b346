"""`bunker node status`: what a node holds and owes (docs/hierarchy.md, "Watching a node")."""

from __future__ import annotations

import time
from typing import Any

from bunker.node.holdings import SESSION_OUTPUT, UpstreamState, owed
from bunker.node.node_dir import NodeDir
from bunker.node.node_settings import node_settings
from bunker.node.requests import journal
from bunker.node.rotation import rotation_status
from bunker.node.staleness import last_heard, stale_problems
from bunker.node.witnessed import witnessed_heads
from bunker.repo.policy import read_policies
from bunker.repo.repository import Repository
from bunker.repo.status_records import status_rows


def node_status(nd: NodeDir) -> dict[str, Any]:
    """A JSON-ready summary of ``nd``: per repository, what it holds and what each upstream lacks."""
    repos = []
    silent: list[str] = []
    for repo_id in nd.repositories():
        store = nd.store(repo_id)
        held = [i for p in SESSION_OUTPUT for i in store.list(p)]
        ups = []
        for up in nd.config.upstreams:
            if up.kind == "direct" and up.repo != repo_id:
                continue
            state = UpstreamState(nd, repo_id, up.name)
            todo = owed(store, state)
            ups.append(
                {
                    "name": up.name,
                    "kind": up.kind,
                    "owed_objects": todo.count,
                    "owed_bytes": todo.size,
                    "recorded": len(state.recorded),
                    # when the newest record receipt (or direct read-back) covered something
                    "last_recorded": max(state.recorded.values(), default=None),
                    "last_heard": last_heard(nd, repo_id, up.name, up.kind) or None,
                }
            )
        heads = {h.cert: h for h in witnessed_heads(nd, repo_id)}
        # the clients that back up through this node: their status records are in its store
        held_repo = Repository.open(store, repo_id, floor=False)
        rows, untrusted = status_rows(held_repo, time.time())
        in_force = read_policies(held_repo).current
        clients = []
        for row in rows:
            if not row["records"]:
                continue
            head = heads.get(row["cert"])
            row["top_head"] = {"seq": head.seq, "time": head.time, "via": head.via} if head else None
            clients.append(row)
            if row["silent"]:
                days = f"{row['silent_after'] / 86400:g}"
                silent.append(f"client {row['client']!r} left no status record on node {nd.name} for {days} days")
        repos.append(
            {
                "repository": repo_id,
                "clients": clients,
                "untrusted_status": untrusted,
                # restore requests still waiting for data from upstream (node/requests.py)
                "requests": _pending_requests(nd, repo_id),
                # the owner's policy as it reached this node (repo/policy.py)
                "policy": {"version": in_force.version, "name": in_force.name} if in_force else None,
                # what the node applies here: node.json, overridden by the policy's node settings
                "settings": node_settings(nd, repo_id).to_json(),
                "objects": len(held),
                "bytes": sum(i.size for i in held),
                "upstreams": ups,
                # the newest snapshot per client it saw the repository of record hold (node/witnessed.py)
                "witnessed": [h.to_body() for h in witnessed_heads(nd, repo_id)],
            }
        )
    return {
        "node": nd.name,
        "id": nd.config.node_id,
        "directory": nd.root,
        "store": nd.config.store,
        "max_size": nd.config.max_size,
        "repositories": repos,
        "problems": [{"level": lv, "code": c, "message": m} for lv, c, m in stale_problems(nd)]
        + [{"level": "warn", "code": "client-silent", "message": m} for m in silent],
        "key_rotation": rotation_status(nd),
        "quotas": dict(nd.config.quotas),
    }


def _pending_requests(nd: NodeDir, repo_id: str) -> dict[str, object]:
    from bunker.node.listing import listings

    asked = [*journal(nd, repo_id).values(), *listings(nd, repo_id).values()]
    pending = [float(r.get("since", 0.0)) for r in asked if r.get("state") == "pending"]
    return {"pending": len(pending), "oldest": min(pending) if pending else None}
