"""Giving a dead backup's checkpoint up to the top (docs/hierarchy.md, "Garbage collection across
the hierarchy"; docs/format.md section 24, checkpoint roots).

A backup killed on this node leaves its last lease, with a checkpoint, in the node's store. The
client's next run through the node adopts it (an incomplete snapshot); until then the node sends a
checkpoint root up, so the top keeps the checkpoint's packs (node/acks.py). A client that never
runs here again would keep them for ever and its last work would never be listed. Once the lease
is older than the node's ``abandon_after`` (node.json, default 14 days) the node hands the
checkpoint to the top, without ever letting two parties adopt one session:

1. **move**: the session's plan (``state/<repository>/abandon/<session>.json``) and the newest
   lease's bytes (``<session>.lease``) are written, then the lease objects are deleted from the
   store's ``sessions/``; the plan's ``moved`` is a time after the deletion. A client run that
   starts later does not see the lease.
2. **wait**: a client run that started before ``moved`` may have read the lease and be adopting it
   (a run writes its own lease before it looks for dead ones): nothing is decided while a session
   that started before ``moved`` is alive in the store. Nothing is persisted in this step.
3. **decide**: a snapshot in the store that names the session (its own run, or one that adopted
   it) means a client adopted it: the plan and the kept bytes are dropped. Otherwise the node signs
   a checkpoint root with ``abandoned`` set and keeps it as ``<session>.root``, then stores it
   under ``gc/``, where the relays send it up with the other roots; a prune at the top adopts it
   (backup/adoption.py).

A kill at any point leaves a state the next forward completes: a plan without ``moved`` is moved
again (deleting what is left), a kept root is stored again, and a ``.lease`` or ``.root`` without
its plan (killed before the plan was written, or while it was dropped) is removed, the lease then
still being in the store or gone for good. Until the abandoned root is upstream, the node's
acknowledgements count the session as running (node/acks.py ``abandoning``), as for a plain root.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.node.acks import WINDOW_SLACK, abandon_dir, certified_keys
from bunker.node.node_dir import NodeDir, read_json, remove_quietly, write_json
from bunker.private_files import write_private_file
from bunker.repo.checkpoint_roots import make_checkpoint_root
from bunker.repo.leases import Session, sessions
from bunker.repo.objects import content_hash
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import Backend

SESSION_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
WAITING, ABANDONED, ADOPTED = "waiting", "abandoned", "adopted-by-client"


@dataclass
class Abandonment:
    """What one forward did with a dead session's checkpoint."""

    repo_id: str
    session: str
    client: str  # as the lease names it
    lease: str  # sessions/<session>.<counter>
    state: str  # WAITING (moved out of the store) | ABANDONED | ADOPTED
    root: str = ""  # gc/<hex> of the abandoned root
    running: int = 0  # sessions that started before the move and still run

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": self.repo_id,
            "session": self.session,
            "client": self.client,
            "lease": self.lease,
            "state": self.state,
            "root": self.root,
            "running": self.running,
        }

    def message(self, node: str) -> str:
        what = f"the last checkpoint of a dead backup of client {self.client!r} ({self.lease})"
        if self.state == ABANDONED:
            return (
                f"{what} waited longer than abandon_after on node {node} without its client adopting it: the node "
                f"signed it abandoned ({self.root}) and sends it up; the next `bunker prune` at the repository of "
                "record adopts it as an incomplete snapshot listed under that client"
            )
        if self.state == ADOPTED:
            return f"{what} was adopted by a run of its client on node {node}; nothing is given up"
        return (
            f"{what} is out of node {node}'s store (older than abandon_after); it is given up to the repository "
            f"of record once {self.running} backup(s) that started before that have ended (a later "
            "`bunker node forward` does it)"
        )


def abandon_dead_checkpoints(nd: NodeDir, repo_id: str) -> list[Abandonment]:
    """Carry every dead session's checkpoint older than ``abandon_after`` in ``repo_id``'s store
    through the steps above, as far as they go now. Returns what changed or still waits."""
    store = nd.store(repo_id)
    d = abandon_dir(nd, repo_id)
    _drop_orphans(d)
    repo = Repository.open(store, repo_id, floor=False)
    now = time.time()
    plans = {p["session"]: p for p in _plans(d)}
    out: dict[str, Abandonment] = {}
    for s in sessions(repo):
        plan = plans.get(s.session)
        if plan is not None:  # killed before the move was done, or a copy of the lease put back
            _move(store, d, plan)
            continue
        if s.checkpoint is None or s.alive(now) or now - s.refreshed < nd.config.abandon_after:
            continue
        if not SESSION_ID.fullmatch(s.session):
            continue  # not a name this node makes files of (the node's server allows none such)
        plans[s.session] = _plan(store, d, s)
        _move(store, d, plans[s.session])
    for plan in plans.values():
        if not plan.get("moved"):
            _move(store, d, plan)  # its lease objects were all gone already
    undecided = [p for p in plans.values() if not p.get("root")]
    if undecided:
        running = [s for s in sessions(repo) if s.alive(time.time())]
        named: set[str] | None = None
        for plan in undecided:
            before = [s for s in running if s.session != plan["session"] and s.started <= plan["moved"] + WINDOW_SLACK]
            if before:
                out[plan["session"]] = _row(repo_id, plan, WAITING, running=len(before))
                continue
            if named is None:
                named = _named_sessions(store)
            if plan["session"] in named:
                _drop(d, plan["session"])
                out[plan["session"]] = _row(repo_id, plan, ADOPTED)
                continue
            _abandon(nd, repo, d, plan)
            out[plan["session"]] = _row(repo_id, plan, ABANDONED)
    for plan in plans.values():
        if plan.get("root") and not store.exists(plan["root"]):
            with contextlib.suppress(FileNotFoundError), open(os.path.join(d, f"{plan['session']}.root"), "rb") as f:
                store.put(plan["root"], f.read(), if_absent=True)
    return list(out.values())


