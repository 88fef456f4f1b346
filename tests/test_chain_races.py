"""Chains that never fork (issue 11, points 5-7): runs of one client that overlap take different
sequence numbers, on one machine (the kernel lock on the client's state) and across state
directories (the claim in the repository); a claim left by a killed run is taken over, one held
by a live run is waited for. Real processes, a real repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bunker.backup.commit import commit_snapshot
from bunker.crypto.keyfile import PutKey, load_put_key
from bunker.repo.index_cache import IndexCache
from bunker.repo.leases import Lease
from bunker.repo.records import new_session_id
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.tree import encode_tree
from bunker.runlog import RunLog
from bunker.storage.local import LocalBackend
from helpers import BUNKER, Repo, js, make_env

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
            chunk_ids={root},
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
    (record,) = list(state_root.rglob("session.json"))
    _wait_for("both runs recorded", lambda: len(json.loads(record.read_text()).get("runs", {})) == 2)
    _feed(a, b"a")
    _finish(a)
    runs = json.loads(record.read_text())["runs"]
    assert len(runs) == 1  # b still runs, and is still known here
    _feed(b, b"b")
    _finish(b)
    assert not record.exists()
