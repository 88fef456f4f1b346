"""Restore never writes outside its target (issue 10): every path below the target is reached
from the target's descriptor one component at a time without following symlinks, and the
directories above a path restored alone are made like every directory of a full restore: a
symlink (or anything else) in the place of a directory of the snapshot is replaced, or, when it
cannot be, the item fails with a message naming it (exit 3). Never followed."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from bunker.errors import ExitCode
from helpers import Repo, describe, js, make_env, restored_path, run_bunker


def _two_snapshots(repo: Repo, src: Path, outside: Path, **kw: Any) -> tuple[str, str]:
    """X: ``sx/link`` is a symlink to ``outside``; Y: ``sx/link`` is a directory with ``file``."""
    (src / "sx").mkdir(parents=True)
    (src / "sx" / "link").symlink_to(outside)
    x = repo.backup(src, **kw)["snapshot"]
    (src / "sx" / "link").unlink()
    (src / "sx" / "link").mkdir()
    (src / "sx" / "link" / "file").write_bytes(b"the file of snapshot Y")
    y = repo.backup(src, **kw)["snapshot"]
    return x, y


def test_partial_restore_replaces_a_restored_symlink_instead_of_following_it(repo: Repo, tmp_path: Path) -> None:
    """Restoring X puts the symlink ``sx/link -> outside`` in the target; restoring only
    ``sx/link/file`` of Y into the same target replaces it by Y's directory (as the full restore
    of Y would) and writes nothing outside. The old code made the parents with os.makedirs,
    which followed the link and wrote ``outside/file``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src"
    x, y = _two_snapshots(repo, src, outside)
    target = tmp_path / "t"
    repo.ok("restore", x, "--target", target)
    out = restored_path(target, src)
    assert (out / "sx" / "link").is_symlink()

    doc = js(repo.ok("restore", y, f"{src}/sx/link/file", "--target", target, "--json"))
    assert doc["stats"]["failed"] == 0 and doc["stats"]["files"] == 1
    assert list(outside.iterdir()) == []
    assert not (out / "sx" / "link").is_symlink()
    assert (out / "sx" / "link" / "file").read_bytes() == b"the file of snapshot Y"

    # the whole directory alone, over the symlink again: the same rule
    (out / "sx" / "link" / "file").unlink()
    (out / "sx" / "link").rmdir()
    (out / "sx" / "link").symlink_to(outside)
    js(repo.ok("restore", y, f"{src}/sx/link", "--target", target, "--json"))
    assert list(outside.iterdir()) == []
    assert (out / "sx" / "link" / "file").read_bytes() == b"the file of snapshot Y"


