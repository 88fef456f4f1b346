"""`bunker node serve`: a node's stores offered to clients over the serve protocol.

The protocol and its safety rules are `bunker serve`'s (node/serve.py). What a node adds:

- the store is chosen per connection: a client names the node directory (the node's only
  repository) or ``<node dir>/<repository id>``; a node's server serves only its node, so any
  other path (an ssh forced command runs it whatever the client asked for) reaches it too, its
  last component choosing a repository when it is one's id;
- clients only back up: they may create packs, index, reference, snapshot and session objects
  and delete their own leases, and store their own certificate when the master key issued it
  after the node was seeded. Configs, retirement and GC records come down from the repository
  of record, where forget, prune, repack, unforget and key changes run; a node
  refuses them with that explanation (docs/hierarchy.md, "Roles");
- a node never creates a repository: it serves one once it was seeded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, ExitCode
from bunker.node.acks import note_session
from bunker.node.eviction import evicted, store_full
from bunker.node.holdings import UpstreamState
from bunker.node.node_dir import REPO_ID, NodeDir, NodeError, split_node_path
from bunker.node.node_settings import node_settings
from bunker.node.quota import QuotaGate
from bunker.node.serve import NodeRole, ServeConfig
from bunker.node.witnessed import statement_for
from bunker.repo.certs import parse_certificate
from bunker.repo.repository import Repository
from bunker.storage.backend import ObjectInfo, validate_name
from bunker.storage.local import LocalBackend

# what a client writes when it backs up (format.md 17); nothing else comes from below
CLIENT_PREFIXES = ("packs", "index", "refs", "snapshots", "sessions", "status")


def _resolver(node: NodeDir) -> Callable[[str | None, bool], str]:
    def resolve(requested: str | None, create: bool) -> str:
        if create:
            raise NodeError(
                f"node {node.name} does not create repositories",
                "create the repository at the top (`bunker init` on the repository of record), export a seed "
                f"there (`bunker node export-seed`) and add it to the node (`bunker node seed {node.root} FILE`)",
                exit_code=ExitCode.USAGE,
            )
        repo_id: str | None = None
        if requested is not None:
            if REPO_ID.fullmatch(requested):
                repo_id = requested
            else:
                found = split_node_path(requested)
                if found is None or os.path.realpath(found[0]) != os.path.realpath(node.root):
                    stores = {os.path.realpath(node.store_path(r)): r for r in node.repositories()}
                    repo_id = stores.get(os.path.realpath(requested))
                    if repo_id is None:
                        # the server is pinned to this node (an ssh forced command runs it whatever
                        # path the client asked for): another path picks at most a repository, by a
                        # last component that is its id; the client checks the id against its key
                        last = os.path.basename(requested.rstrip("/"))
                        repo_id = last if REPO_ID.fullmatch(last) else None
                else:
                    repo_id = found[1]
        if repo_id is None:
            repo_id = node.only_repository()
        node.store(repo_id)  # refuses a repository this node does not relay
        return node.store_path(repo_id)

    return resolve


class _Watch:
    """What the server tells about a store, re-read at most every REREAD seconds (a daemon's
    eviction and imports change it while connections last)."""

    REREAD = 5.0

    def __init__(self, node: NodeDir) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._held: dict[str, tuple[float, dict[str, ObjectInfo]]] = {}
        self._full: dict[str, tuple[float, str]] = {}
        self._recorded: dict[str, tuple[float, dict[str, float]]] = {}

    def _repo(self, store_dir: str) -> str:
        return os.path.basename(store_dir.rstrip("/"))

    def upstream_held(self, store_dir: str) -> dict[str, ObjectInfo]:
        now = time.monotonic()
        with self._lock:
            got = self._held.get(store_dir)
            if got is None or now - got[0] > self.REREAD:
                record = evicted(self.node, self._repo(store_dir))
                infos = {n: ObjectInfo(n, int(str(v["size"])), float(str(v["time"]))) for n, v in record.items()}
                got = (now, infos)
                self._held[store_dir] = got
            return got[1]

    def full(self, store_dir: str) -> str:
        now = time.monotonic()
        with self._lock:
            got = self._full.get(store_dir)
            if got is None or now - got[0] > self.REREAD:
                over = store_full(self.node, self._repo(store_dir))
                bound = node_settings(self.node, self._repo(store_dir)).max_size
                why = (
                    f"node {self.node.name}'s store is {over} bytes over its bound "
                    f"({bound} bytes) with data its upstreams have not recorded yet"
                    if over
                    else ""
                )
                got = (now, why)
                self._full[store_dir] = got
            return got[1]

    def recorded(self, store_dir: str, name: str) -> float:
        """When an upstream first recorded snapshot ``name`` at the repository of record (record
        receipt, or a direct delivery read back); 0.0 when none did yet."""
        now = time.monotonic()
        with self._lock:
            got = self._recorded.get(store_dir)
            if got is None or now - got[0] > self.REREAD:
                repo_id = self._repo(store_dir)
                first: dict[str, float] = {}
                for up in self.node.config.upstreams:
                    if up.kind == "link" or up.repo == repo_id:
                        for n, when in UpstreamState(self.node, repo_id, up.name).recorded.items():
                            if n.startswith("snapshots/"):
                                first[n] = min(when, first.get(n, when))
                got = (now, first)
                self._recorded[store_dir] = got
            return got[1].get(name, 0.0)


def accepts_certificate(store_dir: str, data: bytes) -> bool:
    """Whether ``data`` is a client certificate the master key issued for the repository of
    ``store_dir``. A client certified after its node was seeded brings its certificate (it is in
    its put key) before the next down bundle would: the node stores it as the top holds it, the
    same bytes under the same name. Nothing else of clients/ is taken from below."""
    try:
        repo = Repository.open(LocalBackend(store_dir), os.path.basename(store_dir.rstrip("/")), floor=False)
        parse_certificate(data, repo.config.master_verify, repo.repo_id)
    except (BunkerError, encoding.FormatError):
        return False
    return True


def _fetch(node: NodeDir, store_dir: str, name: str) -> tuple[bytes | None, str, list[str], bool]:
    """A client reads an object this node evicted: request it upstream (node/requests.py).
    (bytes or None, why not, the route, whether it is gone for good)."""
    from bunker.node.requests import request

    nd = NodeDir(node.root)  # (re-read: the daemon may have changed upstreams since the server started)
    repo_id = os.path.basename(store_dir.rstrip("/"))
    got = request(nd, repo_id, nd.store(repo_id), name)
    if got.data is not None:
        from bunker.node.eviction import evict

        evict(nd, repo_id)  # back under the bound: what restores released goes, what they lease stays
    return got.data, got.why, got.route, got.gone


def _requests(node: NodeDir, store_dir: str) -> list[dict[str, Any]]:
    """The store's restore requests as a client sees them (node/requests.py)."""
    from bunker.node.listing import listings
    from bunker.node.requests import journal

    keep = ("state", "since", "route", "tries", "why", "fetched", "snapshots")
    nd, repo_id = NodeDir(node.root), os.path.basename(store_dir.rstrip("/"))
    rows = [{"object": n, **{k: r[k] for k in keep if k in r}} for n, r in sorted(journal(nd, repo_id).items())]
    rows += [{"listing": c, **{k: r[k] for k in keep if k in r}} for c, r in sorted(listings(nd, repo_id).items())]
    return rows


