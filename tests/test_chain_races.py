"""Chains that never fork (issue 11, points 5-7): runs of one client that overlap take different
sequence numbers, on one machine (the kernel lock on the client's state) and across state
directories (the claim in the repository); a claim left by a killed run is taken over, one held
by a live run is waited for. Real processes, a real repository."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bunker.backup.commit import commit_snapshot
from bunker.crypto.keyfile import PutKey, load_put_key
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.index_cache import IndexCache
from bunker.repo.leases import Lease
from bunker.repo.records import new_session_id
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.tree import encode_tree
from bunker.runlog import RunLog
from bunker.storage.local import LocalBackend
from helpers import BUNKER, Repo, compare_trees, js, make_env, make_tree, restored_path, snapshot_tree

WAIT = 120.0  # generous: for processes on a loaded machine, never an assertion on speed


def _wait_for(what: str, cond: Any, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _leases(repo: Repo) -> list[str]:
    return sorted(p.name for p in (repo.path / "sessions").iterdir() if not p.name.startswith("."))


def _start_stdin_backup(repo: Repo, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    """A backup of standard input: it holds its lease and waits for its input."""
    assert BUNKER
    return subprocess.Popen(
        [BUNKER, "backup", "--repo", str(repo.path), "--stdin-name", name, "--json", "--no-progress"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    """Give a stdin backup its whole input."""
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    proc.stdin = None


def _finish(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err.decode()[-2000:]}"
    doc: dict[str, Any] = json.loads(out)
    return doc


def _overlapping_runs(repo: Repo, envs: list[dict[str, str]], rounds: int) -> list[int]:
    """``rounds`` times: one backup per environment, all started, then all released at once so
    that they link their snapshots at the same moment. Returns every sequence number taken."""
    seqs = []
    for r in range(rounds):
        want = len(_leases(repo)) + len(envs)
        procs = [_start_stdin_backup(repo, env, f"part-{r}-{i}.txt") for i, env in enumerate(envs)]
        _wait_for("every run's lease", lambda want=want: len(_leases(repo)) >= want)
        for i, p in enumerate(procs):
            assert p.stdin is not None
            p.stdin.write(os.urandom(1000) + b"run %d of round %d\n" % (i, r))
        for p in procs:
            _feed(p, b"")
        seqs += [_finish(p)["seq"] for p in procs]
    return seqs


def _no_fork(repo: Repo, seqs: list[int]) -> None:
    assert len(set(seqs)) == len(seqs), f"two runs took one sequence number: {sorted(seqs)}"
    check = js(repo.ok("check", "--json"))
    assert check["ok"] is True, check["problems"]
    snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert sorted(s["seq"] for s in snaps) == list(range(1, len(snaps) + 1))
    assert _leases(repo) == []  # claims and leases are gone with their runs


def test_overlapping_backups_on_one_machine_take_different_numbers(repo: Repo) -> None:
    repo.ok("backup", "--stdin-name", "first", input=b"first")
    seqs = _overlapping_runs(repo, [repo.env, repo.env], rounds=5)
    _no_fork(repo, [1, *seqs])


def test_overlapping_backups_from_two_state_directories_claim_their_numbers(repo: Repo, tmp_path: Path) -> None:
    # one put key, two machines (or two users' data directories): no common lock, only the claims
    other = make_env(tmp_path / "other-machine", BUNKER_PUT_KEY=str(repo.put_key))
    repo.ok("backup", "--stdin-name", "first", input=b"first")
    seqs = _overlapping_runs(repo, [repo.env, other, repo.env], rounds=3)
    _no_fork(repo, [1, *seqs])


# ---------------------------------------------------------------------- claims held by others


def _open(repo: Repo) -> tuple[Repository, PutKey]:
    put = load_put_key(str(repo.put_key))
    return Repository.open(LocalBackend(str(repo.path))), put


def _claim_next(repo: Repo, session: str) -> tuple[Repository, PutKey, int, str]:
    """Claim the next number of the repository's client for ``session`` (as a run of another
    machine does right before it signs its snapshot). Returns the number and the claim."""
    from bunker.repo.claims import Claims, claim_id  # (here: the tests above run on code without claims)

    r, put = _open(repo)
    cert = r.check_put_key(put)
    head = r.client_head(cert.name)
    assert head is not None
    seq = head.snap.env.seq + 1
    got = Claims(r, put.client_key, cert, session).take(seq, head.name, lambda h: True)
    assert isinstance(got, str), got
    assert got == f"sessions/{claim_id(cert.name, seq)}.0"
    return r, put, seq, got


def test_a_claim_left_by_a_killed_run_is_taken_over_at_once(repo: Repo) -> None:
    repo.ok("backup", "--stdin-name", "first", input=b"first")
    # a run of another machine claimed #2 and died before signing it: its session has no lease
    _r, _put, seq, claim = _claim_next(repo, new_session_id())
    assert seq == 2
    doc = js(repo.ok("backup", "--stdin-name", "second", "--json", input=b"second"))
    assert doc["seq"] == 2  # the number was free: the dead claim was superseded by the next round
    assert [e for e in doc["events"] if e["code"] == "chain-wait"] == []
    _no_fork(repo, [1, 2])


def test_a_claim_of_a_killed_run_of_this_machine_is_taken_over_at_once(repo: Repo) -> None:
    repo.ok("backup", "--stdin-name", "first", input=b"first")
    proc = _start_stdin_backup(repo, repo.env, "killed")
    _wait_for("the run's lease", lambda: len(_leases(repo)) == 1)
    lease_session = _leases(repo)[0].split(".")[0]
    # the run claimed #2 and was killed before it signed: its lease is still fresh
    from bunker.repo.claims import Claims

    r, put = _open(repo)
    cert = r.check_put_key(put)
    head = r.client_head(cert.name)
    assert head is not None
    got = Claims(r, put.client_key, cert, lease_session).take(2, head.name, lambda h: True)
    assert isinstance(got, str)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # this machine knows its process is gone: no wait for its lease to expire (15 minutes)
    doc = js(repo.ok("backup", "--stdin-name", "second", "--json", input=b"second", timeout=60))
    assert doc["seq"] == 2
    _no_fork(repo, [1, 2])


def test_a_run_waits_for_a_live_claim_and_takes_the_next_number(repo: Repo) -> None:
    repo.ok("backup", "--stdin-name", "first", input=b"first")
    # another machine's run holds a fresh lease and claims #2: it is about to sign it
    from bunker.repo.claims import Claims

    r, put = _open(repo)
    cert = r.check_put_key(put)
    lease = Lease(r, put.client_key, cert.client, cert.name, "backup")
    lease.write()
    head = r.client_head(cert.name)
    assert head is not None
    got = Claims(r, put.client_key, cert, lease.session).take(2, head.name, lambda h: True)
    assert isinstance(got, str)

    refs_before = len(list((repo.path / "refs").iterdir()))
    proc = _start_stdin_backup(repo, repo.env, "waiting")
    _feed(proc, b"waiting run")
    # it wrote what its snapshot needs and reached the link: it must not sign #2 while it is claimed
    _wait_for("the waiting run's reference objects", lambda: len(list((repo.path / "refs").iterdir())) > refs_before)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert proc.poll() is None, f"it did not wait for the claim: {proc.communicate()}"
        time.sleep(0.1)

    # the holder signs #2 (as its run would) and ends
    writer = SessionWriter(r, put, cert.name, IndexCache(r, put.secrets, None).load())
    try:
        root = writer_root(writer, put)
        now = time.time()
        body = {"host": "other", "user": "x", "paths": ["x"], "tags": [], "started": now, "finished": now, "argv": []}
        done = commit_snapshot(
            r,
            put,
            cert,
            writer,
            root=root,
            chunk_ids=ChunkIdSet([root]),
            stats={"files": 0, "dirs": 0, "bytes": 0, "entries": 0, "entry_bytes": 0},
            log=RunLog(),
            body_extra=body,
            state_dir=str(repo.base / "other-machine-state"),
            session=lease.session,
            lease=lease,
        )
    finally:
        writer.close()
    assert done.seq == 2
    lease.release([done.name])
    doc = _finish(proc)
    assert doc["seq"] == 3
    assert [e["code"] for e in doc["events"] if e["code"] == "chain-wait"] == ["chain-wait"]
    _no_fork(repo, [1, 2, 3])


def writer_root(writer: SessionWriter, put: PutKey) -> bytes:
    """Store an empty root tree; its chunk id."""
    from bunker.repo import blob
    from bunker.repo.pack import KIND_META

    data = encode_tree([])
    cid = blob.chunk_id(put.secrets, data)
    writer.store(cid, data, KIND_META)
    return cid


def test_two_runs_of_one_machine_share_its_record(repo: Repo) -> None:
    """The record of running sessions keeps both runs: the one that ends first does not make
    the other look dead (or forget a killed one)."""
    state_root = Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "state"
    repo.ok("backup", "--stdin-name", "first", input=b"first")
    a = _start_stdin_backup(repo, repo.env, "a")
    b = _start_stdin_backup(repo, repo.env, "b")
    _wait_for("both leases", lambda: len(_leases(repo)) == 2)
    # (a run writes its lease before it records itself here: on a busy machine, a moment later)
    _wait_for("the record of runs", lambda: any(state_root.rglob("session.json")))
    (record,) = list(state_root.rglob("session.json"))
    _wait_for("both runs recorded", lambda: len(json.loads(record.read_text()).get("runs", {})) == 2)
    _feed(a, b"a")
    _finish(a)
    runs = json.loads(record.read_text())["runs"]
    assert len(runs) == 1  # b still runs, and is still known here
    _feed(b, b"b")
    _finish(b)
    assert not record.exists()


# ---------------------------------------------------------------------- state directory lost or stale


def _state_root(repo: Repo) -> Path:
    return Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "state"


def _state_dir(repo: Repo) -> Path:
    """This client's state directory (its chain head)."""
    (d,) = [p for p in _state_root(repo).glob("*/*") if p.is_dir()]
    return d


