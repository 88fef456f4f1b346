"""A damaged or deleted newest snapshot is named, never silently replaced (issue 11, point 11).

On a machine with a put key, `latest` means this client's latest (unless --client or --host
says otherwise): another client's newer snapshot is not restored in its place. The chain head
this machine remembers (backup/chain.py) must be in the repository as a trusted snapshot: if it
is missing or damaged, `restore latest` is an error naming it (exit 14) instead of restoring an
older snapshot with exit 0, and `snapshots` lists it (missing, damaged) and exits 14.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bunker.errors import ExitCode
from helpers import Repo, describe, flip_bit, js, restored_path


def _src(tmp_path: Path, name: str, text: bytes) -> Path:
    src = tmp_path / name
    src.mkdir()
    (src / "f.txt").write_bytes(text)
    return src


def _restored(repo: Repo, tmp_path: Path, src: Path, *args: str) -> bytes:
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json", *args))
    data = (restored_path(target, src) / "f.txt").read_bytes()
    shutil.rmtree(target)
    return data


def _two_clients(repo: Repo, tmp_path: Path) -> tuple[Path, str, str, Path]:
    """This machine's client backs up twice; then another client backs up (the newest of all)."""
    mine = _src(tmp_path, "mine", b"one\n")
    repo.backup(mine)
    (mine / "f.txt").write_bytes(b"two\n")
    newest = repo.backup(mine)["snapshot"]
    other_key = tmp_path / "other.put"
    repo.ok("key", "new-client", "other", "--out", other_key)
    other = _src(tmp_path, "other", b"the other machine's\n")
    other_env = {**repo.env, "XDG_DATA_HOME": str(tmp_path / "other-data")}  # its own state
    theirs = repo.backup(other, args=("--put-key", str(other_key)), env=other_env)["snapshot"]
    return mine, newest, theirs, other


def test_latest_is_this_clients_own(repo: Repo, tmp_path: Path) -> None:
    mine, _, _, other = _two_clients(repo, tmp_path)
    assert _restored(repo, tmp_path, mine) == b"two\n"  # not the other client's, although newer
    assert _restored(repo, tmp_path, other, "--client", "other") == b"the other machine's\n"


def test_a_deleted_newest_snapshot_is_named(repo: Repo, tmp_path: Path) -> None:
    mine, newest, _, other = _two_clients(repo, tmp_path)
    (repo.path / "snapshots" / newest).unlink()  # deleted, or the repository rolled back

    cp = repo.run("restore", "latest", "--target", tmp_path / "t", "--json")
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    doc = js(cp)
    assert newest in doc["error"] and "#2" in doc["error"] and "missing from the repository" in doc["error"]
    assert "`latest` would be an older snapshot" in doc["error"] and "name it by its id" in doc["hint"]
    assert not (tmp_path / "t").exists()

    cp = repo.run("snapshots", "--json")
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    listed = js(cp)
    assert [m["id"] for m in listed["missing"]] == [newest] and listed["missing"][0]["seq"] == 2
    human = repo.run("snapshots")
    assert f"{newest[:12]}" in human.stdout and "MISSING" in human.stdout and "err:" in human.stderr
    # another client's latest is not this machine's business
    assert _restored(repo, tmp_path, other, "--client", "other") == b"the other machine's\n"


def test_a_damaged_newest_snapshot_is_named(repo: Repo, tmp_path: Path) -> None:
    _, newest, _, _ = _two_clients(repo, tmp_path)
    flip_bit(repo.path / "snapshots" / newest, 40)

    cp = repo.run("restore", "latest", "--target", tmp_path / "t", "--json")
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    doc = js(cp)
    assert newest in doc["error"] and "is damaged" in doc["error"], doc

    cp = repo.run("snapshots", "--json")
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    listed = js(cp)
    assert [d["id"] for d in listed["damaged"]] == [newest] and listed["missing"] == []
    assert "do not match its name" in listed["damaged"][0]["problem"]
    assert "DAMAGED" in repo.run("snapshots").stdout
