"""A directory in which nothing changed keeps the tree an earlier run stored (backup/tree_reuse.py):
a no-change run builds no entry of its files. Every kind of change is seen (the directory and its
ancestors are built again, and the newest snapshot restores the source as it is now); a directory
during whose walk a problem was logged, or with a hard-linked file, is never recorded; and a
checkpoint taken while such a directory is open still holds its files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bunker.backup import chunkset_memo
from bunker.crypto.keyfile import load_put_key
from bunker.repo import refs
from bunker.repo.snapshot import parse_snapshot
from helpers import Repo, compare_trees, js, restored_path, xattrs_supported
from test_checkpoint import _kill_after_checkpoint

_T = TypeVar("_T")


def _source(src: Path) -> int:
    """A small tree; returns how many directories a backup of ``src`` walks (``src`` too)."""
    for d in ("a", "a/sub", "b", "c"):
        (src / d).mkdir(parents=True)
    for i in range(5):
        (src / "a" / f"f{i}").write_bytes(os.urandom(100 + i))
        (src / "b" / f"g{i}").write_bytes(os.urandom(3000 + i))
    (src / "a" / "sub" / "deep").write_bytes(b"deep")
    (src / "top.txt").write_bytes(b"top")
    os.symlink("a/f0", src / "link")
    return 5


def _restores_as_source(repo: Repo, src: Path, target: Path) -> None:
    repo.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def _same_size_new_content(p: Path) -> None:
    st = p.stat()
    p.write_bytes(os.urandom(st.st_size))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the ctime tells


def test_unchanged_directories_reuse_their_trees_and_every_change_is_seen(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    dirs = _source(src)
    first = repo.backup(src)
    assert first["stats"]["trees_reused"] == 0
    second = repo.backup(src)
    assert second["stats"]["trees_reused"] == dirs
    assert second["stats"]["files_unchanged"] == first["stats"]["files"]
    for key in ("files", "bytes", "entries", "entry_bytes", "chunks"):
        assert second["stats"][key] == first["stats"][key], key

    # (what changes, the directories built again: the changed one and its ancestors)
    changes: list[tuple[str, Callable[[], None], int]] = [
        ("content, same size and times", lambda: _same_size_new_content(src / "a" / "f1"), 2),
        ("mode", lambda: os.chmod(src / "a" / "f2", 0o600), 2),
        ("a file renamed", lambda: os.rename(src / "b" / "g1", src / "b" / "g1.old"), 2),
        ("a file deleted", lambda: os.unlink(src / "b" / "g2"), 2),
        ("a file added two levels down", lambda: (src / "a" / "sub" / "new").write_bytes(b"new"), 3),
        ("a symlink replaced", lambda: (os.unlink(src / "link"), os.symlink("b/g0", src / "link")), 1),
        ("a directory's mode", lambda: os.chmod(src / "c", 0o700), 1),
        ("a file in a directory made empty", lambda: (src / "c" / "x").write_bytes(b"x"), 2),
    ]
    if xattrs_supported(src):
        changes.append(("an xattr", lambda: os.setxattr(src / "a" / "f3", "user.k", b"v"), 2))
    if os.geteuid() == 0:
        changes.append(("an owner", lambda: os.chown(src / "b" / "g3", 4321, 4321), 2))
    for what, change, built in changes:
        change()
        doc = repo.backup(src)
        assert doc["stats"]["trees_reused"] == dirs - built, what
        _restores_as_source(repo, src, tmp_path / "t")
    assert repo.backup(src)["stats"]["trees_reused"] == dirs
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True


def test_a_directory_with_a_problem_or_a_hard_link_is_never_reused(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    dirs = _source(src)
    (src / "b" / "g0").rename(src / "b" / "z-future")  # walked last in b
    year_2300 = 10_413_792_000 * 10**9
    os.utime(src / "b" / "z-future", ns=(year_2300, year_2300))
    if (src / "b" / "z-future").stat().st_mtime_ns != year_2300:
        pytest.skip("this filesystem cannot hold the year 2300")
    os.link(src / "top.txt", src / "c" / "linked")
    first = repo.backup(src, rc=3)
    assert [e["code"] for e in first["events"] if e["level"] == "err"] == ["bad-metadata"]
    second = repo.backup(src, rc=3)
    # the err event comes again: b (the problem) and src (open while it was logged) are built
    # again, and so is c (a hard link, and so is src's own top.txt); a and a/sub are reused
    assert [e["code"] for e in second["events"] if e["level"] == "err"] == ["bad-metadata"]
    assert second["stats"]["trees_reused"] == dirs - 3
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--target", target)
    out = restored_path(target, src)
    assert (out / "c" / "linked").stat().st_ino == (out / "top.txt").stat().st_ino
    assert (out / "a" / "sub" / "deep").read_bytes() == b"deep"
    shutil.rmtree(target)


def test_a_checkpoint_while_a_reused_directory_is_open_holds_its_files(repo: Repo, tmp_path: Path) -> None:
    """``src`` is unchanged (its children's lstat results are the same: files are added two
    levels down), so its own files wait unbuilt while the walk reads 128 MiB below it. A
    checkpoint then must still list them: the incomplete snapshot restores them."""
    src = tmp_path / "src"
    _source(src)
    tail = src / "w" / "z"
    tail.mkdir(parents=True)
    repo.backup(src)
    for i in range(8):
        (tail / f"tail{i}.img").write_bytes(os.urandom(16 << 20))
    # paced: the 128 MiB below could be read within a few checkpoint intervals (CI failed so)
    _kill_after_checkpoint(repo, src, snapshots=1)
    doc = repo.backup(src)
    assert any(e["code"] == "incomplete-snapshot" for e in doc["events"]), doc["events"]
    snaps = {s["seq"]: s for s in js(repo.ok("snapshots", "--json"))["snapshots"]}
    assert snaps[2]["complete"] is False
    target = tmp_path / "t"
    repo.ok("restore", snaps[2]["id"], "--target", target)
    out = restored_path(target, src)
    assert (out / "top.txt").read_bytes() == b"top"
    assert os.readlink(out / "link") == "a/f0"
    assert sorted(p.name for p in (out / "a").iterdir()) == ["f0", "f1", "f2", "f3", "f4", "sub"]
    shutil.rmtree(target)
    _restores_as_source(repo, src, tmp_path / "t2")


@pytest.fixture
def quiet_parent() -> Iterator[Path]:
    """A directory for a source whose ancestors stay quiet: /tmp, where the other worker's tests
    create files at any moment, is not among them (a loaded machine changed it during each of
    eight pairs of runs). Removed afterwards."""
    base = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="bunker-quiet-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _ancestors(src: Path) -> list[tuple[int, int]]:
    """The times of the directories above ``src``. A backup records them (the trees above its
    paths), and tests on the other worker create files in /tmp at any moment: runs compared for
    the same root must not straddle such a change."""
    return [(st.st_mtime_ns, st.st_ctime_ns) for st in map(os.stat, src.parents)]


def _runs_under_quiet_ancestors(src: Path, runs: Callable[[], _T]) -> _T:
    """``runs()`` again until the directories above ``src`` did not change while it ran."""
    for _ in range(8):
        before = _ancestors(src)
        got = runs()
        if _ancestors(src) == before:
            return got
    raise AssertionError(f"the directories above {src} changed during each of 8 attempts")


def _chunkset_of(repo: Repo, snapshot_id: str) -> str:
    (path,) = [p for p in repo.objects("snapshots") if p.name == snapshot_id]
    return parse_snapshot(path.read_bytes()).env.chunkset


def test_a_run_with_the_last_snapshots_root_names_its_chunk_set_again(
    repo: Repo, tmp_path: Path, quiet_parent: Path
) -> None:
    """Nothing changed: the run names its last snapshot's chunk set (the same root names the
    same chunks) instead of building it; a lost object of that set is built again; a change
    gives a new set. check --read-data agrees with each snapshot's set."""
    src = quiet_parent / "src"
    _source(src)
    cache = Path(repo.env["XDG_CACHE_HOME"])

    def runs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], bool]:
        first = repo.backup(src)
        memo = next(cache.rglob(chunkset_memo.FILE))
        memo.unlink()  # the set is built again and remembered
        second = repo.backup(src)
        before = memo.stat().st_mtime_ns
        third = repo.backup(src)  # named again: the memo is left as it is
        assert memo.stat().st_mtime_ns == before or _chunkset_of(repo, third["snapshot"]) != _chunkset_of(
            repo, first["snapshot"]
        )
        top = repo.path / _chunkset_of(repo, first["snapshot"])
        kept = top.read_bytes()
        top.unlink()  # a repository that lost the set's top object
        fourth = repo.backup(src)  # ... stores it again
        stored_again = top.exists()
        if not stored_again:
            top.write_bytes(kept)  # (an attempt whose runs saw another root: its snapshots stay whole)
        return first, second, third, fourth, stored_again

    first, second, third, fourth, stored_again = _runs_under_quiet_ancestors(src, runs)
    top = _chunkset_of(repo, first["snapshot"])
    assert [_chunkset_of(repo, s["snapshot"]) for s in (second, third, fourth)] == [top] * 3
    assert stored_again

    (src / "a" / "new").write_bytes(os.urandom(500))
    changed = repo.backup(src)
    assert _chunkset_of(repo, changed["snapshot"]) != _chunkset_of(repo, first["snapshot"])
    assert changed["stats"]["chunks"] == first["stats"]["chunks"] + 1  # the new file (two trees replaced)
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    _restores_as_source(repo, src, tmp_path / "t")


