"""Restore requests (docs/hierarchy.md, "Restore requests"): a client reads an object this node
evicted under record receipts; the node asks its upstreams for it instead of failing.

Each request is kept in ``state/<repository>/requests.json`` (name -> when first asked, its
route, tries, state) before anything is fetched, so a node killed meanwhile still knows it. A
direct upstream is asked at once, while the client waits: the object is read there, checked
against its name, stored again and served. A request no upstream could answer stays *pending*
and is tried again by every `bunker node forward` (and the daemon's rounds), with backoff; the
client is told its data was requested and reruns the restore once it has arrived.

An object fetched for a request is pinned, with every pack of the snapshots this node holds
whose pack sets name it: eviction leaves them for ``PIN_SECONDS`` after the request was last
made, so the restore's rerun finds the whole set here (a pack it did not need to request is not
evicted to make room for one that arrived). A restore that ends, or a batch of a restore larger
than the store that is done, releases its packs at once (node/leases.py, ``release``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, ObjectMissing
from bunker.node.holdings import snapshot_packs
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.repo.objects import matches_name
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import Backend
from bunker.storage.url import open_backend

PIN_SECONDS = 24 * 3600.0
FIRST_RETRY = 60.0  # a pending request is tried again after this, doubling up to MAX_RETRY
MAX_RETRY = 3600.0
KEEP_ANSWERED = 7 * 86400.0  # answered requests stay listed this long

_threads = threading.Lock()  # threads of one server; the flock keeps processes apart


def _path(nd: NodeDir, repo_id: str) -> str:
    return os.path.join(nd.state_dir(repo_id), "requests.json")


@contextlib.contextmanager
def _held(lock_file: str) -> Iterator[None]:
    """Hold ``lock_file`` against the node's other processes and this one's other threads (never
    nested: each lock guards one state file)."""
    with _threads:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked_state(nd: NodeDir, repo_id: str, what: str) -> Iterator[None]:
    """Hold the lock of state file ``what`` of ``repo_id`` (node/leases.py)."""
    with _held(os.path.join(nd.state_dir(repo_id), f"{what}.lock")):
        yield


@contextlib.contextmanager
def locked_journal(nd: NodeDir, repo_id: str) -> Iterator[dict[str, dict[str, Any]]]:
    """The journal, held: the node's servers, imports, forwards and daemon each read-modify-write
    it; what the block changed is saved when it ends."""
    with _held(os.path.join(nd.state_dir(repo_id), "requests.lock")):
        reqs = journal(nd, repo_id)
        yield reqs
        write_json(_path(nd, repo_id), reqs)


def answers_path(nd: NodeDir, repo_id: str, link: str) -> str:
    return os.path.join(nd.state_dir(repo_id, "down", link), "answers.json")


@contextlib.contextmanager
def owed_answers(nd: NodeDir, repo_id: str, link: str) -> Iterator[list[str]]:
    """What the node below ``link`` is owed (node/request_link.py), held: a server's request
    adds to it while a forward's down bundle takes from it; changes are saved when it ends."""
    path = answers_path(nd, repo_id, link)
    with _held(path + ".lock"):
        owed: list[str] = read_json(path, [])
        yield owed
        write_json(path, sorted(set(owed)))


def queue_answers(nd: NodeDir, repo_id: str, link: str, names: list[str]) -> None:
    """Owe the node below ``link`` these objects: its next down bundle carries them."""
    if names:
        with owed_answers(nd, repo_id, link) as owed:
            owed.extend(names)


def journal(nd: NodeDir, repo_id: str) -> dict[str, dict[str, Any]]:
    """name -> {since, route, tries, next, state ("pending" | "fetched"), fetched, last_asked, why,
    for (links of nodes below that asked), sent (link -> when it went up in a bundle)}."""
    got: dict[str, dict[str, Any]] = read_json(_path(nd, repo_id), {})
    return got


def _sets_path(nd: NodeDir, repo_id: str) -> str:
    return os.path.join(nd.state_dir(repo_id), "pinned-sets.json")


def pinned(nd: NodeDir, repo_id: str, now: float | None = None) -> set[str]:
    """Objects eviction must leave: those fetched for a request, and every pack of a snapshot a
    request was for, while asked for within PIN_SECONDS (a restore reads the whole set: a pack it
    did not need to request must not be evicted to make room for one it did)."""
    now = time.time() if now is None else now
    out = {
        n
        for n, r in journal(nd, repo_id).items()
        if r.get("state") in ("fetched", "pending")
        and not r.get("released")
        and now - float(r.get("last_asked", 0.0)) < PIN_SECONDS
    }
    sets: dict[str, dict[str, Any]] = read_json(_sets_path(nd, repo_id), {})
    for entry in sets.values():
        if now - float(entry.get("time", 0.0)) < PIN_SECONDS:
            out.update(entry.get("packs", []))
    return out


