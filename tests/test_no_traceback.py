"""Every command against a place it cannot use ends with a message and its exit code, never a
traceback (issue 11, point 15).

Each command runs against four kinds of trouble, each made real: the repository and every file
the command writes on a read-only filesystem (a tmpfs mounted read-only, what ext4's
errors=remount-ro does to a failing disk), on a full one (a small tmpfs filled to the last
block), below a directory that does not exist, and a repository this user may not read (mode
000, the command run without root's right to ignore file modes). A command may succeed where it
needs nothing from the trouble (``snapshots`` reads a read-only repository); it may not crash.
Restore also gets the exit codes the user guide promises: 4 when nothing can be written at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Unprivileged
from helpers import Repo, describe, init_repo, make_tree, run_bunker

ROOT = os.geteuid() == 0
# exit codes a command may end with here; 1 (warn) is also what Python gives an uncaught exception
CLEAN_CODES = {0, 2, 3, 4, 10, 11, 12, 13, 14, 15}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    """A repository with one snapshot, its keys in the test's config directory, and its source."""
    base = tmp_path_factory.mktemp("made")
    repo = init_repo(base / "r", client="sweep")
    src = base / "src"
    make_tree(src)
    repo.backup(src)
    return repo, src


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=False)
    if cp.returncode != 0:
        pytest.skip("mounting a tmpfs failed here")


def _fill(mnt: Path) -> None:
    """Fill the filesystem to the last byte."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.fixture
def place(request: pytest.FixtureRequest, made: tuple[Repo, Path], tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(repository, directory for the files a command writes) in the trouble named by the
    test's ``trouble`` parameter; the repository is a copy of ``made``'s."""
    trouble = request.param
    repo, _ = made
    if trouble == "missing-parent":
        gone = tmp_path / "no-such-dir" / "below"
        yield gone / "repo", gone / "out"
        return
    if not ROOT:
        pytest.skip("mounting a read-only or full filesystem needs root")
    mnt = Path(tempfile.mkdtemp(prefix="bunker-trouble-", dir="/tmp"))
    try:
        _mount_tmpfs(mnt, "16m")
        shutil.copytree(repo.path, mnt / "repo")
        (mnt / "out").mkdir()
        if trouble == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        elif trouble == "full":
            _fill(mnt)
        yield mnt / "repo", mnt / "out"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def _commands(repo: Repo, src: Path, out: Path) -> dict[str, list[str | os.PathLike[str]]]:
    return {
        "init": ["init", "--client", "c2"],  # a new repository where the others use the copy
        "backup": ["backup", src],
        "forward": ["forward"],
        "snapshots": ["snapshots"],
        "ls": ["ls", "latest", "-R"],
        "restore": ["restore", "latest", "--target", out / "restored"],
        "export-tar": ["export-tar", "latest", "-o", out / "x.tar"],
        "check": ["check"],
        "check-keyless": ["check", "--keyless", "--expect", repo.id],
        "check-read-data": ["check", "--read-data"],
        "verify": ["verify", src],
        "forget": ["forget", "--keep-last", "1", "--master-key", repo.master_key],
        "prune": ["prune", "--master-key", repo.master_key],
        "key-info": ["key", "info"],
        "key-export": ["key", "export", "--master", out / "master.key"],
        "key-new-client": ["key", "new-client", "another", "--out", out / "another.put"],
        "key-passwd": ["key", "passwd"],
        "key-merge-configs": ["key", "merge-configs"],
        "migrate": ["migrate", "--dry-run"],
        "index-rebuild": ["index", "rebuild"],
    }


COMMANDS = [
    "init",
    "backup",
    "forward",
    "snapshots",
    "ls",
    "restore",
    "export-tar",
    "check",
    "check-keyless",
    "check-read-data",
    "verify",
    "forget",
    "prune",
    "key-info",
    "key-export",
    "key-new-client",
    "key-passwd",
    "key-merge-configs",
    "migrate",
    "index-rebuild",
]


def _assert_message(cp: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in cp.stderr, describe(cp)
    assert cp.returncode in CLEAN_CODES, describe(cp)
    if cp.returncode != 0:
        assert cp.stderr.strip(), describe(cp)


@pytest.mark.parametrize("place", ["read-only", "full", "missing-parent"], indirect=True)
@pytest.mark.parametrize("command", COMMANDS)
def test_command_in_trouble_ends_with_a_message(
    command: str, place: tuple[Path, Path], made: tuple[Repo, Path], tmp_path: Path
) -> None:
    repo, src = made
    repo_path, out = place
    env = dict(repo.env, BUNKER_NEW_PASSPHRASE="another passphrase")
    # a state directory of its own: a spooled backup or a forward changes it
    shutil.copytree(Path(repo.env["XDG_DATA_HOME"]), tmp_path / "data", dirs_exist_ok=True)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    args = _commands(repo, src, out)[command]
    where = out / "new-repo" if command == "init" else repo_path
    cp = run_bunker(*args, "--repo", where, env=env, timeout=180)
    _assert_message(cp)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_on_unreadable_repository_ends_with_a_message(
    command: str, made: tuple[Repo, Path], unprivileged: Unprivileged
) -> None:
    repo, src = made
    base = unprivileged.base
    shutil.copytree(repo.path, base / "repo")
    shutil.copytree(repo.base, base / "home", ignore=shutil.ignore_patterns("repo"))
    env = dict(repo.env, BUNKER_NEW_PASSPHRASE="another passphrase")
    for k, sub in (("XDG_DATA_HOME", "data"), ("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache")):
        env[k] = str(base / "home" / sub)
    env["HOME"] = str(base / "home" / "home")
    master = base / "home" / "config" / repo.master_key.relative_to(repo.base / "config")
    (base / "out").mkdir()
    unprivileged.own(base)
    os.chmod(base / "repo", 0)
    args = [str(master) if a == repo.master_key else a for a in _commands(repo, src, base / "out")[command]]
    cp = run_bunker(*args, "--repo", base / "repo", env=env, prefix=unprivileged.prefix, timeout=180)
    _assert_message(cp)
