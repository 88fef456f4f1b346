"""Backup and restore give back a byte-identical tree; standard input backups."""

from __future__ import annotations

import os
import random
from pathlib import Path

from helpers import Repo, compare_trees, js, make_tree, restored_path, snapshot_tree


def test_roundtrip_generated_tree(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    before = snapshot_tree(src)
    doc = repo.backup(src)
    assert doc["level"] == "note"  # the master key still sits in the test's config dir
    s = doc["stats"]
    assert s["files"] == len(files)
    assert s["files_new"] == len(files)
    assert s["bytes"] == sum(len(v) for v in files.values())
    assert s["errors"] == 0

    target = tmp_path / "target"
    cp = repo.ok("restore", "latest", "--target", target, "--json")
    rdoc = js(cp)
    assert rdoc["level"] in ("ok", "note")
    assert rdoc["stats"]["failed"] == 0
    assert rdoc["stats"]["files"] >= len(files)

    out = restored_path(target, src)
    compare_trees(src, out)
    # the source was not touched by the backup
    assert snapshot_tree(src) == before
    # spot checks on the odd names and symlinks, independent of the tree walker
    assert os.readlink(os.path.join(os.fsencode(out), b"sub/link-to-odd\nname")) == b"../\xff\xfe"
    with open(os.path.join(os.fsencode(out), b"\xff\xfe"), "rb") as f:
        assert f.read() == files[b"\xff\xfe"]
    assert (out / "empty").stat().st_size == 0
    assert list((out / "empty-dir").iterdir()) == []
    assert (out / "setuid-bin").stat().st_mode & 0o7777 == 0o4755


def test_restore_subpath_and_ls(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    snap = repo.backup(src)["snapshot"]

    listing = js(repo.ok("ls", snap[:10], str(src), "--json", "-R"))
    paths = {it["path"] for it in listing["items"]}
    assert str(src / "sub" / "deeper" / "text.txt") in paths
    assert str(src / "link-rel") in paths
    link = next(it for it in listing["items"] if it["path"] == str(src / "link-rel"))
    assert link["type"] == "l" and link["target"] == "small.txt"
    text = next(it for it in listing["items"] if it["path"] == str(src / "sub" / "deeper" / "text.txt"))
    assert text["size"] == len(files[b"sub/deeper/text.txt"]) and text["mode"] == 0o444

    target = tmp_path / "part"
    repo.ok("restore", snap[:10], str(src / "sub"), "--target", target)
    compare_trees(src / "sub", restored_path(target, src / "sub"))
    assert not restored_path(target, src / "small.txt").exists()


def test_stdin_backup(repo: Repo, tmp_path: Path) -> None:
    rng = random.Random(7)
    data = b"-- SQL dump\n" + rng.randbytes(3 << 20) + b"INSERT INTO t VALUES (1);\n" * 2000
    doc = js(repo.ok("backup", "--stdin-name", "db.sql", "--json", input=data))
    assert doc["stats"]["bytes"] == len(data)
    assert doc["stats"]["files"] == 1

    target = tmp_path / "t"
    repo.ok("restore", doc["snapshot"][:12], "--target", target)
    assert (target / "db.sql").read_bytes() == data
    listing = js(repo.ok("ls", "latest", "--json"))
    assert [(it["path"], it["size"]) for it in listing["items"]] == [("/db.sql", len(data))]


def test_stdin_name_is_validated(repo: Repo, tmp_path: Path) -> None:
    cp = repo.run("backup", "--stdin-name", "a/b", input=b"x")
    assert cp.returncode == 2, cp.stderr
    assert "plain file name" in cp.stderr
    cp = repo.run("backup", "--stdin-name", "x", str(tmp_path), input=b"x")
    assert cp.returncode == 2
    cp = repo.run("backup")
    assert cp.returncode == 2 and "nothing to back up" in cp.stderr