def _pin_sets_with(nd: NodeDir, repo_id: str, store: Backend, name: str, now: float) -> None:
    """Pin the pack sets of the snapshots this node holds that name ``name`` (read keylessly)."""
    path = _sets_path(nd, repo_id)
    sets: dict[str, dict[str, Any]] = read_json(path, {})
    sets = {s: e for s, e in sets.items() if now - float(e.get("time", 0.0)) < PIN_SECONDS}
    if any(name in e.get("packs", []) for e in sets.values()):
        for e in sets.values():
            if name in e.get("packs", []):
                e["time"] = now
        write_json(path, sets)
        return
    for info in store.list("snapshots/"):
        try:
            packs = snapshot_packs(parse_snapshot(store.get(info.name)).env, store.get)
        except (BunkerError, encoding.FormatError):
            continue  # unreadable here: nothing to pin for it
        if name in packs:
            sets[info.name] = {"time": now, "packs": packs}
    write_json(path, sets)


def release(nd: NodeDir, repo_id: str, names: set[str]) -> None:
    """The restore that needed ``names`` is done with them (it ended, or restored the batch
    they were fetched for): they are no longer pinned for it, and eviction may take them back."""
    if not names:
        return
    now = time.time()
    with locked_journal(nd, repo_id) as reqs:
        for name in names & reqs.keys():
            if reqs[name].get("state") == "fetched":
                reqs[name]["released"] = now
        path = _sets_path(nd, repo_id)
        sets: dict[str, dict[str, Any]] = read_json(path, {})
        for entry in sets.values():
            entry["packs"] = [p for p in entry.get("packs", []) if p not in names]
        write_json(path, {s: e for s, e in sets.items() if e["packs"]})


def direct_upstreams(nd: NodeDir, repo_id: str) -> list[tuple[str, str]]:
    """(name, url) of the node's direct upstreams for ``repo_id``."""
    return [(u.name, u.url) for u in nd.config.upstreams if u.kind == "direct" and u.repo == repo_id]


def upstream_route(nd: NodeDir, repo_id: str) -> list[str]:
    """The upstreams a request for ``repo_id`` goes to: its direct upstreams and every link."""
    return [u.name for u in nd.config.upstreams if u.kind == "link" or u.repo == repo_id]


class _Upstreams:
    """The node's direct upstreams for one repository, each opened once when first asked."""

    def __init__(self, nd: NodeDir, repo_id: str) -> None:
        self._urls = direct_upstreams(nd, repo_id)
        self._open: dict[str, Backend] = {}

    def fetch(self, name: str) -> tuple[bytes | None, str]:
        """The object's bytes from the first direct upstream that holds them intact, or why not."""
        why = "this node has no direct upstream for the repository: the request waits for a link"
        for up, url in self._urls:
            try:
                if up not in self._open:
                    self._open[up] = open_backend(url)
                data = self._open[up].get(name)
            except ObjectMissing:
                why = f"upstream {up!r} does not hold it (pruned there, or not delivered yet)"
                continue
            except (BunkerError, OSError) as exc:
                why = f"upstream {up!r} cannot be read: {exc.message if isinstance(exc, BunkerError) else exc}"
                continue
            if not matches_name(name, data):
                why = f"upstream {up!r} returned bytes that do not match the name (damaged there)"
                continue
            return data, ""
        return None, why


@dataclass
class Answer:
    data: bytes | None  # the object, when it could be fetched now
    why: str  # why not (the request stays pending, or ends when ``gone``)
    route: list[str]
    gone: bool = False  # a signed record says the repository of record deleted it: the request ends


def deleted_by(store: Backend, repo_id: str, name: str) -> str:
    """Why ``name`` is gone for good ("" when nothing says so): a condemnation record signed by
    the master key or a prune-capable client (they come down with the other records) names it;
    no snapshot that is not forgotten needs it, and prune deletes it at the top."""
    from bunker.repo.condemnations import condemnations
    from bunker.repo.repository import Repository

    leaf = name.split("/", 1)[1]
    try:
        repo = Repository.open(store, repo_id, floor=False)
        for c in condemnations(repo):
            if leaf in c.packs:
                return (
                    f"the repository of record condemned it ({c.name}, a signed record): the snapshots that needed it "
                    "were forgotten, and prune deletes it there"
                )
    except (BunkerError, encoding.FormatError):
        return ""
    return ""


def request(nd: NodeDir, repo_id: str, store: Backend, name: str, for_link: str = "") -> Answer:
    """A client (or, ``for_link``, the node below that link) reads ``name``, which this node
    evicted: record the request, ask the direct upstreams at once, store what arrives. Returns
    the bytes, or why the request waits (it then goes up the links in the route)."""
    now = time.time()
    route = upstream_route(nd, repo_id)
    with locked_journal(nd, repo_id) as reqs:  # persisted before anything is fetched
        _pin_sets_with(nd, repo_id, store, name, now)
        r = reqs.get(name)
        if r is None or r.get("state") != "pending":
            r = reqs[name] = {"since": now, "route": route, "tries": 0, "next": 0.0, "state": "pending", "for": []}
        r["last_asked"] = now
        r.pop("released", None)  # asked again after a restore released it: pinned again
        if for_link and for_link not in r.setdefault("for", []):
            r["for"].append(for_link)
    data, why, gone = _ask(_Upstreams(nd, repo_id), store, repo_id, name)
    settle(nd, repo_id, {name: why}, ended={name: gone} if gone else None)
    return Answer(data, gone or why, route, gone=bool(gone))


