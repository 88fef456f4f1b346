"""Forged, altered, substituted or withheld objects are detected (promise 2)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import msgpack
import pytest

from bunker import encoding
from bunker.crypto.sign import SigningKey
from bunker.repo.snapshot import make_snapshot, parse_snapshot
from helpers import Repo, init_repo, js, make_env, obj_name, rename_to_hash, restored_path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """Another repository (other master key, a client of the same name) with one snapshot of
    evil.txt; tests only copy objects out of it."""
    base = tmp_path_factory.mktemp("foreign")
    other = init_repo(base, client="testclient")
    src = base / "other-src"
    src.mkdir()
    (src / "evil.txt").write_bytes(b"planted\n")
    other.extra["snapshot"] = other.backup(src)["snapshot"]
    other.extra["src"] = src
    return other


def _two_snapshots(repo: Repo, tmp_path: Path) -> tuple[Path, list[dict]]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_bytes(b"version one\n")
    s1 = repo.backup(src)
    (src / "f.txt").write_bytes(b"version two, longer\n")
    s2 = repo.backup(src)
    return src, [s1, s2]


def _keyless(repo: Repo, expect: str | None = None) -> tuple[int, dict]:
    cp = repo.run("check", "--keyless", "--expect", expect or repo.id, "--json")
    return cp.returncode, js(cp)


def _problem_objects(doc: dict) -> list[str]:
    return [p["object"] for p in doc["problems"] if p["severity"] == "err"]


def _alter_sig(data: bytes) -> bytes:
    sig = parse_snapshot(data).sig
    i = data.index(sig) + 10
    b = bytearray(data)
    b[i] ^= 0x01
    return bytes(b)


def _alter_env(data: bytes) -> bytes:
    """Change a field of the signed envelope (the file count) and re-encode, keeping the signature."""
    outer = msgpack.unpackb(data[4:], raw=False)
    env = msgpack.unpackb(outer["env"], raw=False)
    env["stats"]["files"] = 999_999
    outer["env"] = encoding.pack(env)
    return data[:4] + encoding.pack(outer)


@pytest.mark.parametrize("how", ["signature-bit", "envelope-field"])
def test_altered_snapshot_is_rejected(repo: Repo, tmp_path: Path, how: str) -> None:
    src, (s1, s2) = _two_snapshots(repo, tmp_path)
    rc, doc = _keyless(repo)
    assert rc == 0 and doc["ok"] and doc["authenticated"], doc

    path = repo.path / "snapshots" / s2["snapshot"]
    data = path.read_bytes()
    path.write_bytes(_alter_sig(data) if how == "signature-bit" else _alter_env(data))
    new = rename_to_hash(path)  # the object's name checks out again
    assert new.name != s2["snapshot"]

    rc, doc = _keyless(repo)
    assert rc == 14, doc
    assert obj_name(new) in _problem_objects(doc)
    msg = next(p["problem"] for p in doc["problems"] if p["object"] == obj_name(new))
    assert "not trusted" in msg and "signature" in msg

    # this machine remembers the genuine #2: `snapshots` lists it as missing (exit 14)
    listed = js(repo.ok("snapshots", "--json", rc=14))
    rows = {r["id"]: r for r in listed["snapshots"]}
    assert s1["snapshot"] in rows and rows[s1["snapshot"]]["trusted"] is True
    assert new.name not in rows or rows[new.name]["trusted"] is False
    if new.name in rows:
        assert "signature" in rows[new.name]["problem"]
    assert [m["id"] for m in listed["missing"]] == [s2["snapshot"]]

    # the altered snapshot is never chosen: on this machine `latest` names the missing #2
    # (issue 11 point 11); elsewhere latest is the genuine #1
    target = tmp_path / "t"
    cp = repo.run("restore", "latest", "--target", target)
    assert cp.returncode == 14 and s2["snapshot"] in cp.stderr, cp.stderr
    elsewhere = {**repo.env, "XDG_DATA_HOME": str(tmp_path / "elsewhere")}
    repo.ok("restore", "latest", "--target", target, env=elsewhere)
    assert restored_path(target, src / "f.txt").read_bytes() == b"version one\n"
    cp = repo.run("restore", new.name[:16], "--target", tmp_path / "t2")
    assert cp.returncode == 2 and "no snapshot" in cp.stderr


def test_snapshot_copied_from_another_repository_is_rejected(repo: Repo, tmp_path: Path, foreign: Repo) -> None:
    src, _ = _two_snapshots(repo, tmp_path)
    assert foreign.client == repo.client
    o = {"snapshot": foreign.extra["snapshot"]}
    osrc = foreign.extra["src"]
    snap = foreign.path / "snapshots" / o["snapshot"]
    shutil.copy(snap, repo.path / "snapshots" / snap.name)
    for cert in foreign.objects("clients"):  # its certificate too, so nothing is merely "missing"
        shutil.copy(cert, repo.path / "clients" / cert.name)

    rc, doc = _keyless(repo)
    assert rc == 14
    assert f"snapshots/{o['snapshot']}" in _problem_objects(doc)
    rows = {r["id"]: r for r in js(repo.ok("snapshots", "--json"))["snapshots"]}
    assert o["snapshot"] not in rows or rows[o["snapshot"]]["trusted"] is False
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--target", target)
    assert restored_path(target, src / "f.txt").read_bytes() == b"version two, longer\n"
    assert not restored_path(target, osrc / "evil.txt").exists()


def test_forged_newest_snapshot_signed_by_another_key_is_rejected(repo: Repo, tmp_path: Path) -> None:
    """An envelope that claims to be our client's next snapshot, signed by a key that is not the
    client's certified key."""
    src, (_, s2) = _two_snapshots(repo, tmp_path)
    genuine = parse_snapshot((repo.path / "snapshots" / s2["snapshot"]).read_bytes())
    env = dataclasses.replace(
        genuine.env, seq=genuine.env.seq + 1, prev=f"snapshots/{s2['snapshot']}", time=genuine.env.time + 3600
    )
    forged = make_snapshot(env, genuine.body_ct, SigningKey(b"\x42" * 32))
    path = repo.path / "snapshots" / "x"
    path.write_bytes(forged)
    new = rename_to_hash(path)

    rc, doc = _keyless(repo)
    assert rc == 14
    assert obj_name(new) in _problem_objects(doc)
    rows = {r["id"]: r for r in js(repo.ok("snapshots", "--json"))["snapshots"]}
    assert rows[new.name]["trusted"] is False and "signature" in rows[new.name]["problem"]
    human = repo.ok("snapshots").stdout
    assert "UNTRUSTED" in human
    # a new backup continues the genuine chain, not the forged one
    doc = repo.backup(src)
    assert doc["seq"] == 3
    assert parse_snapshot((repo.path / "snapshots" / doc["snapshot"]).read_bytes()).env.prev == (
        f"snapshots/{s2['snapshot']}"
    )


