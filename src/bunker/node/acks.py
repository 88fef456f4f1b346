"""A node's session acknowledgements (repo/node_acks.py; docs/hierarchy.md, "Garbage collection
across the hierarchy").

The node's server notes every session its clients run (``state/<repository>/sessions/<id>``: the
file's content is when the session's first lease arrived, its modification time when the last
one was written or deleted). For an upstream U the node may acknowledge ``before = X`` where X is
the earliest of: now; the start of every session still alive; and the start of every ended
session during which an object was written that U does not hold yet (its writer may be that
session). Objects that came from nodes below are not this node's sessions: those nodes'
acknowledgements cover them, and this node passes those on only when it holds nothing that U
lacks and stages nothing, so an acknowledgement never overtakes the data it speaks for.
"""

from __future__ import annotations

import contextlib
import os
import time

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.errors import CorruptObject, ObjectMissing
from bunker.node.holdings import SESSION_OUTPUT
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.staleness import records_asof
from bunker.repo.checkpoint_roots import make_checkpoint_root
from bunker.repo.leases import sessions
from bunker.repo.node_acks import make_ack, parse_ack
from bunker.repo.node_certs import trusted_node
from bunker.repo.objects import MAGIC_ACK, MAGIC_CKROOT, MAGIC_GC, MAGIC_MOVED, content_hash
from bunker.repo.repository import Repository
from bunker.storage.backend import Backend, ObjectInfo

WINDOW_SLACK = 5.0  # seconds of clock granularity around a session's window
KEEP_ENDED = 3600.0  # an ended session's note stays this long after it no longer matters


def sessions_dir(nd: NodeDir, repo_id: str) -> str:
    return nd.state_dir(repo_id, "sessions")


def note_session(nd: NodeDir, repo_id: str, session: str) -> None:
    """Called by the node's server for every lease a client writes or deletes."""
    path = os.path.join(sessions_dir(nd, repo_id), session)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        with contextlib.suppress(OSError):
            os.utime(path)
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{time.time()}\n")


def abandon_dir(nd: NodeDir, repo_id: str) -> str:
    """Where node/abandon.py keeps the sessions whose lease it took out of the store."""
    return nd.state_dir(repo_id, "abandon")


def abandoning(nd: NodeDir, repo_id: str) -> dict[str, tuple[float, str]]:
    """Sessions whose lease node/abandon.py took out of the store: session -> (when its first
    lease object was stored, the name of its abandoned root; "" until that is made)."""
    d = abandon_dir(nd, repo_id)
    out: dict[str, tuple[float, str]] = {}
    for leaf in os.listdir(d):
        if leaf.endswith(".json"):
            plan = read_json(os.path.join(d, leaf), None)
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out[str(plan["session"])] = (float(plan["started"]), str(plan.get("root", "")))
    return out


def _windows(nd: NodeDir, repo_id: str) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    d = sessions_dir(nd, repo_id)
    for leaf in os.listdir(d):
        path = os.path.join(d, leaf)
        try:
            with open(path, encoding="ascii") as f:
                start = float(f.read().strip())
            out[leaf] = (start, os.stat(path).st_mtime)
        except (OSError, ValueError):
            continue
    return out


def checkpoint_roots_held(nd: NodeDir, repo_id: str, store: Backend) -> dict[str, str]:
    """For every dead session in the store that left a checkpoint: the name of its checkpoint
    root record (repo/checkpoint_roots.py), made and stored once. session id -> gc/<hex>."""
    now = time.time()
    repo = Repository.open(store, repo_id, floor=False)
    path = os.path.join(nd.state_dir(repo_id), "checkpoint-roots.json")
    made: dict[str, str] = read_json(path, {})
    out: dict[str, str] = {}
    for s in sessions(repo):
        if s.alive(now) or s.checkpoint is None:
            continue
        lease_name = s.names[-1]
        name = made.get(lease_name)
        if name is None or not store.exists(name):
            data = make_checkpoint_root(certified_keys(nd, repo), repo_id, lease_name, store.get(lease_name))
            name = f"gc/{content_hash(data)}"
            store.put(name, data, if_absent=True)
            made[lease_name] = name
        out[s.session] = name
    write_json(path, {k: v for k, v in made.items() if v in out.values()})
    return out


