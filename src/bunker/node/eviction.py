"""Eviction (docs/hierarchy.md, "Eviction"): keeping a node's store under its ``--max-size``.

Only objects the repository of record holds may go: those covered by record receipts (or, for a
direct upstream, written there and read back) from the upstreams the node's ``evict_after`` rule
requires (``all`` of them, ``any`` one, or a number k). Packs go first, oldest first; metadata
(configs, certificates, index, reference objects, snapshots) stays. Undelivered data is never
evicted: a store that stays over its bound is a warning naming how much, and the node's server
then refuses new data so that clients keep it in their own spool.

What was evicted is kept in ``state/<repository>/evicted.json`` (name, size, time, which
upstreams recorded it): the node's listing still shows those objects, marked as held upstream,
so clients deduplicate against them and `check` on the node reports them as upstream.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from bunker.node.holdings import UpstreamState
from bunker.node.leases import leased
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.node_settings import node_settings
from bunker.node.requests import locked_state, pinned
from bunker.storage.backend import ObjectInfo

# what eviction may take, in the order it takes it; everything else is metadata a node keeps
EVICTABLE = ("packs/",)
# everything a store holds counts against its bound (sessions/ aside: leases, a few bytes each)
HELD_PREFIXES = (
    "packs/",
    "index/",
    "refs/",
    "snapshots/",
    "status/",
    "config/",
    "clients/",
    "nodes/",
    "retired/",
    "gc/",
    "policy/",
)


@dataclass
class Evicted:
    repo_id: str
    bound: int | None
    used_before: int = 0
    used_after: int = 0
    evicted: list[str] = field(default_factory=list)
    evicted_bytes: int = 0
    over: int = 0  # bytes still over the bound (undelivered or unrecorded data)

    def to_json(self) -> dict[str, object]:
        return {
            "repository": self.repo_id,
            "bound": self.bound,
            "used_before": self.used_before,
            "used_after": self.used_after,
            "evicted": len(self.evicted),
            "evicted_bytes": self.evicted_bytes,
            "over": self.over,
        }


def evicted_path(nd: NodeDir, repo_id: str) -> str:
    return os.path.join(nd.state_dir(repo_id), "evicted.json")


def evicted(nd: NodeDir, repo_id: str) -> dict[str, dict[str, object]]:
    """name -> {size, time, recorded_by} of every object this node evicted."""
    got: dict[str, dict[str, object]] = read_json(evicted_path(nd, repo_id), {})
    return got


def store_usage(nd: NodeDir, repo_id: str) -> tuple[int, list[ObjectInfo]]:
    """Bytes the store holds, and every object in it."""
    store = nd.store(repo_id)
    infos = [i for p in HELD_PREFIXES for i in store.list(p)]
    return sum(i.size for i in infos), infos


def _upstreams_for(nd: NodeDir, repo_id: str) -> list[str]:
    return [u.name for u in nd.config.upstreams if u.kind == "link" or u.repo == repo_id]


def recorded_enough(nd: NodeDir, repo_id: str) -> dict[str, list[str]]:
    """name -> upstreams whose record receipts cover it, for names the eviction rule allows."""
    ups = _upstreams_for(nd, repo_id)
    if not ups:
        return {}
    by: dict[str, list[str]] = {}
    for up in ups:
        for name in UpstreamState(nd, repo_id, up).recorded:
            by.setdefault(name, []).append(up)
    rule = node_settings(nd, repo_id).evict_after
    need = len(ups) if rule == "all" else 1 if rule == "any" else min(int(rule), len(ups))
    return {n: u for n, u in by.items() if len(u) >= need}


def evict(nd: NodeDir, repo_id: str) -> Evicted:
    """Bring the store under the node's bound, as far as recorded data allows."""
    bound = node_settings(nd, repo_id).max_size
    out = Evicted(repo_id, bound)
    used, infos = store_usage(nd, repo_id)
    out.used_before = out.used_after = used
    if bound is None or used <= bound:
        return out
    allowed = recorded_enough(nd, repo_id)
    keep = pinned(nd, repo_id) | leased(nd, repo_id)  # for restores (node/requests.py, node/leases.py)
    candidates = sorted(
        (i for i in infos if i.name.startswith(EVICTABLE) and i.name in allowed and i.name not in keep),
        key=lambda i: (i.mtime, i.name),
    )
    store = nd.store(repo_id)
    now = time.time()
    with locked_state(nd, repo_id, "evicted"):  # a listing (node/listing.py) adds to the record too
        record = evicted(nd, repo_id)
        try:
            for info in candidates:
                if used <= bound:
                    break
                # the record first: a node killed between the two lists an object it still holds
                # (harmless), never one it lost without a trace
                record[info.name] = {"size": info.size, "time": now, "recorded_by": allowed[info.name]}
                write_json(evicted_path(nd, repo_id), record)
                store.delete(info.name)
                used -= info.size
                out.evicted.append(info.name)
                out.evicted_bytes += info.size
        finally:
            write_json(evicted_path(nd, repo_id), record)
    out.used_after = used
    out.over = max(0, used - bound)
    return out


def room_for_restore(nd: NodeDir, repo_id: str) -> int | None:
    """Bytes the node can fetch back for a restore while it keeps its bound: the room left, plus
    what eviction could take (recorded, neither pinned nor leased). None: the store is unbounded."""
    bound = node_settings(nd, repo_id).max_size
    if bound is None:
        return None
    used, infos = store_usage(nd, repo_id)
    allowed = recorded_enough(nd, repo_id)
    keep = pinned(nd, repo_id) | leased(nd, repo_id)
    evictable = sum(i.size for i in infos if i.name.startswith(EVICTABLE) and i.name in allowed and i.name not in keep)
    return max(0, bound - used + evictable)


def store_full(nd: NodeDir, repo_id: str) -> int:
    """Bytes the store is over its bound after what eviction could do (0: room left)."""
    bound = node_settings(nd, repo_id).max_size
    if bound is None:
        return 0
    used, _ = store_usage(nd, repo_id)
    return max(0, used - bound)


def evict_all(nd: NodeDir) -> tuple[list[Evicted], list[tuple[str, str, str]]]:
    """Evict in every repository the node relays; problems as (level, code, message)."""
    reports, problems = [], []
    for repo_id in nd.repositories():
        e = evict(nd, repo_id)
        if e.evicted:
            reports.append(e)
        if e.over:
            problems.append(
                (
                    "warn",
                    "store-full",
                    f"node {nd.name}'s store for repository {repo_id[:16]} is {e.over} bytes over its bound "
                    f"({e.bound} bytes) with data its upstreams have not recorded yet: nothing of it may be evicted. "
                    "Clients keep new backups in their own spool meanwhile; forward to the upstreams (and bring their "
                    f"receipts back), or raise the bound (max_size in {nd.root}/node.json, or max-size in the owner's "
                    "policy where it sets one: `bunker policy show --node`)",
                )
            )
    return reports, problems
