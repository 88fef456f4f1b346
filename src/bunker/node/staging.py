"""Staged import (docs/hierarchy.md, "Import is staged"): a snapshot that came over a link is
published into the node's store only once every pack its pack set names is there (or was
evicted under a record receipt: the repository of record holds it). Until then it waits in
``state/<repository>/staged/``; what it lacks goes back in the next hop receipt so the sender
resends it, and a snapshot staged longer than STAGED_WARN_AFTER is a warning.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from bunker import encoding
from bunker.errors import CorruptObject, ObjectMissing
from bunker.node.eviction import evicted
from bunker.node.holdings import snapshot_packs
from bunker.node.node_dir import NodeDir
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import Backend

STAGED_WARN_AFTER = 24 * 3600.0


@dataclass
class Staging:
    published: list[str] = field(default_factory=list)
    waiting: dict[str, list[str]] = field(default_factory=dict)  # snapshot -> what it lacks
    old: list[tuple[str, float]] = field(default_factory=list)  # (snapshot, seconds staged) past the warning age


def staged_dir(nd: NodeDir, repo_id: str) -> str:
    return nd.state_dir(repo_id, "staged")


def staged_names(nd: NodeDir, repo_id: str) -> list[str]:
    """Snapshots staged here, waiting for their packs."""
    return [f"snapshots/{leaf}" for leaf in sorted(os.listdir(staged_dir(nd, repo_id))) if not leaf.endswith(".tmp")]


def stage(nd: NodeDir, repo_id: str, name: str, data: bytes) -> None:
    """Hold snapshot ``name`` (its bytes checked against its name by the caller)."""
    path = os.path.join(staged_dir(nd, repo_id), name.split("/", 1)[1])
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


def publish_ready(nd: NodeDir, repo_id: str, store: Backend) -> Staging:
    """Publish every staged snapshot whose packs are all there; report the others."""
    out = Staging()
    directory = staged_dir(nd, repo_id)
    have = {i.name for i in store.list("packs/")} | set(evicted(nd, repo_id))
    now = time.time()
    for leaf in sorted(os.listdir(directory)):
        if leaf.endswith(".tmp"):
            continue
        path = os.path.join(directory, leaf)
        name = f"snapshots/{leaf}"
        with open(path, "rb") as f:
            data = f.read()
        try:
            env = parse_snapshot(data).env
        except encoding.FormatError:
            os.unlink(path)  # checked against its name when staged: cannot happen short of a bug
            continue
        try:
            lacking = [p for p in snapshot_packs(env, store.get) if p not in have]
        except ObjectMissing as exc:
            lacking = [exc.object_name]  # a part of its pack set: resent, then its packs are known
        except (encoding.FormatError, CorruptObject):
            lacking = [env.packset]
        if lacking:
            out.waiting[name] = lacking
            age = now - os.stat(path).st_mtime
            if age > STAGED_WARN_AFTER:
                out.old.append((name, age))
            continue
        store.put(name, data, if_absent=True)
        os.unlink(path)
        out.published.append(name)
    return out