def _listing(node: NodeDir, store_dir: str, client: str) -> dict[str, Any]:
    """A client asks for the snapshots ``client`` wrote anywhere (node/listing.py)."""
    from bunker.node.listing import request_listing

    if len(client) > 200:
        raise BunkerError("a client name of more than 200 characters", "name the client as its certificate does")
    nd = NodeDir(node.root)
    repo_id = os.path.basename(store_dir.rstrip("/"))
    return request_listing(nd, repo_id, nd.store(repo_id), client)


def _lease(node: NodeDir, store_dir: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A restore takes, renews or ends its lease (node/leases.py); packs it released are evicted
    at once where the store is over its bound, so its next batch has room. Returns {until, room}."""
    from bunker.node.eviction import evict, room_for_restore
    from bunker.node.leases import hold

    snapshot, lease_id = fields.get("ls"), fields.get("li")
    seconds, released = fields.get("lt", 600.0), fields.get("lr", [])
    if (
        not isinstance(snapshot, str)
        or not snapshot.startswith("snapshots/")
        or not isinstance(lease_id, str)
        or not 8 <= len(lease_id) <= 64
        or not lease_id.isalnum()
        or not isinstance(seconds, (int, float))
        or not isinstance(released, list)
        or not all(isinstance(p, str) and p.startswith("packs/") for p in released)
    ):
        raise BunkerError("malformed restore lease", "the client is broken: report it with its version")
    validate_name(snapshot)
    for p in released:
        validate_name(p)
    nd = NodeDir(node.root)
    repo_id = os.path.basename(store_dir.rstrip("/"))
    end, done = fields.get("le") is True, fields.get("ld") is True
    until = hold(
        nd,
        repo_id,
        nd.store(repo_id),
        lease_id,
        snapshot,
        seconds=float(seconds),
        released=set(released),
        end=end,
        done=done,
    )
    if released or done:
        evict(nd, repo_id)
    return {"until": until, "room": room_for_restore(nd, repo_id)}


def _report(node: NodeDir, store_dir: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A client that could not run says so; the node signs its status record (node/reports.py)."""
    from bunker.node.reports import report_failure

    cert, code, exit_code = fields.get("fc"), fields.get("fk"), fields.get("fx")
    message, started = fields.get("fm", ""), fields.get("fs", 0.0)
    if (
        not isinstance(cert, str)
        or not cert.startswith("clients/")
        or not isinstance(code, str)
        or type(exit_code) is not int
        or not isinstance(message, str)
        or not isinstance(started, (int, float))
    ):
        raise BunkerError("malformed failure report", "the client is broken: report it with its version")
    validate_name(cert)
    nd = NodeDir(node.root)
    return report_failure(nd, os.path.basename(store_dir.rstrip("/")), cert, code, exit_code, message, float(started))


def node_serve_config(node: NodeDir) -> ServeConfig:
    """The serve configuration of ``node``: append-only, client prefixes only."""
    direct = [u.url for u in node.config.upstreams if u.kind == "direct"]
    where = f" ({direct[0]})" if direct else ""
    watch = _Watch(node)
    role = NodeRole(
        name=node.name,
        resolve=_resolver(node),
        writable=CLIENT_PREFIXES,
        refusal=(
            f"this is node {node.name}, which serves clients append-only; forget, prune, repack, unforget and key "
            f"changes run only on the repository of record{where}"
        ),
        refusal_hint="run that command with --repo naming the repository of record, not the node",
        upstream_held=watch.upstream_held,
        full=watch.full,
        session_event=lambda store_dir, sid: note_session(node, os.path.basename(store_dir.rstrip("/")), sid),
        pack_gate=lambda store: QuotaGate(NodeDir(node.root), store),  # quotas as node.json says now
        recorded=watch.recorded,
        certificate_ok=accepts_certificate,
        statement=lambda store_dir: statement_for(NodeDir(node.root), os.path.basename(store_dir.rstrip("/"))),
        fetch=lambda store_dir, name: _fetch(node, store_dir, name),
        requests=lambda store_dir: _requests(node, store_dir),
        lease=lambda store_dir, fields: _lease(node, store_dir, fields),
        listing=lambda store_dir, client: _listing(node, store_dir, client),
        report=lambda store_dir, fields: _report(node, store_dir, fields),
    )
    return ServeConfig(node.root, append_only=True, node=role)
