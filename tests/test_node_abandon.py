"""A dead backup's checkpoint that its client never adopts on the node (docs/hierarchy.md, "Garbage
collection across the hierarchy"): once its lease is older than the node's abandon_after, the node
takes the lease out of its store, waits for every session that was running then, and, when no
client adopted it meanwhile, sends up a checkpoint root signed "abandoned"; a prune at the
repository of record adopts that checkpoint into an incomplete snapshot listed under the client.
A plain root is never adopted at the top; a forged flag adopts nothing; nobody adopts twice.

Real killed backups (SIGKILL after a checkpoint, as in test_checkpoint.py) into a node with a
direct upstream; lease ages are the store's own object times, set with utime (as in
test_adopt_by_prune.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.node.acks import abandon_dir
from bunker.node.node_dir import NodeDir
from bunker.repo.checkpoint_roots import make_checkpoint_root, read_checkpoint_root
from bunker.repo.leases import sessions
from bunker.repo.objects import MAGIC_CKROOT, content_hash
from bunker.repo.records import parse_lease
from bunker.repo.refs import read_set
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.local import LocalBackend
from helpers import BUNKER, Repo, init_repo, js, kill_run_when, make_env, restored_path
from test_checkpoint import _tree, checkpointed_in, tree_with_tail, unindexed_checkpoint_chunks
from test_node import backup_into, make_node, node_cmd

DAY = 86400.0
FILES = 60


def _leases(store: Path) -> list[Path]:
    d = store / "sessions"
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def _kill_into_node(top: Repo, node: Path, src: Path) -> str:
    """A backup into ``node`` (forked node server) killed once a checkpoint covers a file, as
    test_checkpoint.py ``_kill_after_checkpoint`` does with a repository. Returns its session."""
    store = node / "store" / top.id
    ended, stderr = kill_run_when(
        "backup",
        "--repo",
        node,
        "--no-progress",
        "--checkpoint-interval",
        "0.2s",
        src,
        env=top.env,
        reached=lambda: checkpointed_in(store) >= 1,
        paced=True,
    )
    assert not (store / "snapshots").is_dir() or not any((store / "snapshots").iterdir()), (
        f"the backup finished (exit {ended}): {stderr}"
    )
    assert checkpointed_in(store) >= 1
    assert unindexed_checkpoint_chunks(store, top.put_key) == 0
    (first,) = [p.name for p in _leases(store) if p.name.endswith(".0")]
    return first.rsplit(".", 1)[0]


def _age(store: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in _leases(store):
        os.utime(p, (t, t))


def _setup(tmp_path: Path, **node_opts: str) -> tuple[Repo, Path, Path, Path, str]:
    """top, office (direct upstream top), the source tree, office's store, the killed session."""
    top = init_repo(tmp_path / "top")
    office = make_node(top, tmp_path / "office", "office", **node_opts)
    node_cmd(top, "upstream", "add", office, "top", "--direct", top.path)
    src = tmp_path / "src"
    tree_with_tail(src)
    session = _kill_into_node(top, office, src)
    return top, office, src, office / "store" / top.id, session


def _forward(top: Repo, office: Path) -> dict[str, Any]:
    doc: dict[str, Any] = js(node_cmd(top, "forward", office, "--json"))
    return doc


def _pruner(top: Repo, tmp_path: Path) -> Path:
    key = tmp_path / "pruner.put"
    top.ok("key", "new-client", "pruner", "--prune", "--out", key)
    return key


