"""This machine's own disk is full or refuses writes under bunker's cache or data directory (issue
11, point 10): a backup still runs (slower: its caches are kept in memory; level warn, exit 1,
naming each file it could not write and the next step), or, when it needs that disk to keep the
backup (the repository is unreachable and the spool has no room), stops with exit 4 and the
next step. Never a traceback, and nothing half-written is left behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bunker.errors import ExitCode
from conftest import Unprivileged
from helpers import (
    Repo,
    describe,
    init_repo,
    js,
    loop_ext4,
    make_env,
    make_tree,
    restored_path,
    run_bunker,
    snapshot_tree,
)


@pytest.fixture
def full_fs() -> Iterator[Path]:
    """A 16 MiB ext4 filesystem (no blocks reserved for root), loop-mounted."""
    with loop_ext4(16 << 20, "bunker-localfull-", "the unprivileged test covers the rest") as mnt:
        yield mnt


def _fill_to_the_last_byte(mnt: Path) -> None:
    with open(mnt / "filler", "wb") as f:
        block = b"\0" * (1 << 16)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    with open(mnt / "filler-tail", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


def _move(repo: Repo, var: str, to: Path) -> None:
    """Move one of the client's XDG directories onto ``to`` (keeping what is in it)."""
    old = Path(repo.env[var])
    shutil.copytree(old, to, symlinks=True, dirs_exist_ok=True)
    repo.env[var] = str(to)


def _warned_backup(repo: Repo, src: Path, codes: set[str], tmp_path: Path, **kw: object) -> dict[str, object]:
    cp = repo.run("backup", src, "--json", "--no-progress", **kw)  # type: ignore[arg-type]
    assert cp.returncode == ExitCode.WARN, describe(cp)
    assert "Traceback" not in cp.stderr
    doc = js(cp)
    assert doc["level"] == "warn" and doc["spooled"] is False
    warns = [e for e in doc["events"] if e["level"] == "warn"]  # type: ignore[union-attr]
    assert {e["code"] for e in warns} == codes, warns
    for e in warns:
        assert "cannot be written" in e["message"] or "could not remember" in e["message"], e
        assert "free space on that disk" in e["message"], e
    target = tmp_path / "t"
    js(repo.ok("restore", str(doc["snapshot"]), "--target", target, "--json", **kw))  # type: ignore[arg-type]
    assert snapshot_tree(restored_path(target, src), dir_mtimes=False) == snapshot_tree(src, dir_mtimes=False)
    shutil.rmtree(target)
    return doc


def _no_leftovers(mnt: Path) -> None:
    """Nothing half-written: no temp files of bunker's, no sqlite journal of a failed write."""
    stray = [p for p in mnt.rglob("*") if p.name.startswith(".") or p.name.endswith("-journal")]
    assert stray == [], stray


def test_full_cache_and_data_disk(full_fs: Path, tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "home")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src, args=("--no-progress",))
    _move(repo, "XDG_CACHE_HOME", full_fs / "cache")
    _move(repo, "XDG_DATA_HOME", full_fs / "data")
    shutil.rmtree(full_fs / "cache" / "bunker")  # no cache at all: every cache file must be made anew
    _fill_to_the_last_byte(full_fs)
    (src / "new.txt").write_bytes(b"new\n")

    doc = _warned_backup(repo, src, {"cache-unwritable", "state-unwritable"}, tmp_path)
    codes = [e["code"] for e in doc["events"]]  # type: ignore[union-attr]
    assert codes.count("cache-unwritable") == 2  # the index cache and the files cache
    # the next run learns the chain head from the repository: no false alarm of a rollback
    (src / "newer.txt").write_bytes(b"newer\n")
    again = _warned_backup(repo, src, {"cache-unwritable", "state-unwritable"}, tmp_path)
    assert again["seq"] == doc["seq"] + 1  # type: ignore[operator]
    _no_leftovers(full_fs)

    # once there is room, runs are clean again
    (full_fs / "filler").unlink()
    clean = repo.backup(src, args=("--no-progress",))
    assert clean["level"] in ("ok", "note"), clean["events"]
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_full_data_disk_while_the_repository_is_unreachable(full_fs: Path, tmp_path: Path) -> None:
    """The spool is the only place the backup could go, and it has no room: exit 4, next step."""
    repo = init_repo(tmp_path / "home")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src, args=("--no-progress",))
    _move(repo, "XDG_DATA_HOME", full_fs / "data")
    repo.path.rename(tmp_path / "elsewhere")  # the repository's disk is not mounted
    (src / "big.bin").write_bytes(os.urandom(1 << 20))
    _fill_to_the_last_byte(full_fs)
    cp = repo.run("backup", src, "--json", "--no-progress")
    assert cp.returncode == ExitCode.FATAL, describe(cp)
    doc = js(cp)
    assert "Traceback" not in cp.stderr
    assert "cannot be reached" in doc["error"] and "is full" in doc["error"], doc
    assert "the local spool that keeps backups meanwhile has no room" in doc["error"], doc
    assert "Free space on that disk" in doc["hint"] and "run the same command again" in doc["hint"], doc
    _no_leftovers(full_fs)


def test_unwritable_cache_and_data_directories(unprivileged: Unprivileged) -> None:
    """Without root: the cache and data directories refuse writes (a wrong chown leaves that)."""
    base = unprivileged.base
    src = base / "src"
    make_tree(src, seed=2)
    env = make_env(base / "env")
    unprivileged.own(base)
    pre = unprivileged.prefix
    cp = run_bunker("init", "--repo", base / "repo", "--client", "c", "--json", env=env, prefix=pre)
    assert cp.returncode == 0, describe(cp)
    repo = Repo(base / "repo", env, "", Path(), Path(), base)
    assert repo.run("backup", src, "--json", "--no-progress", prefix=pre).returncode == 0
    locked = [Path(env["XDG_CACHE_HOME"]) / "bunker", Path(env["XDG_DATA_HOME"]) / "bunker"]
    shutil.rmtree(locked[0])  # the caches must be made anew, and cannot be
    locked[0].mkdir(mode=0o500)
    unprivileged.own(locked[0])
    modes = {p: p.stat().st_mode for p in locked[1].rglob("*") if p.is_dir()}
    for p in modes:
        p.chmod(0o500)
    try:
        (src / "new.txt").write_bytes(b"new\n")
        _warned_backup(repo, src, {"cache-unwritable", "state-unwritable"}, base, prefix=pre)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
