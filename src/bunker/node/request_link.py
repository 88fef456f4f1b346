"""Restore requests over links (docs/hierarchy.md, "Restore requests"): a node whose upstream is
a link (a mailbox, a disk carried by hand) carries its pending requests up in its next bundle;
the node above answers with the objects in its next down bundle, fetching them first from its
own upstream if it evicted them too (node/requests.py); the node below takes an object from a
down bundle only when it has a pending request for it.

A request object (``requests/<hash>``, magic ``BKRQ``) is the msgpack map {"v": 1, "repo",
"objects": [names], "time"}, and "listings": [client names] when it carries listing requests
(node/listing_link.py). It needs no signature of its own: the piece that carries it is
authenticated by the link's keys, as receipts are. The node above keeps, per downstream link,
the names it owes (``state/<repo>/down/<link>/answers.json``) until a down bundle carried them.
"""

from __future__ import annotations

import time
from typing import Any

from bunker import encoding
from bunker.node.eviction import evicted
from bunker.node.listing import request_listing
from bunker.node.listing_link import listings_to_send, mark_listings_sent
from bunker.node.node_dir import NodeDir, read_json
from bunker.node.requests import (
    answers_path,
    due_over,
    journal,
    locked_journal,
    owed_answers,
    queue_answers,
    request,
    settle,
)
from bunker.repo.objects import content_hash, is_hash_name
from bunker.storage.backend import Backend

PREFIX = "requests/"
MAGIC_REQUEST = b"BKRQ"
MAX_OBJECTS = 100_000


def make_request(repo_id: str, names: list[str], clients: list[str] | None = None) -> tuple[str, bytes]:
    """(object name, bytes) of a request for ``names`` (and the listings of ``clients``)."""
    body: dict[str, Any] = {"v": 1, "repo": repo_id, "objects": sorted(names), "time": time.time()}
    if clients:
        body["listings"] = sorted(clients)
    raw = MAGIC_REQUEST + encoding.pack(body)
    return PREFIX + content_hash(raw), raw


def parse_listings(data: bytes) -> list[str]:
    """The clients whose listing a request asks for (after ``parse_request`` accepted it)."""
    got = encoding.unpack(data[4:]).get("listings", [])
    if not isinstance(got, list) or len(got) > MAX_OBJECTS or not all(isinstance(c, str) and c for c in got):
        raise encoding.FormatError("a restore request with malformed listings")
    return [str(c) for c in got]


def parse_request(data: bytes, repo_id: str) -> list[str]:
    """The object names a request asks for; FormatError when it is not one for ``repo_id``."""
    if data[:4] != MAGIC_REQUEST:
        raise encoding.FormatError("not a restore request")
    body = encoding.expect_map(encoding.unpack(data[4:]), "v", "repo", "objects", "time")
    if encoding.field(body, "v", int) != 1 or encoding.field(body, "repo", str) != repo_id:
        raise encoding.FormatError("a restore request of another repository or format")
    names = encoding.field(body, "objects", list)
    if len(names) > MAX_OBJECTS or not all(isinstance(n, str) and n.startswith("packs/") for n in names):
        raise encoding.FormatError("a restore request for something other than packs")
    if not all(is_hash_name(n) for n in names):
        raise encoding.FormatError("a restore request with a malformed object name")
    return [str(n) for n in names]


def requests_to_send(nd: NodeDir, repo_id: str, link: str, resend_after: float) -> tuple[str, bytes] | None:
    """The request object for the next up bundle over ``link``: every pending request routed
    there that was not sent over it within ``resend_after`` seconds (None: nothing to ask)."""
    due = due_over(journal(nd, repo_id), link, resend_after)
    clients = listings_to_send(nd, repo_id, link, resend_after)
    return make_request(repo_id, due, clients) if due or clients else None


def mark_sent(nd: NodeDir, repo_id: str, link: str, data: bytes) -> None:
    """The request object ``data`` went into a bundle over ``link``."""
    names = set(parse_request(data, repo_id))
    now = time.time()
    with locked_journal(nd, repo_id) as reqs:
        for name in names & set(reqs):
            reqs[name].setdefault("sent", {})[link] = now
    mark_listings_sent(nd, repo_id, link, parse_listings(data))


def answers_owed(nd: NodeDir, repo_id: str, link: str, store: Backend) -> list[str]:
    """The owed objects this node holds now (the others follow once its own requests arrive)."""
    owed: list[str] = read_json(answers_path(nd, repo_id, link), [])
    return [n for n in owed if store.stat(n) is not None]


def answers_sent(nd: NodeDir, repo_id: str, link: str, names: list[str]) -> None:
    """These owed objects went into a down bundle over ``link``."""
    sent = set(names)
    with owed_answers(nd, repo_id, link) as owed:
        owed[:] = [n for n in owed if n not in sent]


def take_request(nd: NodeDir, repo_id: str, link: str, data: bytes, store: Backend) -> dict[str, Any]:
    """A node below asked over ``link`` for objects: owe it those held here (or fetched at once
    from a direct upstream); request the others upstream, to be owed once they arrive."""
    names = parse_request(data, repo_id)
    gone = evicted(nd, repo_id)
    here: list[str] = []
    waiting: list[str] = []
    unknown: list[str] = []
    for name in names:
        if store.stat(name) is not None:
            here.append(name)
        elif name in gone:
            got = request(nd, repo_id, store, name, for_link=link)
            (here if got.data is not None else waiting).append(name)
        else:
            unknown.append(name)  # never held here: its answer cannot come from this node
    queue_answers(nd, repo_id, link, here)
    listed = [request_listing(nd, repo_id, store, client, for_link=link) for client in parse_listings(data)]
    return {
        "owed": len(here),
        "requested": len(waiting),
        "unknown": unknown,
        "listings": sum(r.get("state") == "fetched" for r in listed),
        "listings_requested": sum(r.get("state") == "pending" for r in listed),
    }


def take_answer(nd: NodeDir, repo_id: str, store: Backend, name: str, data: bytes) -> bool:
    """An object came down; keep it if this node requested it (True), else refuse it. A second
    answer to a request already answered (asked again while the first was on its way) is taken
    quietly: the pack is here."""
    state = journal(nd, repo_id).get(name, {}).get("state")
    if state not in ("pending", "fetched") or content_hash(data) != name.split("/", 1)[1]:
        return False
    if state == "pending":
        store.put(name, data, if_absent=True)
        settle(nd, repo_id, {name: ""})
    return True