def acknowledged_time(nd: NodeDir, repo_id: str, store: Backend, delivered: set[str] | dict[str, float]) -> float:
    """The ``before`` this node may acknowledge to an upstream that holds ``delivered``."""
    now = time.time()
    repo = Repository.open(store, repo_id, floor=False)
    all_sessions = sessions(repo)
    live = {s.session: s.started for s in all_sessions if s.alive(now)}
    # a dead session's checkpoint is not over until its root went up (or its client adopted it)
    roots = checkpoint_roots_held(nd, repo_id, store)
    live.update(
        {s.session: s.started for s in all_sessions if roots.get(s.session, "") not in delivered and s.session in roots}
    )
    # nor is one whose lease the node took out to give it up, until its abandoned root went up
    live.update({sid: start for sid, (start, root) in abandoning(nd, repo_id).items() if root not in delivered})
    windows = _windows(nd, repo_id)
    # a session that starts before the store holds the top's newest GC records may use a pack the
    # top condemned: nothing after what the store is known to hold can be acknowledged
    x = min([now, records_asof(nd, repo_id), *live.values(), *(w[0] for sid, w in windows.items() if sid in live)])
    pending = [i for p in SESSION_OUTPUT for i in store.list(p) if i.name not in delivered]
    oldest_pending = min((i.mtime for i in pending), default=now)
    for info in pending:
        for sid, (start, last) in windows.items():
            if start - WINDOW_SLACK <= info.mtime <= (now if sid in live else last) + WINDOW_SLACK:
                x = min(x, start)
    # notes of sessions that ended before anything still pending was written matter no more
    for sid, (_start, last) in windows.items():
        if sid not in live and last < oldest_pending - KEEP_ENDED:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(sessions_dir(nd, repo_id), sid))
    return x


def certified_keys(nd: NodeDir, repo: Repository) -> NodeKeys:
    """The node's keys that the repository certified: the current ones, or after a rotation
    whose new certificate has not arrived yet, the previous ones (node/rotation.py)."""
    if trusted_node(repo, nd.keys.node_id) is None:
        prev = nd.previous_keys
        if prev is not None and trusted_node(repo, prev.node_id) is not None:
            return prev
    return nd.keys


def own_ack(
    nd: NodeDir,
    repo_id: str,
    store: Backend,
    delivered: set[str] | dict[str, float],
    keys: NodeKeys | None = None,
) -> tuple[str, bytes]:
    """A fresh acknowledgement of this node for an upstream holding ``delivered``, signed with
    ``keys`` (a link's sending keys) or the keys the repository certified."""
    signer = keys or certified_keys(nd, Repository.open(store, repo_id, floor=False))
    data = make_ack(signer, repo_id, acknowledged_time(nd, repo_id, store, delivered))
    return f"gc/{content_hash(data)}", data


def held_acks(store: Backend) -> dict[str, list[tuple[float, ObjectInfo]]]:
    """node id -> its acknowledgements in ``store`` (before, object), newest first."""
    out: dict[str, list[tuple[float, ObjectInfo]]] = {}
    for info in store.list("gc/"):
        try:
            data = store.get(info.name)
            if not data.startswith(MAGIC_ACK):
                continue
            _, node, before, _, _ = parse_ack(data)
        except (encoding.FormatError, ObjectMissing, CorruptObject):
            continue
        out.setdefault(node, []).append((before, info))
    for acks in out.values():
        acks.sort(key=lambda a: -a[0])
    return out


def acks_to_send(nd: NodeDir, store: Backend, upstream_has: set[str], caught_up: bool) -> list[ObjectInfo]:
    """Checkpoint roots the upstream lacks (any time: they only keep data), then the newest
    acknowledgement of each node below this one that the upstream lacks, when this node holds
    nothing the upstream lacks (``caught_up``); never this node's own (made fresh)."""
    out = []
    for info in store.list("gc/"):
        if info.name in upstream_has:
            continue
        with contextlib.suppress(ObjectMissing):
            if store.get(info.name, 0, 4) == MAGIC_CKROOT:
                out.append(info)
    if not caught_up:
        return out
    prev = nd.previous_keys
    own_ids = {nd.config.node_id, *((prev.node_id,) if prev is not None else ())}
    for node, acks in held_acks(store).items():
        if node in own_ids:
            continue
        newest = acks[0][1]
        if newest.name not in upstream_has:
            out.append(newest)
    return out


def drop_older_acks(nd: NodeDir, store: Backend) -> None:
    """Keep one acknowledgement per node in the store: the newest says all the older ones did."""
    for acks in held_acks(store).values():
        for _, info in acks[1:]:
            store.delete(info.name)


def condemned_since(backend: Backend, since: float) -> bool:
    """Whether ``backend`` holds a condemnation or move record stored after ``since``: one that
    waits for acknowledgements (an acknowledgement without new data is worth sending then)."""
    for info in backend.list("gc/"):
        if info.mtime <= since:
            continue
        with contextlib.suppress(ObjectMissing):
            if backend.get(info.name, 0, 4) in (MAGIC_GC, MAGIC_MOVED):
                return True
    return False
