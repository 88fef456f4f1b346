"""Listing requests (docs/hierarchy.md, "Listing requests"): a machine that backs up through this
node asks to see what a client wrote through other nodes (a replacement machine at another
site, after a disaster). The node requests the client's snapshots from its upstreams, as it
requests evicted packs for a restore (node/requests.py).

What a listing brings is everything a restore needs besides the data: the client's snapshot
objects, the reference objects of their pack and chunk sets, and the repository's index objects,
each checked against its name. The packs of those snapshots stay upstream: the node lists them
as held upstream (``evicted.json``, with their sizes), so a restore requests them as it requests
packs the node evicted, batch by batch where the store is small.

A direct upstream is asked at once. Over a link the request rides the next up bundle (the
``listings`` of a ``requests/`` object, docs/format.md section 24); the node above fetches the
listing for itself the same way, then sends the objects down with a listing answer (magic
``BKLA``: the client, the snapshot names, and each pack's size), which completes the request.

State: ``state/<repository>/listings.json``, client -> {since, route, state ("pending" |
"fetched"), tries, next, why, for (links below that asked), sent (link -> when), snapshots,
fetched}.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError
from bunker.node.eviction import evicted, evicted_path
from bunker.node.holdings import UpstreamState
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.requests import direct_upstreams, locked_state, next_try, upstream_route
from bunker.repo import refs
from bunker.repo.objects import matches_name
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import Backend
from bunker.storage.url import open_backend

ALL_CLIENTS = "*"
MAX_SNAPSHOTS = 1_000_000
REFRESH_AFTER = 86400.0  # a listing that came over a link is asked for again after this


def listings_path(nd: NodeDir, repo_id: str) -> str:
    return os.path.join(nd.state_dir(repo_id), "listings.json")


def listings(nd: NodeDir, repo_id: str) -> dict[str, dict[str, Any]]:
    """client -> its listing request (see the module's docstring)."""
    got: dict[str, dict[str, Any]] = read_json(listings_path(nd, repo_id), {})
    return got


@dataclass
class Found:
    """What a listing found for one client."""

    snapshots: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)  # every object a restore needs here: refs, index, snapshots
    packs: dict[str, int] = field(default_factory=dict)  # every pack of those snapshots, by size


def _verified(source: Backend, name: str) -> bytes:
    data = source.get(name)
    if not matches_name(name, data):
        raise BunkerError(f"{name} does not match its name at the upstream", "run `bunker check` there")
    return data


def collect(source: Backend, store: Backend, client: str) -> Found:
    """The snapshots of ``client`` (every client for ALL_CLIENTS) that ``source`` (a direct
    upstream) holds, with what a restore needs of them, copied into ``store`` where it lacks them:
    reference objects and index objects first, snapshots last (the format's write order), and
    the size of every pack of those snapshots."""
    found = Found()
    held = {i.name for p in ("snapshots/", "refs/", "index/") for i in store.list(p)}
    wanted: list[tuple[str, bytes]] = []
    for info in source.list("snapshots/"):
        data = store.get(info.name) if info.name in held else _verified(source, info.name)
        try:
            env = parse_snapshot(data).env
        except encoding.FormatError:
            continue  # a damaged snapshot there: `check` names it where it is
        if client != ALL_CLIENTS and env.client != client:
            continue
        wanted.append((info.name, data))
        if len(wanted) >= MAX_SNAPSHOTS:
            break
    if not wanted:
        return found

    seen: set[str] = set()

    def fetch(name: str) -> bytes:
        if name not in seen:
            seen.add(name)
            found.objects.append(name)
        if name in held:
            return store.get(name)
        data = _verified(source, name)
        store.put(name, data, if_absent=True)
        held.add(name)
        return data

    packs: set[str] = set()
    for _name, data in wanted:
        env = parse_snapshot(data).env
        for top in (env.packset, env.chunkset):
            parts = refs.parse_refs(fetch(top)).get("parts", [])
            for part in parts if isinstance(parts, list) else []:
                fetch(str(part))
        packs.update(f"packs/{p}" for p in refs.read_set(env.packset, fetch))
    for info in source.list("index/"):
        fetch(info.name)
    for name, data in wanted:
        found.objects.append(name)
        found.snapshots.append(name)
        if name not in held:
            store.put(name, data, if_absent=True)
    sizes = {i.name: i.size for i in source.list("packs/") if i.name in packs}
    found.packs = {p: int(sizes.get(p, 0)) for p in sorted(packs)}
    return found