def _prune(top: Repo, pruner: Path, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = js(top.ok("prune", "--put-key", pruner, "--grace", "0s", "--json", *args))
    return doc


def _roots(where: Path) -> dict[str, bool]:
    """gc/ name -> abandoned, of every checkpoint root under ``where`` (read without verifying)."""
    out = {}
    for p in (where / "gc").iterdir() if (where / "gc").is_dir() else ():
        data = p.read_bytes()
        if data[:4] == MAGIC_CKROOT:
            body = encoding.unpack(encoding.unpack(data[4:])["body"])
            out[f"gc/{p.name}"] = body.get("abandoned", False)
    return out


def _naming(top: Repo, session: str) -> list[str]:
    """The snapshots at the top whose envelope names ``session`` (its own run, or adopted)."""
    out = []
    for p in top.objects("snapshots"):
        env = parse_snapshot(p.read_bytes()).env
        if session in (env.session, env.adopted.session if env.adopted else ""):
            out.append(p.name)
    return out


def _checkpoint_packs(top: Repo, lease: bytes) -> set[str]:
    packset = parse_lease(lease)[0]["checkpoint"]["packset"]
    return {f"packs/{p}" for p in read_set(packset, lambda n: (top.path / n).read_bytes())}


def test_a_checkpoint_its_client_never_adopts_is_given_up_and_adopted_at_the_top(tmp_path: Path) -> None:
    top, office, src, store, session = _setup(tmp_path)
    assert NodeDir(str(office)).config.abandon_after == 14 * DAY  # the default
    lease_bytes = {p.name: p.read_bytes() for p in _leases(store)}
    _age(store, 2 * 3600)  # dead for two hours: far from abandon_after

    # the plain root goes up; the top's prune keeps the checkpoint's packs but adopts nothing
    fwd = _forward(top, office)
    assert fwd["abandoned"] == [] and fwd["problems"] == []
    assert list(_roots(top.path).values()) == [False]
    newest = max(lease_bytes, key=lambda n: int(n.rsplit(".", 1)[1]))
    packs = _checkpoint_packs(top, lease_bytes[newest])
    assert packs and all((top.path / n).exists() for n in packs), "the checkpoint's packs went up"
    pruner = _pruner(top, tmp_path)
    for _ in range(2):
        doc = _prune(top, pruner)
        assert doc["checkpoints_adopted"] == 0 and doc["adopted"] == [], doc["adopted"]
        assert doc["checkpoints_not_adopted"] == []
    assert all((top.path / n).exists() for n in packs), "a prune at the top deleted the checkpoint's packs"
    assert top.objects("snapshots") == []
    assert {p.name for p in _leases(store)} == set(lease_bytes), "moved before abandon_after"

    # older than abandon_after: the next forward moves the lease out, signs it abandoned, sends it up
    _age(store, 15 * DAY)
    fwd = _forward(top, office)
    (ab,) = fwd["abandoned"]
    assert ab["session"] == session and ab["state"] == "abandoned" and ab["lease"] == f"sessions/{newest}"
    assert ab["root"].startswith("gc/")
    assert _leases(store) == [], "the lease is still where a client run would adopt it"
    kept = Path(abandon_dir(NodeDir(str(office)), top.id))
    assert (kept / f"{session}.lease").read_bytes() == lease_bytes[newest]
    assert _roots(store)[ab["root"]] is True and _roots(top.path)[ab["root"]] is True
    r = Repository.open(LocalBackend(str(top.path)))
    root = read_checkpoint_root(r, ab["root"], (top.path / ab["root"]).read_bytes())
    assert root.abandoned and root.session == session and root.node_name == "office"

    # killed after the root was kept in state and before it was stored: the next forward stores
    # the same record, never a second one
    plan_path = kept / f"{session}.json"
    plan = json.loads(plan_path.read_text())
    plan_path.write_text(json.dumps({**plan, "root": ""}))
    (store / ab["root"]).unlink()
    again = _forward(top, office)
    assert [(a["state"], a["root"]) for a in again["abandoned"]] == [("abandoned", ab["root"])]
    assert [n for n, a in _roots(store).items() if a] == [ab["root"]]
    assert [n for n, a in _roots(top.path).items() if a] == [ab["root"]]

    # the top's prune adopts it, says from which node, and the roots are spent
    human = top.ok("prune", "--put-key", pruner, "--grace", "0s", "--dry-run").stdout
    assert "would adopt the last checkpoint" in human and "given up by node 'office'" in human, human
    doc = _prune(top, pruner)
    assert doc["checkpoints_adopted"] == 1, doc
    (adopted,) = doc["adopted"]
    assert adopted["session"] == session and adopted["client"] == top.client and adopted["node"] == "office"
    assert ab["root"] in adopted["roots"]
    snap_id = adopted["snapshot"].split("/", 1)[1]
    assert _roots(top.path) == {}, "the spent roots stay"
    assert _naming(top, session) == [snap_id]
    rows = {s["id"]: s for s in js(top.ok("snapshots", "--json", "--client", top.client))["snapshots"]}
    assert rows[snap_id]["complete"] is False and rows[snap_id]["trusted"] is True
    assert rows[snap_id]["adopted"]["by"] == "pruner" and rows[snap_id]["adopted"]["session"] == session

    # it restores the files the checkpoint covered, byte-identical
    target = tmp_path / "t"
    rdoc = js(top.ok("restore", snap_id, "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    restored = restored_path(target, src)
    got = list(restored.rglob("*.bin"))
    # (on a loaded machine the checkpoint may have come after the walk read every file)
    assert 0 < len(got) <= FILES
    for p in got:
        assert p.read_bytes() == (src / p.relative_to(restored)).read_bytes(), p

    # the client comes back through office: nothing adopts the session again
    back = backup_into(top, office, src)
    assert not any(e["code"] == "incomplete-snapshot" for e in back["events"]), back["events"]
    fwd = _forward(top, office)
    assert fwd["abandoned"] == [] and fwd["problems"] == []
    doc = _prune(top, pruner)
    assert doc["adopted"] == [] and doc["checkpoints_not_adopted"] == []
    assert _naming(top, session) == [snap_id], "a second envelope names the session"
    assert _roots(top.path) == {}, "a removed root was sent up again"
    assert js(top.ok("check", "--read-data", "--json"))["ok"] is True


def test_a_session_running_when_the_lease_is_moved_delays_the_abandoned_record(tmp_path: Path) -> None:
    top = init_repo(tmp_path / "top")
    other_key = tmp_path / "other.put"
    top.ok("key", "new-client", "other", "--out", other_key)
    other_env = make_env(tmp_path / "other-home", BUNKER_PUT_KEY=str(other_key), BUNKER_PROGRESS="never")
    office = make_node(top, tmp_path / "office", "office", abandon_after="1h")
    assert NodeDir(str(office)).config.abandon_after == 3600
    node_cmd(top, "upstream", "add", office, "top", "--direct", top.path)
    src = tmp_path / "src"
    tree_with_tail(src)
    session = _kill_into_node(top, office, src)
    store = office / "store" / top.id
    _age(store, 2 * 3600)

    # another client's backup runs on office (held mid-run): it started before the lease is moved,
    # so it might have read it; nothing is decided until it has ended
    big = tmp_path / "big"
    _tree(big, dirs=1, files=3, size=16 << 20)
    before = {p.name for p in _leases(store)}
    running = subprocess.Popen(
        [BUNKER, "backup", str(big), "--json", "--repo", str(office)],
        env=other_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not {p.name for p in _leases(store)} - before:
        assert time.monotonic() < deadline and running.poll() is None, "the other backup's lease"
        time.sleep(0.02)
    os.killpg(running.pid, signal.SIGSTOP)
    try:
        fwd = _forward(top, office)
        (ab,) = fwd["abandoned"]
        assert ab["session"] == session and ab["state"] == "waiting" and ab["running"] == 1, ab
        assert not any(p.name.startswith(session) for p in _leases(store)), "the lease was not moved"
        assert not any(_roots(store).values()) and not any(_roots(top.path).values()), "abandoned too early"
        notes = [p["message"] for p in fwd["problems"] if p["code"] == "checkpoint-waiting"]
        assert notes and "once 1 backup(s) that started before that have ended" in notes[0]
        again = _forward(top, office)
        assert [a["state"] for a in again["abandoned"]] == ["waiting"] and not any(_roots(store).values())
    finally:
        os.killpg(running.pid, signal.SIGCONT)
    out, err = running.communicate(timeout=300)
    assert running.returncode in (0, 1), err.decode()

    # it has ended: the next forward gives the checkpoint up, and the top adopts it
    fwd = _forward(top, office)
    assert [(a["session"], a["state"]) for a in fwd["abandoned"]] == [(session, "abandoned")]
    assert list(_roots(top.path).values()).count(True) == 1
    doc = _prune(top, _pruner(top, tmp_path))
    assert [(a["session"], a["node"]) for a in doc["adopted"]] == [(session, "office")]
    assert len(_naming(top, session)) == 1


def test_a_client_that_adopts_meanwhile_keeps_the_node_from_giving_it_up(tmp_path: Path) -> None:
    """The node was killed right after it saved the plan and the lease's bytes, before it removed
    the lease: the client's next run adopts the checkpoint; the next forward finishes the move,
    finds the client's snapshot naming the session and writes no abandoned record."""
    from bunker.node.abandon import _plan

    top, office, src, store, session = _setup(tmp_path)
    node_cmd(top, "abandon-after", office, "1h")
    assert NodeDir(str(office)).config.abandon_after == 3600
    _age(store, 2 * 3600)
    nd = NodeDir(str(office))
    repo = Repository.open(nd.store(top.id), top.id, floor=False)
    (dead,) = [s for s in sessions(repo) if s.session == session]
    kept = Path(abandon_dir(nd, top.id))
    _plan(nd.store(top.id), str(kept), dead)
    assert (kept / f"{session}.json").exists() and _leases(store)

    back = backup_into(top, office, src)
    assert any(e["code"] == "incomplete-snapshot" for e in back["events"]), back["events"]
    fwd = _forward(top, office)
    assert [(a["session"], a["state"]) for a in fwd["abandoned"]] == [(session, "adopted-by-client")]
    assert sorted(os.listdir(kept)) == [], "the plan and the kept lease stay"
    assert not any(_roots(store).values()) and not any(_roots(top.path).values())
    doc = _prune(top, _pruner(top, tmp_path))
    assert doc["adopted"] == []
    (own,) = _naming(top, session)
    env = parse_snapshot((top.path / "snapshots" / own).read_bytes()).env
    assert env.adopted is None and env.client == top.client and env.complete is False
    assert _roots(top.path) == {}, "the spent plain root stays"
    assert _forward(top, office)["abandoned"] == []


def test_a_forged_abandoned_flag_adopts_nothing(tmp_path: Path) -> None:
    top, office, _src, store, session = _setup(tmp_path)
    _age(store, 2 * 3600)
    _forward(top, office)
    ((plain, abandoned),) = _roots(top.path).items()
    assert abandoned is False
    pruner = _pruner(top, tmp_path)
    data = (top.path / plain).read_bytes()
    outer = encoding.unpack(data[4:])
    body = encoding.unpack(outer["body"])
    newest = body["lease_name"]

    def put(record: bytes) -> str:
        name = f"gc/{content_hash(record)}"
        (top.path / name).write_bytes(record)
        return name

    # the plain record with the flag added: its signature no longer verifies
    altered = MAGIC_CKROOT + encoding.pack({"body": encoding.pack({**body, "abandoned": True}), "sig": outer["sig"]})
    forged = [put(altered)]
    # a record signed by a node the repository never certified
    stranger = NodeKeys.from_seed(os.urandom(32))
    forged.append(put(make_checkpoint_root(stranger, top.id, newest, body["lease"], abandoned=True)))
    doc = _prune(top, pruner)
    assert doc["adopted"] == [] and doc["checkpoints_not_adopted"] == [], doc
    assert top.objects("snapshots") == []
    check = js(top.ok("check", "--json", rc=(0, 1, 3)))
    named = {p.get("object") for p in check.get("problems", [])}
    assert set(forged) <= named, check
    for n in forged:
        (top.path / n).unlink()

    # the same record signed by office itself is adopted: the refusals above were the forgery's
    genuine = put(make_checkpoint_root(NodeDir(str(office)).keys, top.id, newest, body["lease"], abandoned=True))
    doc = _prune(top, pruner)
    assert [(a["session"], a["node"]) for a in doc["adopted"]] == [(session, "office")]
    assert genuine in doc["adopted"][0]["roots"] and plain in doc["adopted"][0]["roots"]
    assert _roots(top.path) == {}
    assert js(top.ok("check", "--json"))["ok"] is True
