"""Leases and checkpoints cannot be replayed (issue 10, point 3; docs/format.md section 15).

Before format 2, a copy of an old ``sessions/`` object put back under a new name was adopted
again as a new incomplete snapshot, once per backup, and a lease that did not verify still held
back garbage collection. Now a lease names itself (session, counter), says which chain head its
session started from, every lease is verified against a certificate that is not revoked, a
session's life is capped, and envelopes name the session they hold, so a session is used once."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.crypto.sign import SigningKey
from bunker.repo.leases import MAX_SESSION_SECONDS
from bunker.repo.objects import name_for
from bunker.repo.records import make_lease, parse_lease
from helpers import Repo, js, restored_path
from test_checkpoint import _kill_after_checkpoint, _tree
from test_prune import _killed_backup, _prune, _pruner


def _checkpoint_leases(repo: Repo, keep: Path) -> list[Path]:
    """Copy the session objects of the killed run into ``keep`` (what an attacker would save)."""
    keep.mkdir(exist_ok=True)
    out = []
    for p in repo.objects("sessions"):
        shutil.copy2(p, keep / p.name)
        out.append(keep / p.name)
    assert any(parse_lease(p.read_bytes())[0].get("checkpoint") for p in out)
    return out


def _age(paths: list[Path], seconds: float) -> None:
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def _seqs(repo: Repo) -> list[tuple[int, bool]]:
    return sorted((r["seq"], r["complete"]) for r in js(repo.ok("snapshots", "--json"))["snapshots"])


def test_a_replayed_checkpoint_is_adopted_once(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    _kill_after_checkpoint(repo, src)
    saved = _checkpoint_leases(repo, tmp_path / "saved")
    first = repo.backup(src)  # adopts the checkpoint (#1, incomplete) and finishes (#2)
    assert first["seq"] == 2
    assert _seqs(repo) == [(1, False), (2, True)]

    newest = max(saved, key=lambda p: int(p.name.rpartition(".")[2]))
    for attempt in range(3):
        # put back under its own name, and under a new session name, dated as a dead session
        own = repo.path / "sessions" / newest.name
        shutil.copy2(newest, own)
        renamed = repo.path / "sessions" / f"{attempt:024x}.{attempt + 1}"
        shutil.copy2(newest, renamed)
        _age([own, renamed], 2 * 3600)
        doc = repo.backup(src)
        assert doc["seq"] == 3 + attempt, doc
        refused = [e for e in doc["events"] if e["code"] == "checkpoint-refused"]
        assert refused and "already holds that run" in refused[0]["message"]
        assert not own.exists()  # the replay of a used session is removed
    assert _seqs(repo) == [(1, False), (2, True), (3, True), (4, True), (5, True)]
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--target", target)
    assert len(list(restored_path(target, src).rglob("*.bin"))) == 60

    # check names the renamed copies as leases that name another object
    doc = js(repo.run("check", "--json"))
    named = {p["object"] for p in doc["problems"]}
    assert any(o.startswith("sessions/000000000000000000000000.") for o in named), doc


def test_checkpoint_of_a_run_older_than_the_chain_head_is_refused(repo: Repo, tmp_path: Path) -> None:
    """A killed run's lease, withheld and put back after the client wrote newer snapshots, would
    make stale data an incomplete snapshot after them."""
    src = tmp_path / "src"
    _tree(src)
    _kill_after_checkpoint(repo, src)
    saved = _checkpoint_leases(repo, tmp_path / "saved")
    for p in repo.objects("sessions"):
        p.unlink()  # withheld by the storage
    repo.backup(src)  # #1, complete: nothing to adopt
    for p in saved:
        shutil.copy2(p, repo.path / "sessions" / p.name)
    _age(repo.objects("sessions"), 2 * 3600)
    doc = repo.backup(src)
    assert doc["seq"] == 2
    refused = [e for e in doc["events"] if e["code"] == "checkpoint-refused"]
    assert refused and "moved on" in refused[0]["message"], doc["events"]
    assert _seqs(repo) == [(1, True), (2, True)]
    assert repo.objects("sessions") == []


def test_prune_adopts_a_dead_run_once(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    _kill_after_checkpoint(repo, src)
    saved = _checkpoint_leases(repo, tmp_path / "saved")
    key = _pruner(repo, tmp_path)
    _age(repo.objects("sessions"), 3 * 86400)
    doc = _prune(repo, key, "--grace", "1h", "--repack-threshold", "0")
    assert doc["checkpoints_adopted"] == 1, doc
    first = doc["adopted"][0]["snapshot"]
    for _ in range(2):
        for p in saved:
            shutil.copy2(p, repo.path / "sessions" / p.name)
        _age(repo.objects("sessions"), 3 * 86400)
        doc = _prune(repo, key, "--grace", "1h", "--repack-threshold", "0")
        # found adopted already (as after a prune killed before it removed the lease): no new snapshot
        assert [a["snapshot"] for a in doc["adopted"]] == [first], doc
        assert repo.objects("sessions") == []
    rows = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert len(rows) == 1 and rows[0]["complete"] is False


def _forged_lease(repo: Repo, session: str, counter: int, signer: SigningKey, cert: str) -> Path:
    name, data = make_lease(session, counter, "testclient", "backup", signer, cert)
    path = repo.path / name
    path.write_bytes(data)
    return path


def test_leases_that_do_not_verify_or_live_too_long_do_not_hold_back_gc(repo: Repo, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 << 20))
    key = _pruner(repo, tmp_path)
    garbage = _killed_backup(repo, big)
    _age(repo.objects("sessions"), 2 * 3600)
    first = _prune(repo, key, "--grace", "0s")
    assert first["condemned"] >= len(garbage) and first["deleted"] == 0

    put = load_put_key(str(repo.put_key))
    cert = name_for("clients", put.certificate)
    # "alive" leases of sessions that began long before the condemnation: one whose signature
    # does not verify, one put back under another name, and a genuine one refreshed now whose
    # session began more than the cap ago
    bad = _forged_lease(repo, "a" * 24, 0, SigningKey(b"\x07" * 32), cert)
    _, data = make_lease("b" * 24, 0, "testclient", "backup", put.client_key, cert)
    moved = repo.path / "sessions" / ("c" * 24 + ".0")
    moved.write_bytes(data)
    old = _forged_lease(repo, "d" * 24, 0, put.client_key, cert)
    _forged_lease(repo, "d" * 24, 7, put.client_key, cert)
    _age([bad, moved], 3600)
    _age([old], MAX_SESSION_SECONDS + 3600)

    second = _prune(repo, key, "--grace", "0s")
    assert second["deleted"] >= len(garbage) and second["waiting"] == [], second
    assert not any((repo.path / "packs" / p).exists() for p in garbage)

    doc = js(repo.run("check", "--json"))
    problems = {p["object"]: p["problem"] for p in doc["problems"]}
    assert "not authentic" in problems[f"sessions/{bad.name}"], problems
    assert "another name" in problems[f"sessions/{moved.name}"], problems