def test_a_run_whose_set_differs_in_a_few_ids_builds_the_set_a_whole_build_makes(
    repo: Repo, quiet_parent: Path
) -> None:
    """Only a directory above the source changed (its time, when a file was created beside the
    source), then a file: each run builds its chunk set from the last one's layout (naming again
    the parts it shares: tests/test_refs_split.py), and the set is the one a whole build makes."""
    src = quiet_parent / "src"
    src.mkdir()
    for i in range(6000):  # a few parts of the chunk set (a part ends after 1 id in 2,048)
        (src / f"f{i:05d}").write_bytes(os.urandom(40))
    first = repo.backup(src)
    memo = next(Path(repo.env["XDG_CACHE_HOME"]).rglob(chunkset_memo.FILE))
    layout = chunkset_memo.recall(str(memo.parent))
    assert layout is not None and layout.layout is not None and layout.layout.names == layout.parts

    (quiet_parent / "beside").write_bytes(b"a new file beside the source: its parent's time changes")
    second = repo.backup(src)
    assert second["stats"]["chunks"] == first["stats"]["chunks"]  # the ancestors' trees are replaced
    assert _chunkset_of(repo, second["snapshot"]) != _chunkset_of(repo, first["snapshot"])
    (src / "f00042").write_bytes(os.urandom(41))

    def runs() -> tuple[dict[str, Any], dict[str, Any]]:
        third = repo.backup(src)
        # the same set a whole build makes: without the memo, a run with the same root builds it whole
        memo.unlink()
        return third, repo.backup(src)

    third, fourth = _runs_under_quiet_ancestors(src, runs)
    assert third["stats"]["chunks"] == first["stats"]["chunks"]
    assert _chunkset_of(repo, fourth["snapshot"]) == _chunkset_of(repo, third["snapshot"])
    top = _chunkset_of(repo, fourth["snapshot"])
    ids = refs.read_set(top, lambda n: (repo.path / n).read_bytes(), load_put_key(str(repo.put_key)).secrets)
    assert len(ids) == fourth["stats"]["chunks"]
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
