"""A node's holding records (repo/holding_records.py; docs/hierarchy.md, "A client that moves
between nodes"): which snapshots it holds and has not delivered to an upstream, sent up *ahead of*
the data, so that the repository of record knows early what is on its way.

Per (repository, upstream) the node remembers the record it last wrote
(``state/<repository>/up/<upstream>/holding.json``: its name and the snapshots it names). A new
record is written only when the set changed in a way the top should hear: a snapshot the last
record did not name, or one that left the set without the top recording it (a link upstream
acknowledged it with a hop receipt: that node's own record takes over). A snapshot that left
because the top recorded it needs no new record: a prune at the top removes a record once its
snapshots are all there.

The node keeps the newest record of each (node, upstream) in its store's ``gc/`` — its own and
those of the nodes below it, which it passes on — and drops the older ones. Holding records only
ever go up (never down a link, never down from a direct upstream).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.errors import CorruptObject, ObjectMissing
from bunker.node.holdings import UpstreamState
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.staging import staged_dir, staged_names
from bunker.repo.holding_records import Held, HoldingRecord, make_holding, newest_holdings, parse_holding
from bunker.repo.objects import MAGIC_HOLDING, content_hash
from bunker.repo.snapshot import Envelope, parse_snapshot
from bunker.storage.backend import Backend, ObjectInfo


def _held(nd: NodeDir, repo_id: str, snapshots: list[tuple[ObjectInfo, Envelope]]) -> dict[str, list[Held]]:
    """What the node holds and the upstream lacks: the snapshots it owes (``snapshots``), and
    those staged here (from nodes below, waiting for their packs)."""
    held: dict[str, list[Held]] = defaultdict(list)
    for info, env in snapshots:
        held[env.cert].append(Held(env.seq, info.name, env.prev, info.mtime))
    directory = staged_dir(nd, repo_id)
    for name in staged_names(nd, repo_id):
        path = os.path.join(directory, name.split("/", 1)[1])
        try:
            with open(path, "rb") as f:
                env = parse_snapshot(f.read()).env
            since = os.stat(path).st_mtime
        except (OSError, encoding.FormatError):
            continue  # published or removed meanwhile
        held[env.cert].append(Held(env.seq, name, env.prev, since))
    return held


def _own_holding(
    nd: NodeDir,
    repo_id: str,
    store: Backend,
    state: UpstreamState,
    upstream: str,
    snapshots: list[tuple[ObjectInfo, Envelope]],
    keys: NodeKeys,
) -> None:
    """Write this node's record for ``upstream`` into its store when what it holds changed (see
    the module's docstring)."""
    path = os.path.join(state.dir, "holding.json")
    last = read_json(path, {})
    last = last if isinstance(last, dict) else {}
    said = set(last.get("names", []))
    held = _held(nd, repo_id, snapshots)
    names = {h.name for hs in held.values() for h in hs}
    if names <= said and all(n in state.recorded for n in said - names):
        return  # nothing new held, and what left is at the top
    data = make_holding(keys, repo_id, upstream, held)
    name = f"gc/{content_hash(data)}"
    store.put(name, data, if_absent=True)
    write_json(path, {"name": name, "names": sorted(names)})
    old = str(last.get("name", ""))
    if old and old != name:
        with contextlib.suppress(ObjectMissing):
            store.delete(old)


def _held_records(store: Backend) -> list[tuple[HoldingRecord, ObjectInfo]]:
    """Every holding record in the store (own ones, and those nodes below sent, verified when
    they came in)."""
    out = []
    for info in store.list("gc/"):
        try:
            if store.get(info.name, 0, 4) != MAGIC_HOLDING:
                continue
            record, _, _, _ = parse_holding(info.name, store.get(info.name))
        except (encoding.FormatError, ObjectMissing, CorruptObject):
            continue
        out.append((record, info))
    return out


def holdings_ahead(
    nd: NodeDir,
    repo_id: str,
    store: Backend,
    state: UpstreamState,
    upstream: str,
    snapshots: list[tuple[ObjectInfo, Envelope]],
    keys: NodeKeys,
) -> list[ObjectInfo]:
    """This node's holding record for ``upstream`` brought up to date (signed with ``keys``),
    older records dropped, and the newest record of each (node, upstream) in the store that the
    upstream is not known to hold: to be sent before any data."""
    _own_holding(nd, repo_id, store, state, upstream, snapshots, keys)
    found = _held_records(store)
    newest, older = newest_holdings(r for r, _ in found)
    for r in older:
        with contextlib.suppress(ObjectMissing):
            store.delete(r.name)
    keep = {r.name for r in newest}
    return [info for r, info in found if r.name in keep and info.name not in state.delivered]