def test_partial_restore_over_a_file_in_place_of_a_parent(repo: Repo, tmp_path: Path) -> None:
    """A regular file where the snapshot has a parent directory is replaced too, as the full
    restore replaces it; the directories the restore made get the snapshot's modes."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"data")
    os.chmod(src / "a", 0o751)
    snap = repo.backup(src)["snapshot"]
    target = tmp_path / "t"
    out = restored_path(target, src)
    out.mkdir(parents=True)
    (out / "a").write_bytes(b"in the way")
    doc = js(repo.ok("restore", snap, f"{src}/a/b/f", "--target", target, "--json"))
    assert doc["stats"]["failed"] == 0
    assert (out / "a" / "b" / "f").read_bytes() == b"data"
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o751


def _plant(target: Path, src: Path, outside: Path, owner: int) -> Path:
    """A symlink to ``outside`` in place of the target's first directory on the way to the
    restored path (the snapshot mirrors absolute paths: ``<target>/tmp/...``), owned by ``owner``."""
    first = target / src.parts[1]
    first.symlink_to(outside)
    os.lchown(first, owner, owner)
    return first


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_symlink_planted_by_another_user_in_a_shared_target(tmp_path: Path, unprivileged: Any) -> None:
    """A target others may write in (mode 1777, like /tmp), where another user planted a symlink
    in place of the first directory on the way. Root restores a path alone: the symlink is
    replaced (root may remove it, as the full restore does) and nothing lands outside. A user
    who cannot remove it (the sticky bit: it is root's) gets an error naming it, exit 3, and
    nothing is written through it, although the place it points to is the user's own."""
    base = unprivileged.base
    prefix = list(unprivileged.prefix)
    if not unprivileged.as_nobody:  # this Python is out of nobody's reach: nobody may read and search all
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        if run_bunker("--version", env=make_env(base / "probe"), prefix=prefix).returncode != 0:
            pytest.skip("user nobody cannot run bunker here")
    src = base / "src"
    (src / "sx").mkdir(parents=True)
    (src / "sx" / "file").write_bytes(b"restored")
    env = make_env(base / "env")
    repo = base / "repo"
    assert run_bunker("init", "--repo", repo, "--json", env=env).returncode == 0
    cp = run_bunker("backup", src, "--repo", repo, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    wanted = f"{src}/sx/file"

    # root restores; the symlink is nobody's
    outside = base / "outside-root"
    outside.mkdir()
    target = base / "shared"
    target.mkdir(mode=0o1777)
    os.chmod(target, 0o1777)
    planted = _plant(target, src, outside, 65534)
    cp = run_bunker("restore", "latest", wanted, "--repo", repo, "--target", target, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    assert list(outside.iterdir()) == []
    assert not planted.is_symlink()
    assert (restored_path(target, src) / "sx" / "file").read_bytes() == b"restored"

    # nobody restores; the symlink is root's and points to a directory nobody may write in
    for dirpath, dirnames, filenames in os.walk(base / "env"):
        for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
            os.chown(n, 65534, 65534, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(repo):
        for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
            os.chown(n, 65534, 65534, follow_symlinks=False)
    outside = base / "outside-nobody"
    outside.mkdir()
    os.chown(outside, 65534, 65534)
    target = base / "shared2"
    target.mkdir()
    os.chmod(target, 0o1777)
    planted = _plant(target, src, outside, 0)
    cp = run_bunker("restore", "latest", wanted, "--repo", repo, "--target", target, "--json", env=env, prefix=prefix)
    assert cp.returncode == ExitCode.ERR, describe(cp)
    assert list(outside.iterdir()) == []
    assert planted.is_symlink()
    doc = js(cp)
    assert doc["stats"]["failed"] == 1 and doc["stats"]["files"] == 0
    (ev,) = [e for e in doc["events"] if e["level"] == "err"]
    assert ev["path"] == str(planted)
    assert "a symlink is where the snapshot has a directory and cannot be replaced" in ev["message"]
    assert "never followed" in ev["message"]


def test_confined_paths_never_follow_a_symlink(tmp_path: Path) -> None:
    """deep_path below a confined root, in-process: calls work on short paths as on long ones;
    a directory on the way replaced by a symlink (as another user could, during a restore or a
    verify) makes the call fail instead of reaching the place the symlink names; ``..`` is
    refused; the leaf is never followed (open, chmod)."""
    from bunker.fs import deep_path

    root = os.fsencode(tmp_path / "root")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "b").mkdir(parents=True)
    os.makedirs(root + b"/a/b")
    with deep_path.confined(root):
        fd = deep_path.open(root + b"/a/b/f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        deep_path.chmod(root + b"/a/b/f", 0o640)
        assert stat.S_IMODE(deep_path.lstat(root + b"/a/b/f").st_mode) == 0o640
        assert deep_path.listdir(root + b"/a/b") == [b"f"]
        deep_path.symlink(os.fsencode(elsewhere / "target"), root + b"/a/b/l")
        (elsewhere / "target").write_bytes(b"")
        with pytest.raises(OSError):
            deep_path.chmod(root + b"/a/b/l", 0o600)  # the symlink's target is left alone
        with pytest.raises(OSError):
            os.close(deep_path.open(root + b"/a/b/l", os.O_RDONLY))
        assert stat.S_IMODE((elsewhere / "target").stat().st_mode) != 0o600
        with pytest.raises(PermissionError):
            deep_path.lstat(root + b"/a/../a/b/f")
        # a directory on the way becomes a symlink to a copy of it
        os.rename(root + b"/a", root + b"/moved")
        os.symlink(elsewhere, root + b"/a")
        deep_path.forget()  # (what this thread cached still leads to the real, moved directory)
        with pytest.raises(NotADirectoryError):
            deep_path.lstat(root + b"/a/b/f")
        with pytest.raises(NotADirectoryError):
            deep_path.mkdir(root + b"/a/b/new")
        with pytest.raises(NotADirectoryError):
            deep_path.makedirs(root + b"/a/b/c/d")
        assert sorted(os.listdir(elsewhere / "b")) == []
    # outside the block, paths are plain again (the caller's own paths, as named)
    assert deep_path.lstat(root + b"/a/b").st_ino == os.stat(elsewhere / "b").st_ino