def _row(repo_id: str, plan: dict[str, Any], state: str, running: int = 0) -> Abandonment:
    return Abandonment(
        repo_id, plan["session"], str(plan.get("client", "")), plan["lease_name"], state, plan.get("root", ""), running
    )


def _plans(d: str) -> list[dict[str, Any]]:
    out = []
    for leaf in sorted(os.listdir(d)):
        if not leaf.endswith(".json"):
            continue
        plan = read_json(os.path.join(d, leaf), None)
        if isinstance(plan, dict) and plan.get("session") == leaf[: -len(".json")]:
            out.append(plan)
    return out


def _drop_orphans(d: str) -> None:
    """A kept lease or root without its plan: left by a kill before the plan was written (the
    lease is still in the store: the session is taken up again) or while it was dropped."""
    plans = {leaf[: -len(".json")] for leaf in os.listdir(d) if leaf.endswith(".json")}
    for leaf in os.listdir(d):
        sid, dot, ext = leaf.rpartition(".")
        if dot and ext in ("lease", "root") and sid not in plans:
            remove_quietly(os.path.join(d, leaf))


def _plan(store: Backend, d: str, s: Session) -> dict[str, Any]:
    """Step 1, first half: the lease's bytes and the plan, persisted before anything is deleted."""
    lease_name = s.names[-1]
    write_private_file(os.path.join(d, f"{s.session}.lease"), store.get(lease_name))
    plan = {
        "session": s.session,
        "lease_name": lease_name,
        "client": s.client,
        "cert": s.cert,
        "started": s.started,
        "refreshed": s.refreshed,
        "moved": 0.0,
        "root": "",
    }
    write_json(os.path.join(d, f"{s.session}.json"), plan)
    return plan


def _move(store: Backend, d: str, plan: dict[str, Any]) -> None:
    """Step 1, second half: delete every lease object of the session (newest first: the newest
    carries the checkpoint), then note when. Also removes a copy of the lease put back later."""
    prefix = f"sessions/{plan['session']}."
    names = sorted(
        (i.name for i in store.list("sessions/") if i.name.startswith(prefix)),
        key=lambda n: int(n.rpartition(".")[2]) if n.rpartition(".")[2].isdigit() else -1,
        reverse=True,
    )
    for n in names:
        store.delete(n)
    if not plan.get("moved"):
        plan["moved"] = time.time()
        write_json(os.path.join(d, f"{plan['session']}.json"), plan)


def _named_sessions(store: Backend) -> set[str]:
    """Sessions a snapshot in the store names: its own run's, or the one it adopted. Any snapshot
    counts, trusted or not: a client's claim is enough for this node not to give the session up."""
    out: set[str] = set()
    for info in store.list("snapshots/"):
        try:
            env = parse_snapshot(store.get(info.name)).env
        except (encoding.FormatError, CorruptObject, ObjectMissing):
            continue
        out.update(sid for sid in (env.session, env.adopted.session if env.adopted else "") if sid)
    return out


def _drop(d: str, session: str) -> None:
    """A client adopted the session: the plan goes first (a kill then leaves orphans, removed)."""
    for ext in ("json", "lease", "root"):
        remove_quietly(os.path.join(d, f"{session}.{ext}"))


def _abandon(nd: NodeDir, repo: Repository, d: str, plan: dict[str, Any]) -> None:
    """Step 3: the abandoned root, kept in state before it is stored (a kill between the two
    stores the same record next time, never a second one)."""
    sid = plan["session"]
    root_path = os.path.join(d, f"{sid}.root")
    try:
        with open(root_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        with open(os.path.join(d, f"{sid}.lease"), "rb") as f:
            lease = f.read()
        data = make_checkpoint_root(certified_keys(nd, repo), repo.repo_id, plan["lease_name"], lease, abandoned=True)
        write_private_file(root_path, data)
    name = f"gc/{content_hash(data)}"
    repo.backend.put(name, data, if_absent=True)
    plan["root"] = name
    write_json(os.path.join(d, f"{sid}.json"), plan)


def abandon_all(nd: NodeDir) -> tuple[list[Abandonment], list[tuple[str, str, str]]]:
    """abandon_dead_checkpoints for every repository the node relays; a failure is a problem of
    that repository (level, code, message), never a reason to stop forwarding."""
    done: list[Abandonment] = []
    problems: list[tuple[str, str, str]] = []
    for repo_id in nd.repositories():
        try:
            done += abandon_dead_checkpoints(nd, repo_id)
        except (BunkerError, OSError, ValueError) as exc:
            if isinstance(exc, BunkerError):
                msg = exc.message
            elif isinstance(exc, OSError):
                msg = f"{exc.strerror or exc} ({exc.filename})"
            else:  # a damaged plan under state/
                msg = f"a damaged state file: {exc}"
            problems.append(
                (
                    "warn",
                    "abandon-failed",
                    f"node {nd.name} could not give up dead backups' checkpoints of repository {repo_id[:16]} "
                    f"({msg}); they stay kept (their packs are not deleted at the top) and the next "
                    "`bunker node forward` tries again",
                )
            )
    return done, problems
