"""Restore and key files against targets that take nothing or run full (issue 11, points 15
and 22): a target that takes nothing is one fatal error (exit 4) naming it and the next step; a
target that fills up mid-restore keeps no partial file under a real name (each file is written
under a temporary name and renamed once complete); a put key whose file cannot be written is not
issued at all."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Repo, describe, init_repo, js, restored_path

ROOT = os.geteuid() == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root)."""
    if not ROOT:
        pytest.skip("mounting a filesystem needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False).returncode:
        pytest.skip("mounting a tmpfs failed here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Repo, Path, dict[str, bytes]]:
    """A snapshot of eight 300 kB files (2.4 MB: more than the tmpfs holds)."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}": os.urandom(300_000) for i in range(8)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    repo.backup(src)
    return repo, src, files


def test_restore_into_read_only_target_is_fatal_with_the_next_step(
    backed_up: tuple[Repo, Path, dict[str, bytes]], tmpfs: Path
) -> None:
    repo, _, _ = backed_up
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for target in (tmpfs, tmpfs / "below"):
        cp = repo.run("restore", "latest", "--target", target)
        assert cp.returncode == 4, describe(cp)
        assert "Traceback" not in cp.stderr
        assert f"cannot restore into {target}: Read-only file system; nothing was restored" in cp.stderr
        assert "next step: the filesystem is mounted read-only" in cp.stderr


def test_restore_stopped_by_a_full_target_leaves_no_partial_file(
    backed_up: tuple[Repo, Path, dict[str, bytes]], tmpfs: Path
) -> None:
    """Every file under its real name is whole; nothing is left under a temporary name."""
    repo, src, files = backed_up
    cp = repo.run("restore", "latest", "--target", tmpfs, "--json")
    assert cp.returncode in (3, 4), describe(cp)
    assert "Traceback" not in cp.stderr and "disk is full" in cp.stderr, describe(cp)
    where = restored_path(tmpfs, src)
    present = {p.name: p.read_bytes() for p in where.iterdir()} if where.exists() else {}
    for name, data in present.items():
        assert name in files, f"left behind: {name}"
        assert data == files[name], f"{name}: {len(data)} of {len(files[name])} bytes under its real name"
    assert len(present) < len(files)  # it did run out of room
    # the same restore completes once there is room, over what the first one left
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    doc = js(repo.ok("restore", "latest", "--target", tmpfs, "--json"))
    assert doc["stats"]["files"] == len(files)
    assert {p.name: p.read_bytes() for p in where.iterdir()} == files


def test_new_client_whose_key_file_cannot_be_written_issues_nothing(repo: Repo, tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    clients = sorted(p.name for p in repo.objects("clients"))
    cp = repo.run("key", "new-client", "laptop", "--out", tmpfs / "laptop.put")
    assert cp.returncode == 4, describe(cp)
    assert "Traceback" not in cp.stderr
    assert f"cannot write the put key to {tmpfs / 'laptop.put'}: Read-only file system" in cp.stderr
    assert "next step: that filesystem is mounted read-only" in cp.stderr
    assert sorted(p.name for p in repo.objects("clients")) == clients  # no certificate issued
