"""Listing requests over links (docs/hierarchy.md, "Listing requests"; node/listing.py): the
node below asks in the ``listings`` of its next up bundle's request object; the node above
answers in its next down bundle with the objects and a listing answer (magic ``BKLA``), which
the node below checks and records.

A listing answer (``requests/<hash>``) is the msgpack map {"v": 1, "repo", "client",
"snapshots": [names], "objects": [names], "packs": {name: size}}. Like a request it needs no
signature of its own: the piece that carries it is authenticated by the link's keys, and every
object it names is checked against its name when it arrives.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bunker import encoding
from bunker.node.listing import Found, listing_open, listings, listings_path, register, settle_listing
from bunker.node.node_dir import NodeDir, remove_quietly, write_json
from bunker.node.requests import due_over, locked_state, queue_answers
from bunker.repo.objects import content_hash, is_hash_name, matches_name
from bunker.storage.backend import Backend

MAGIC_ANSWER = b"BKLA"
LISTED_PREFIXES = ("snapshots/", "refs/", "index/")  # what a listing brings down
MAX_NAMES = 10_000_000


def listings_to_send(nd: NodeDir, repo_id: str, link: str, resend_after: float) -> list[str]:
    """The clients whose pending listing goes up over ``link`` in the next bundle."""
    return due_over(listings(nd, repo_id), link, resend_after)


def mark_listings_sent(nd: NodeDir, repo_id: str, link: str, clients: list[str]) -> None:
    now = time.time()
    with locked_state(nd, repo_id, "listings"):
        got = listings(nd, repo_id)
        for c in set(clients) & got.keys():
            got[c].setdefault("sent", {})[link] = now
        write_json(listings_path(nd, repo_id), got)


def _outbox(nd: NodeDir, repo_id: str, link: str) -> str:
    return nd.state_dir(repo_id, "down", link, "listing-answers")


def make_answer(repo_id: str, client: str, found: Found) -> tuple[str, bytes]:
    body = {
        "v": 1,
        "repo": repo_id,
        "client": client,
        "snapshots": found.snapshots,
        "objects": found.objects,
        "packs": found.packs,
    }
    raw = MAGIC_ANSWER + encoding.pack(body)
    return "requests/" + content_hash(raw), raw


def is_answer(data: bytes) -> bool:
    return data[:4] == MAGIC_ANSWER


def parse_answer(data: bytes, repo_id: str) -> tuple[str, Found]:
    """(client, what was found) from a listing answer; FormatError when it is not one."""
    if not is_answer(data):
        raise encoding.FormatError("not a listing answer")
    body = encoding.expect_map(encoding.unpack(data[4:]), "v", "repo", "client", "snapshots", "objects", "packs")
    if encoding.field(body, "v", int) != 1 or encoding.field(body, "repo", str) != repo_id:
        raise encoding.FormatError("a listing answer of another repository or format")
    client = encoding.field(body, "client", str)
    snaps, objects, packs = body["snapshots"], body["objects"], body["packs"]
    if (
        not isinstance(snaps, list)
        or not isinstance(objects, list)
        or not isinstance(packs, dict)
        or len(objects) + len(packs) > MAX_NAMES
        or not all(isinstance(n, str) and n.startswith("snapshots/") and is_hash_name(n) for n in snaps)
        or not all(isinstance(n, str) and n.startswith(LISTED_PREFIXES) and is_hash_name(n) for n in objects)
        or not all(
            isinstance(n, str) and n.startswith("packs/") and is_hash_name(n) and type(s) is int and s >= 0
            for n, s in packs.items()
        )
    ):
        raise encoding.FormatError("a malformed listing answer")
    return client, Found(snapshots=list(snaps), objects=list(objects), packs=dict(packs))


def queue_listing_answer(nd: NodeDir, repo_id: str, link: str, client: str, found: Found) -> None:
    """Owe the node below ``link`` the listing of ``client``: its objects, then the answer."""
    queue_answers(nd, repo_id, link, found.objects)
    name, raw = make_answer(repo_id, client, found)
    path = os.path.join(_outbox(nd, repo_id, link), name.split("/", 1)[1])
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def answers_to_send(nd: NodeDir, repo_id: str, link: str) -> list[tuple[str, bytes]]:
    """The listing answers waiting for the next down bundle over ``link``, with their files."""
    out = []
    box = _outbox(nd, repo_id, link)
    for leaf in sorted(os.listdir(box)):
        if leaf.endswith(".tmp"):
            continue
        with open(os.path.join(box, leaf), "rb") as f:
            out.append(("requests/" + leaf, f.read()))
    return out


def answers_went(nd: NodeDir, repo_id: str, link: str, names: list[str]) -> None:
    for name in names:
        remove_quietly(os.path.join(_outbox(nd, repo_id, link), name.split("/", 1)[1]))


def take_listed_object(nd: NodeDir, repo_id: str, store: Backend, name: str, data: bytes) -> bool:
    """An object a listing brings down (snapshots, reference and index objects): kept while a
    listing of this node is open, when its bytes match its name (True); else refused."""
    if not name.startswith(LISTED_PREFIXES) or not listing_open(nd, repo_id):
        return False
    if not is_hash_name(name) or not matches_name(name, data):
        return False
    store.put(name, data, if_absent=True)
    return True


def take_answer(nd: NodeDir, repo_id: str, store: Backend, link: str, data: bytes) -> dict[str, Any]:
    """A listing answer came down ``link``: when this node asked for that listing, record what it
    brought (packs listed as held upstream) and complete the request; the nodes below that asked
    for it are owed it in turn."""
    client, found = parse_answer(data, repo_id)
    if listings(nd, repo_id).get(client, {}).get("state") not in ("pending", "fetched"):
        return {"client": client, "taken": False}
    missing = [n for n in found.objects if store.stat(n) is None]
    if missing:
        return {"client": client, "taken": False, "missing": len(missing)}  # asked again: the next one
    register(nd, repo_id, store, found, link)
    settle_listing(nd, repo_id, client, found, "")
    return {"client": client, "taken": True, "snapshots": len(found.snapshots)}