def register(nd: NodeDir, repo_id: str, store: Backend, found: Found, via: str) -> None:
    """Record what a listing brought: its objects as held by every upstream (they come from the
    repository of record: never sent back up), and the packs the store lacks as held upstream
    (listed; requested when read)."""
    lacking = {p: s for p, s in found.packs.items() if store.stat(p) is None}
    with locked_state(nd, repo_id, "evicted"):
        record = evicted(nd, repo_id)
        now = time.time()
        for name, size in lacking.items():
            record.setdefault(name, {"size": size, "time": now, "recorded_by": [via], "listed": True})
        write_json(evicted_path(nd, repo_id), record)
    for up in nd.config.upstreams:
        if up.kind == "link" or up.repo == repo_id:
            state = UpstreamState(nd, repo_id, up.name)
            state.mark_recorded([*found.objects, *lacking])
            state.save()


def _fetch_from_direct(nd: NodeDir, repo_id: str, store: Backend, client: str) -> tuple[Found | None, str]:
    why = "this node has no direct upstream for the repository: the request waits for a link"
    for up, url in direct_upstreams(nd, repo_id):
        try:
            found = collect(open_backend(url), store, client)
        except (BunkerError, OSError, encoding.FormatError) as exc:
            why = f"upstream {up!r} cannot be listed: {exc.message if isinstance(exc, BunkerError) else exc}"
            continue
        register(nd, repo_id, store, found, up)
        return found, ""
    return None, why


def settle_listing(nd: NodeDir, repo_id: str, client: str, found: Found | None, why: str) -> dict[str, Any]:
    """Record a listing request's outcome (``found``, or why it waits); the links below that
    asked for it are owed the answer."""
    now = time.time()
    with locked_state(nd, repo_id, "listings"):
        got = listings(nd, repo_id)
        r = got.get(client)
        if r is None:
            return {}
        r["tries"] = int(r.get("tries", 0)) + 1
        if found is None:
            r["why"] = why
            r["next"] = next_try(int(r["tries"]), now)
        else:
            r.update(state="fetched", fetched=now, why="", snapshots=len(found.snapshots))
        write_json(listings_path(nd, repo_id), got)
        answer = dict(r)
    if found is not None:
        from bunker.node.listing_link import queue_listing_answer

        for link in answer.get("for", []):
            queue_listing_answer(nd, repo_id, link, client, found)
    return answer


def request_listing(nd: NodeDir, repo_id: str, store: Backend, client: str, for_link: str = "") -> dict[str, Any]:
    """A client (or, ``for_link``, the node below that link) asks for ``client``'s snapshots:
    record the request, ask the direct upstreams at once. Returns the request's entry."""
    now = time.time()
    direct = bool(direct_upstreams(nd, repo_id))
    with locked_state(nd, repo_id, "listings"):
        got = listings(nd, repo_id)
        r = got.get(client)
        if r is not None and r.get("state") == "fetched" and not direct and now - float(r["fetched"]) < REFRESH_AFTER:
            # over a link a new listing takes a trip: the one that came lately stands (asking
            # again after REFRESH_AFTER brings what was written since)
            if for_link and for_link not in r.setdefault("for", []):
                r["for"].append(for_link)
            write_json(listings_path(nd, repo_id), got)
            return dict(r)
        if r is None or r.get("state") != "pending":
            r = got[client] = {
                "since": now,
                "route": upstream_route(nd, repo_id),
                "tries": 0,
                "next": 0.0,
                "state": "pending",
            }
        r["last_asked"] = now
        if for_link and for_link not in r.setdefault("for", []):
            r["for"].append(for_link)
        write_json(listings_path(nd, repo_id), got)
    found, why = _fetch_from_direct(nd, repo_id, store, client)
    return settle_listing(nd, repo_id, client, found, why)


def retry_listings(nd: NodeDir, repo_id: str, *, force: bool = False) -> tuple[int, int]:
    """Ask again for the pending listings whose backoff has passed: (fetched, still pending)."""
    now = time.time()
    due = [c for c, r in listings(nd, repo_id).items() if r.get("state") == "pending" and (force or r["next"] <= now)]
    fetched = 0
    for client in due:
        found, why = _fetch_from_direct(nd, repo_id, nd.store(repo_id), client)
        settle_listing(nd, repo_id, client, found, why)
        fetched += found is not None
    return fetched, sum(r.get("state") == "pending" for r in listings(nd, repo_id).values())


def listing_open(nd: NodeDir, repo_id: str) -> bool:
    """Whether a listing request of this node is pending or was answered lately (objects a down
    bundle brings for it are then taken)."""
    return any(r.get("state") in ("pending", "fetched") for r in listings(nd, repo_id).values())
