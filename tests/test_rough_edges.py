"""Small things a new user hits, found by probing (issue 11, point 22): each is a clear answer
now, not a wrong one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import Repo, describe, js, restored_path
from test_checkpoint import _kill_after_checkpoint, add_tail


def test_stable_proc_and_sys_files_are_stored_as_they_are(repo: Repo, tmp_path: Path) -> None:
    """Their size says 0 or 4096 whatever they hold: two reads that agree make them stable, and
    what is stored is what they hold (not "kept changing", not a size of 0)."""
    files = [
        Path(p)
        for p in ("/proc/version", "/proc/sys/kernel/ostype", "/sys/kernel/mm/transparent_hugepage/enabled")
        if os.access(p, os.R_OK)
    ]
    if not files:
        pytest.skip("no /proc or /sys here")
    doc = repo.backup(*files)
    assert not [e for e in doc["events"] if e["code"] == "changed-while-read"], doc["events"]
    assert doc["level"] in ("ok", "note"), doc["events"]
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--target", target)
    for f in files:
        assert restored_path(target, f).read_bytes() == f.read_bytes(), f
    items = {i["path"]: i for i in js(repo.ok("ls", "latest", "-R", "--json"))["items"]}
    for f in files:
        assert items[str(f)]["size"] == len(f.read_bytes()), f
    shutil.rmtree(target)


def test_ls_quotes_names_as_gnu_ls_does(repo: Repo, tmp_path: Path) -> None:
    """A newline, an escape sequence or a byte that is not UTF-8 in a name is shown quoted, one
    item per line, in a form that a shell turns back into the very name."""
    src = tmp_path / "src"
    src.mkdir()
    names = [b"with\nnewline", b"esc\x1b[31mred", b"\xff\xfe", b"it's", b"plain", b"sp ace"]
    for n in names:
        (src / os.fsdecode(n)).write_bytes(b"x")
    os.symlink(b"target\nline", os.path.join(os.fsencode(src), b"link"))
    repo.backup(src)
    cp = repo.ok("ls", "latest", str(src))
    assert "\x1b" not in cp.stdout
    lines = cp.stdout.splitlines()
    assert len(lines) == len(names) + 1, cp.stdout
    prefix = str(src) + "/"
    shown: dict[bytes, bytes] = {}
    for line in lines:
        quoted = re.split(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", line, maxsplit=1)[1]
        target = None
        if " -> " in quoted:
            quoted, target = quoted.split(" -> ")
        out = subprocess.run(
            ["bash", "-c", f"printf %s {quoted}"], capture_output=True, check=True, env={"LC_ALL": "C"}
        ).stdout
        assert out.startswith(os.fsencode(prefix)), line
        name = out[len(prefix) :]
        shown[name] = b""
        if target is not None:
            shown[name] = subprocess.run(["bash", "-c", f"printf %s {target}"], capture_output=True, check=True).stdout
    assert set(shown) == {*names, b"link"}
    assert shown[b"link"] == b"target\nline"
    assert "  " + prefix + "plain" in cp.stdout  # a plain name stays as it is


def test_restore_with_an_empty_target_is_refused(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    repo.backup(src)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cp = repo.run("restore", "latest", "--target", "", cwd=cwd)
    assert cp.returncode == 2, describe(cp)
    assert "--target is empty" in cp.stderr and "next step:" in cp.stderr
    assert list(cwd.iterdir()) == []  # nothing restored into the current directory


@pytest.mark.parametrize("bad", ["zz", "", "ABC", "g" * 64, "0" * 63, "../../../etc"])
def test_check_expect_that_is_no_repository_id_is_a_usage_error(repo: Repo, bad: str) -> None:
    for mode in (["--keyless"], []):
        cp = repo.run("check", *mode, "--expect", bad)
        assert cp.returncode == 2, describe(cp)
        assert "is not a repository id" in cp.stderr and "64 hex digits" in cp.stderr
    # a well-formed id of another repository is still what it was: damage found
    cp = repo.run("check", "--keyless", "--expect", "0" * 64)
    assert cp.returncode == 14, describe(cp)
    assert repo.run("check", "--keyless", "--expect", repo.id.upper()).returncode == 0


@pytest.mark.parametrize("name", ["", "a/b", " lead", "x" * 129])
def test_new_client_with_an_unusable_name_is_refused(repo: Repo, tmp_path: Path, name: str) -> None:
    before = repo.objects("clients")
    cp = repo.run("key", "new-client", name, "--out", tmp_path / "k.put")
    assert cp.returncode == 2, describe(cp)
    assert "is not usable" in cp.stderr and "next step:" in cp.stderr
    assert repo.objects("clients") == before and not (tmp_path / "k.put").exists()


def test_verify_of_a_missing_path_names_it(repo: Repo, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    cp = repo.run("verify", missing)
    assert cp.returncode == 2, describe(cp)
    assert f"{missing} does not exist" in cp.stderr and "next step:" in cp.stderr


def test_incomplete_snapshot_lists_what_it_restores(repo: Repo, tmp_path: Path) -> None:
    """The statistics of a snapshot made from a checkpoint count the files of its tree, not
    the files the run had read (some of which were not in the tree yet)."""
    src = tmp_path / "src"
    for d in range(8):
        sub = src / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(120):
            (sub / f"s{f}").write_bytes(os.urandom(2000))
        for f in range(3):
            (sub / f"big{f}").write_bytes(os.urandom(3 << 20))
    # the run is still going when a checkpoint covers 300 files (with 128 MiB of tail, an idle
    # machine once finished it first)
    add_tail(src, files=16)
    _kill_after_checkpoint(repo, src, min_files=300)
    repo.backup(src)
    (first,) = [s for s in js(repo.ok("snapshots", "--json"))["snapshots"] if s["seq"] == 1]
    assert first["complete"] is False
    listed = [i for i in js(repo.ok("ls", first["id"], "-R", "--json"))["items"] if i["type"] == "f"]
    target = tmp_path / "t"
    restored = js(repo.ok("restore", first["id"], "--target", target, "--json"))["stats"]
    shutil.rmtree(target)
    assert first["stats"]["files"] == len(listed) == restored["files"] + restored["hardlinks"]
    assert first["stats"]["bytes"] == sum(i["size"] for i in listed) == restored["bytes"]
