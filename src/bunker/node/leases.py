"""Restore leases (docs/hierarchy.md, "Restore leases and batches"): a restore through a node
holds a lease on its snapshot while it runs, and the node's eviction leaves every pack of that
snapshot's pack set it holds.

A lease is renewed by the restore (every third of its time); one that was not renewed lapses,
so a restore killed with kill -9 pins nothing for longer than ``LEASE_SECONDS``. What the
restore fetched through requests stays pinned by the requests themselves (node/requests.py)
until the rerun: a lease only adds the packs the node held anyway, which must not be evicted to
make room for the ones it fetched. A restore that ends releases what it fetched; one that is
batched (its data does not fit the store) releases each batch once it has restored it.

State: ``state/<repository>/leases.json``, lease id -> {snapshot, packs, since, until}.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError
from bunker.node.holdings import snapshot_packs
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.requests import locked_state, release
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import Backend

LEASE_SECONDS = 600.0  # a lease not renewed for this long lapses
MAX_LEASE_SECONDS = 3600.0  # the most a client may ask for


def _path(nd: NodeDir, repo_id: str) -> str:
    return os.path.join(nd.state_dir(repo_id), "leases.json")


def leased(nd: NodeDir, repo_id: str, now: float | None = None) -> set[str]:
    """Packs eviction must leave for the restores that hold a live lease."""
    now = time.time() if now is None else now
    leases: dict[str, dict[str, Any]] = read_json(_path(nd, repo_id), {})
    return {p for e in leases.values() if float(e.get("until", 0.0)) > now for p in e.get("packs", [])}


def _set_of(store: Backend, snapshot: str) -> list[str]:
    try:
        return snapshot_packs(parse_snapshot(store.get(snapshot)).env, store.get)
    except (BunkerError, encoding.FormatError):
        return []  # not held or unreadable here: the lease pins nothing (the restore finds out)


def hold(
    nd: NodeDir,
    repo_id: str,
    store: Backend,
    lease_id: str,
    snapshot: str,
    *,
    seconds: float = LEASE_SECONDS,
    released: set[str] | None = None,
    end: bool = False,
    done: bool = False,
) -> float:
    """Take, renew or end (``end``) lease ``lease_id`` on ``snapshot``; ``released`` packs are
    done with (a restored batch), and ``done`` releases everything the restore fetched (it
    completed). Returns until when the lease holds (0.0 once ended)."""
    now = time.time()
    let_go = set(released or ())
    with locked_state(nd, repo_id, "leases"):
        leases: dict[str, dict[str, Any]] = read_json(_path(nd, repo_id), {})
        leases = {i: e for i, e in leases.items() if float(e.get("until", 0.0)) > now}
        entry = leases.get(lease_id)
        if entry is None and not end:
            entry = leases[lease_id] = {"snapshot": snapshot, "packs": _set_of(store, snapshot), "since": now}
        if entry is not None and done:
            let_go.update(entry.get("packs", []))
        if end:
            leases.pop(lease_id, None)
        elif entry is not None:
            entry["until"] = now + max(1.0, min(seconds, MAX_LEASE_SECONDS))
            entry["packs"] = [p for p in entry.get("packs", []) if p not in let_go]
        write_json(_path(nd, repo_id), leases)
    # a pack another live lease holds stays pinned by that lease (leased() is read at eviction)
    release(nd, repo_id, let_go)
    return 0.0 if end else float(leases[lease_id]["until"])