def test_substituted_config_fails_keyless_check(repo: Repo, tmp_path: Path, foreign: Repo) -> None:
    _two_snapshots(repo, tmp_path)
    other = foreign
    original = repo.id
    for p in repo.objects("config"):
        p.unlink()
    for p in other.objects("config"):
        shutil.copy(p, repo.path / "config" / p.name)

    rc, doc = _keyless(repo, original)
    assert rc == 14
    assert any(p["object"].startswith("config") for p in doc["problems"] if p["severity"] == "err")
    cp = repo.run("check", "--keyless", "--expect", original)
    assert cp.returncode == 14
    assert "config" in cp.stdout and "not the one" in cp.stdout
    # without --expect the copy looks self-consistent, and the check says authenticity is unproven
    cp = repo.run("check", "--keyless", "--json")
    assert js(cp)["authenticated"] is False and js(cp)["id"] == other.id

    # the original put key refuses to back up into the substituted repository
    cp = repo.run("backup", tmp_path / "src", "--put-key", repo.put_key)
    assert cp.returncode == 14, cp.stderr
    assert "not the one your key is for" in cp.stderr


def test_foreign_config_added_beside_original_is_reported(repo: Repo, tmp_path: Path, foreign: Repo) -> None:
    _two_snapshots(repo, tmp_path)
    cfg = foreign.objects("config")[0]
    shutil.copy(cfg, repo.path / "config" / cfg.name)
    rc, doc = _keyless(repo)
    assert rc == 14
    assert f"config/{cfg.name}" in _problem_objects(doc)


def test_deleted_newest_snapshot_is_reported(repo: Repo, tmp_path: Path) -> None:
    src, (s1, s2) = _two_snapshots(repo, tmp_path)
    assert js(repo.ok("check", "--json"))["ok"] is True

    (repo.path / "snapshots" / s2["snapshot"]).unlink()
    cp = repo.run("check", "--json")
    assert cp.returncode == 14, cp.stdout
    doc = js(cp)
    assert doc["mode"] == "put-key"
    bad = [p for p in doc["problems"] if p["object"] == f"snapshots/{s2['snapshot']}"]
    assert bad and "deleted" in bad[0]["problem"] and "#2" in bad[0]["problem"]
    cp = repo.run("check")
    assert cp.returncode == 14 and "rolled back" in cp.stdout
    # the keyless check on this machine uses the same witness (what it remembers of its chains)
    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json")
    assert cp.returncode == 14, cp.stdout
    assert any(p["object"] == f"snapshots/{s2['snapshot']}" for p in js(cp)["problems"])
    # a copy checked elsewhere (no state of this machine) cannot tell: nothing to witness
    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json", env=make_env(tmp_path / "elsewhere"))
    assert cp.returncode == 0, cp.stdout

    cp = repo.run("backup", src, "--json")
    assert cp.returncode == 1, cp.stderr
    doc = js(cp)
    assert doc["level"] == "warn"
    ev = [e for e in doc["events"] if e["code"] == "chain-rollback"]
    assert ev and ev[0]["level"] == "warn" and "#2" in ev[0]["message"]
    assert doc["seq"] == 3  # continues the remembered chain
    # the hole stays visible
    cp = repo.run("check", "--json")
    assert cp.returncode == 14
    assert any("#2" in p["problem"] and "missing" in p["problem"] for p in js(cp)["problems"])