def _ask(upstreams: _Upstreams, store: Backend, repo_id: str, name: str) -> tuple[bytes | None, str, str]:
    """Fetch ``name`` from the direct upstreams into ``store``: (its bytes or None, why it waits,
    why it is gone for good)."""
    data, why = upstreams.fetch(name)
    if data is not None:
        store.put(name, data, if_absent=True)
        return data, "", ""
    return None, why, deleted_by(store, repo_id, name)


def next_try(tries: int, now: float) -> float:
    """When a request tried ``tries`` times is tried again: FIRST_RETRY, doubling up to MAX_RETRY."""
    return now + min(MAX_RETRY, FIRST_RETRY * 2.0 ** min(tries - 1, 12))


def due_over(entries: dict[str, dict[str, Any]], link: str, resend_after: float) -> list[str]:
    """The pending entries (requests, listings) routed over ``link`` that did not go up it
    within ``resend_after`` seconds: they ride the next up bundle."""
    now = time.time()
    return sorted(
        key
        for key, r in entries.items()
        if r.get("state") == "pending"
        and link in r.get("route", [])
        and now - float(r.get("sent", {}).get(link, 0.0)) >= resend_after
    )


def settle(nd: NodeDir, repo_id: str, outcomes: dict[str, str], ended: dict[str, str] | None = None) -> None:
    """Record each request's outcome ("": fetched, else why it waits; ``ended``: why it ends,
    the object gone for good); what nodes below asked for and arrived is owed to them."""
    now = time.time()
    owe: dict[str, list[str]] = {}
    with locked_journal(nd, repo_id) as reqs:
        for name, why in outcomes.items():
            r = reqs.get(name)
            if r is None:
                continue
            r["tries"] = int(r.get("tries", 0)) + 1
            if ended and name in ended:
                r.update(state="gone", why=ended[name], ended=now)
            elif why:
                r["why"] = why
                r["next"] = next_try(int(r["tries"]), now)
            else:
                r.update(state="fetched", fetched=now, why="")
                for link in r.get("for", []):
                    owe.setdefault(link, []).append(name)
        for name in [n for n, r in reqs.items() if r.get("state") in ("fetched", "gone")]:
            if now - float(reqs[name].get("last_asked", 0.0)) > KEEP_ANSWERED:
                del reqs[name]
    for link, names in owe.items():
        queue_answers(nd, repo_id, link, names)


def retry_pending(nd: NodeDir, repo_id: str, *, force: bool = False) -> tuple[int, int]:
    """Try the pending requests whose backoff has passed (all with ``force``) at the direct
    upstreams; returns (fetched, still pending)."""
    now = time.time()
    due = [n for n, r in journal(nd, repo_id).items() if r.get("state") == "pending" and (force or r["next"] <= now)]
    if not due:
        return 0, sum(r.get("state") == "pending" for r in journal(nd, repo_id).values())
    store = nd.store(repo_id)
    upstreams = _Upstreams(nd, repo_id)
    outcomes: dict[str, str] = {}
    ended: dict[str, str] = {}
    for name in due:
        if store.stat(name) is not None:
            outcomes[name] = ""  # it came down another way meanwhile
            continue
        _, outcomes[name], gone = _ask(upstreams, store, repo_id, name)
        if gone:
            ended[name] = gone
    settle(nd, repo_id, outcomes, ended)
    pending = sum(r.get("state") == "pending" for r in journal(nd, repo_id).values())
    return sum(1 for w in outcomes.values() if not w), pending


def retry_all(nd: NodeDir, *, force: bool = False) -> dict[str, tuple[int, int]]:
    """``retry_pending`` in every repository this node relays that has requests: repository ->
    (fetched, still pending)."""
    from bunker.node.listing import listings, retry_listings

    out = {}
    for repo_id in nd.repositories():
        got = retry_pending(nd, repo_id, force=force) if os.path.exists(_path(nd, repo_id)) else (0, 0)
        if listings(nd, repo_id):  # listing requests (node/listing.py) are retried alike
            more = retry_listings(nd, repo_id, force=force)
            got = (got[0] + more[0], got[1] + more[1])
        if got != (0, 0) or os.path.exists(_path(nd, repo_id)):
            out[repo_id] = got
    return out


def describe_retries(results: dict[str, tuple[int, int]]) -> list[str]:
    """Lines for people: what the retries fetched, what still waits."""
    lines = []
    for repo_id, (fetched, pending) in results.items():
        if fetched or pending:
            lines.append(
                f"restore requests in repository {repo_id[:16]}: {fetched} object(s) fetched from upstream, "
                f"{pending} still pending"
            )
    return lines