def _offline_backup(repo: Repo, src: Path) -> dict[str, Any]:
    away = repo.path.with_name("away")
    repo.path.rename(away)  # the disk is not mounted
    try:
        doc = repo.backup(src)
    finally:
        away.rename(repo.path)
    assert doc["spooled"], doc
    return doc


def _restores(repo: Repo, snapshot: str, src: Path, target: Path) -> None:
    doc = js(repo.ok("restore", snapshot, "--target", target, "--json"))
    assert doc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_deleted_state_directory_then_an_offline_backup_is_renumbered_not_forked(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    (src / "second.bin").write_bytes(os.urandom(50_000))
    assert repo.backup(src)["seq"] == 2
    shutil.rmtree(_state_root(repo))  # "the state directories can be deleted at any time"
    (src / "offline.bin").write_bytes(os.urandom(50_000))
    offline = _offline_backup(repo, src)
    assert offline["seq"] == 1  # this machine no longer knows its chain
    fwd = js(repo.ok("forward", "--json"))
    (moved,) = fwd["renumbered"]
    assert moved["was"] == offline["snapshot"] and moved["was_seq"] == 1 and moved["seq"] == 3
    assert fwd["snapshots"] == [moved["snapshot"]] and fwd["left"] == 0
    _no_fork(repo, [1, 2, 3])
    head = json.loads((_state_dir(repo) / "chain.json").read_text())
    assert head["seq"] == 3 and head["name"] == f"snapshots/{moved['snapshot']}"
    _restores(repo, moved["snapshot"], src, tmp_path / "t")  # the body opens under its new number
    assert repo.backup(src)["seq"] == 4


def test_a_forward_killed_after_linking_leaves_a_head_the_next_one_corrects(repo: Repo, tmp_path: Path) -> None:
    """A forward that stored the renumbered snapshot and died before it remembered it and
    deleted the spooled copy: the next forward finds the run upstream, drops the copy and
    remembers the snapshot upstream as the head. Before, the head kept naming the spooled copy,
    and `bunker check` reported the chain as rolled back (a crash test caught it under load)."""
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    (src / "second.bin").write_bytes(os.urandom(50_000))
    repo.backup(src)
    shutil.rmtree(_state_root(repo))
    (src / "offline.bin").write_bytes(os.urandom(50_000))
    offline = _offline_backup(repo, src)
    (spooled,) = Path(repo.env["XDG_DATA_HOME"]).glob(f"bunker/spool/*/snapshots/{offline['snapshot']}")
    kept, head_before = spooled.read_bytes(), (_state_dir(repo) / "chain.json").read_text()
    assert json.loads(head_before)["name"] == f"snapshots/{offline['snapshot']}"
    (moved,) = js(repo.ok("forward", "--json"))["renumbered"]
    # what that run left when killed between storing #3 and the rest
    spooled.write_bytes(kept)
    (_state_dir(repo) / "chain.json").write_text(head_before)
    fwd = js(repo.ok("forward", "--json"))
    assert fwd["already_upstream"] >= 1 and fwd["snapshots"] == [] and fwd["left"] == 0, fwd
    assert not spooled.exists()
    head = json.loads((_state_dir(repo) / "chain.json").read_text())
    assert head["seq"] == 3 and head["name"] == f"snapshots/{moved['snapshot']}"
    _no_fork(repo, [1, 2, 3])
    assert repo.backup(src)["seq"] == 4


def test_stale_copy_of_the_state_directory_then_offline_backups_are_renumbered(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    stale = tmp_path / "stale-state"
    shutil.copytree(_state_root(repo), stale)  # a backup of the home directory, say
    for i in range(2):
        (src / f"online-{i}.bin").write_bytes(os.urandom(50_000))
        repo.backup(src)
    shutil.rmtree(_state_root(repo))
    shutil.copytree(stale, _state_root(repo))  # ... restored later
    docs = []
    for i in range(2):
        (src / f"offline-{i}.bin").write_bytes(os.urandom(50_000))
        docs.append(_offline_backup(repo, src))
    assert [d["seq"] for d in docs] == [2, 3]  # following the stale head
    # the next backup reaches the repository: it forwards first, onto the real head
    (src / "last.bin").write_bytes(os.urandom(50_000))
    last = repo.backup(src)
    assert last["seq"] == 6 and not last["spooled"]
    renumbered = [e for e in last["events"] if e["code"] == "forward-renumbered"]
    assert len(renumbered) == 2 and "#2" in renumbered[0]["message"] and "#4" in renumbered[0]["message"]
    _no_fork(repo, [1, 2, 3, 4, 5, 6])
    snaps = {s["seq"]: s for s in js(repo.ok("snapshots", "--json"))["snapshots"]}
    target = tmp_path / "t5"
    doc = js(repo.ok("restore", snaps[5]["id"], "--target", target, "--json"))  # the second offline run
    assert doc["stats"]["failed"] == 0
    got = restored_path(target, src)
    assert (got / "offline-1.bin").read_bytes() == (src / "offline-1.bin").read_bytes()
    assert not (got / "last.bin").exists()
    shutil.rmtree(target)


# ---------------------------------------------------------------------- deliveries side by side


def _spooled(repo: Repo) -> list[str]:
    root = Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "spool"
    return sorted(
        f"{d.name}/{p.name}"
        for spool in root.iterdir()
        for d in spool.iterdir()
        if d.is_dir() and d.name in ("packs", "index", "refs", "snapshots")
        for p in d.iterdir()
        if not p.name.startswith(".")
    )


def test_forwards_beside_each_other_and_beside_a_backup_are_quiet(repo: Repo, tmp_path: Path) -> None:
    """Two `bunker forward` and a backup (which forwards first) deliver one spool at once: each
    object is sent by one of them, none is reported missing, every run succeeds and takes its backup, and
    the chain does not fork."""
    assert BUNKER
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    taken: dict[str, dict[bytes, tuple[object, ...]]] = {}
    for r in range(3):
        for i in range(3):
            (src / f"offline-{r}-{i}.bin").write_bytes(os.urandom(12 << 20))
            doc = _offline_backup(repo, src)
            taken[doc["snapshot"]] = snapshot_tree(src, dir_mtimes=False)
        cmds = [["forward", "--json"], ["forward", "--json"], ["backup", "--json", "--no-progress", str(src)]]
        procs = [
            subprocess.Popen(
                [BUNKER, *c, "--repo", str(repo.path)], env=repo.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for c in cmds
        ]
        docs = []
        for c, p in zip(cmds, procs, strict=True):
            out, err = p.communicate(timeout=WAIT)
            assert p.returncode == 0, f"{c[0]} exited {p.returncode}: {err.decode()[-2000:]}"
            assert b"missing" not in err and b"err:" not in err, err.decode()
            docs.append(json.loads(out))
        for fwd in docs[:2]:
            assert fwd["held"] == [] and fwd["damaged"] == [], fwd
        backup = docs[2]
        assert not backup["spooled"] and [e for e in backup["events"] if e["level"] == "err"] == []
        taken[backup["snapshot"]] = snapshot_tree(src, dir_mtimes=False)
        assert _spooled(repo) == []
    snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
    _no_fork(repo, [s["seq"] for s in snaps])
    assert len(snaps) == 1 + len(taken)
    for s in snaps[1:]:
        # every spooled run arrived (under its own name: nothing moved its chain meanwhile)
        full = next(k for k in taken if k.startswith(s["id"]))
        target = tmp_path / "t" / s["id"]
        assert js(repo.ok("restore", s["id"], "--target", target, "--json"))["stats"]["failed"] == 0
        assert snapshot_tree(restored_path(target, src), dir_mtimes=False) == taken.pop(full)
        shutil.rmtree(target)
    assert taken == {}
