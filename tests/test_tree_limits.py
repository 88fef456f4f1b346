"""Trees cannot make a walk unbounded (issue 10): the snapshot's signed statistics ``entries``
and ``entry_bytes`` (FORMAT.md section 13) count every path of its trees exactly, and restore,
ls and export-tar stop with a damage error once a walk meets more; a tree that appears again
below itself is never followed; oversized trees and index objects are refused before they are
read (FORMAT.md section 14)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bunker.backup.commit import commit_snapshot
from bunker.crypto.keyfile import load_put_key
from bunker.errors import ExitCode
from bunker.repo import blob
from bunker.repo.blob_reader import BlobReader
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.index_cache import IndexCache
from bunker.repo.pack import KIND_META
from bunker.repo.records import new_session_id
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.tree import MAX_TREE, TreeBudget, TreeCycle, encode_tree
from bunker.restore.restorer import Restorer
from bunker.runlog import RunLog
from bunker.storage.local import LocalBackend
from bunker.tar.writer import TarExporter
from helpers import Repo, b3, describe, js, restored_path
from test_checkpoint import _kill_after_checkpoint, _tree


def _count(top: Path) -> tuple[int, int]:
    """(items below ``top``, bytes of its regular files, every name counted), symlinks not followed."""
    n = nbytes = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            n += 1
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                nbytes += st.st_size
    return n, nbytes


def _claims(repo: Repo, snap: str) -> tuple[int, int]:
    (s,) = [s for s in js(repo.ok("snapshots", "--json"))["snapshots"] if s["id"] == snap]
    return s["stats"]["entries"], s["stats"]["entry_bytes"]


def _restored_count(repo: Repo, snap: str, target: Path) -> tuple[int, int]:
    doc = js(repo.ok("restore", snap, "--target", target, "--json"))
    assert doc["stats"]["failed"] == 0, doc["events"]
    return _count(target)


def _rich_tree(src: Path) -> None:
    """Hard links (in two directories), empty directories that repeat (one tree, many names),
    a sparse file, symlinks (one to a directory), a fifo, nested directories."""
    (src / "a" / "b").mkdir(parents=True)
    (src / "other").mkdir()
    (src / "a" / "data.bin").write_bytes(os.urandom(300_000))
    os.link(src / "a" / "data.bin", src / "other" / "same.bin")
    os.link(src / "a" / "data.bin", src / "a" / "b" / "again.bin")
    for i in range(5):
        (src / "empties" / f"e{i}").mkdir(parents=True)
        (src / "twins" / f"t{i}" / "inner").mkdir(parents=True)
        (src / "twins" / f"t{i}" / "inner" / "same.txt").write_bytes(b"identical")
    with open(src / "sparse.img", "wb") as f:
        f.truncate(50 << 20)
        f.seek(10 << 20)
        f.write(b"data in the middle")
    (src / "a" / "link-to-b").symlink_to("b")
    (src / "dangling").symlink_to("/does/not/exist")
    os.mkfifo(src / "fifo")
    (src / "a" / "b" / "empty.txt").write_bytes(b"")


def test_stats_count_every_path_of_the_trees(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _rich_tree(src)
    first = repo.backup(src)
    entries, entry_bytes = first["stats"]["entries"], first["stats"]["entry_bytes"]
    assert (entries, entry_bytes) == _claims(repo, first["snapshot"])
    target = tmp_path / "t"
    assert _restored_count(repo, first["snapshot"], target) == (entries, entry_bytes)
    # the same count from the trees themselves (ls walks them: every path is an item)
    items = js(repo.ok("ls", first["snapshot"], "/", "-R", "--json"))["items"]
    assert len(items) == entries
    assert sum(it["size"] for it in items if it["type"] == "f") == entry_bytes
    assert entry_bytes == 3 * 300_000 + 5 * 9 + (50 << 20)  # every name of the hard link, the apparent size
    # an unchanged run (from the files cache) stores the same trees and claims the same
    second = repo.backup(src)
    assert (second["stats"]["entries"], second["stats"]["entry_bytes"]) == (entries, entry_bytes)


def test_stats_of_stdin_and_tar_backups(repo: Repo, tmp_path: Path) -> None:
    doc = js(repo.ok("backup", "--stdin-name", "db.sql", "--json", input=b"x" * 12345))
    assert (doc["stats"]["entries"], doc["stats"]["entry_bytes"]) == (1, 12345)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("top/f1", b"abc"), ("top/deep/er/f2", b"defgh"), ("loose", b"z" * 1000)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("top/deep/hard")
        ti.type, ti.linkname = tarfile.LNKTYPE, "top/f1"
        tar.addfile(ti)
        ti = tarfile.TarInfo("top/empty")
        ti.type = tarfile.DIRTYPE
        tar.addfile(ti)
    doc = js(repo.ok("backup", "--tar", "-", "--json", input=buf.getvalue()))
    # top, top/f1, top/deep, top/deep/er, top/deep/er/f2, top/deep/hard, top/empty, loose
    assert (doc["stats"]["entries"], doc["stats"]["entry_bytes"]) == (8, 3 + 5 + 1000 + 3)
    assert _restored_count(repo, doc["snapshot"], tmp_path / "t") == (8, 1011)


def test_checkpoint_stats_are_its_partial_trees_totals(repo: Repo, tmp_path: Path) -> None:
    """The incomplete snapshot made from a killed run's last checkpoint claims exactly what its
    partial tree holds (files still being read are not in it)."""
    src = tmp_path / "src"
    _tree(src)
    for i in range(3):
        (src / f"empty{i}").mkdir()
    os.link(src / "d0" / "f0.bin", src / "d0" / "hard.bin")
    _kill_after_checkpoint(repo, src, min_files=5)
    doc = repo.backup(src)
    assert any(e["code"] == "incomplete-snapshot" for e in doc["events"])
    (incomplete,) = [s for s in js(repo.ok("snapshots", "--json"))["snapshots"] if not s["complete"]]
    claims = (incomplete["stats"]["entries"], incomplete["stats"]["entry_bytes"])
    assert 0 < claims[0] < doc["stats"]["entries"]
    assert _restored_count(repo, incomplete["id"], tmp_path / "t") == claims


# ---------------------------------------------------------------------- crafted snapshots


def _craft(repo: Repo, tmp_path: Path, trees: Callable[[Callable[[bytes], bytes]], bytes], **stats: int) -> str:
    """A snapshot signed with the repository's put key whose root tree ``trees`` builds (it gets
    a function that stores one tree's bytes and returns its id), claiming ``stats``."""
    put = load_put_key(str(repo.put_key))
    r = Repository.open(LocalBackend(str(repo.path)))
    cert = r.check_put_key(put)
    writer = SessionWriter(r, put, cert.name, IndexCache(r, put.secrets, None).load())
    chunks: set[bytes] = set()

    def store(data: bytes) -> bytes:
        cid = blob.chunk_id(put.secrets, data)
        writer.store(cid, data, KIND_META)
        chunks.add(cid)
        return cid

    root = trees(store)
    now = time.time()
    body = {"host": "crafted", "user": "x", "paths": ["/"], "tags": [], "started": now, "finished": now, "argv": []}
    try:
        committed = commit_snapshot(
            r,
            put,
            cert,
            writer,
            root=root,
            chunk_ids=ChunkIdSet(chunks),
            stats={"files": 0, "dirs": 0, "bytes": 0, **stats},
            log=RunLog(),
            body_extra=body,
            state_dir=str(tmp_path / "crafter-state"),
            session=new_session_id(),
        )
    finally:
        writer.close()
    return committed.name.split("/", 1)[1]


def _bomb(levels: int) -> Callable[[Callable[[bytes], bytes]], bytes]:
    """Trees that each name the next one twice: 2^levels paths from a few KB of trees."""

    def build(store: Callable[[bytes], bytes]) -> bytes:
        tid = store(encode_tree([]))
        for _ in range(levels):
            d = {"t": "d", "m": 0o755, "st": tid}
            tid = store(encode_tree([{**d, "n": b"a"}, {**d, "n": b"b"}]))
        return tid

    return build


def test_a_tree_bomb_stops_restore_ls_and_export(repo: Repo, tmp_path: Path) -> None:
    """40 levels of trees naming the next one twice (2^41 entries) in a snapshot that claims
    the 80 entries of its distinct trees: every walk stops with the damage error after about
    that many, instead of running for ever."""
    snap = _craft(repo, tmp_path, _bomb(40), entries=80, entry_bytes=0)

    target = tmp_path / "t"
    cp = repo.run("restore", snap, "--target", target)
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    assert f"snapshot {snap[:12]}" in cp.stderr and "signed statistics claim 80 tree entries" in cp.stderr
    assert "bunker snapshots" in cp.stderr  # the next step
    assert _count(target)[0] <= 82

    cp = repo.run("ls", snap, "/", "-R")
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    assert "signed statistics claim 80 tree entries" in cp.stderr

    out = tmp_path / "x.tar"
    cp = repo.run("export-tar", snap, "-o", out)
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    assert "signed statistics claim 80 tree entries" in cp.stderr
    assert not out.exists()

    # a path below the top is one walk of its own, within the same claims
    cp = repo.run("ls", snap, "/a/b/a", "-R")
    assert cp.returncode == ExitCode.INTEGRITY and "signed statistics claim" in cp.stderr, describe(cp)
    items = js(repo.ok("ls", snap, "/a/b/a", "--json"))["items"]  # one directory: within the claims
    assert [it["path"] for it in items] == ["/a/b/a/a", "/a/b/a/b"]


def test_the_file_bytes_claim_caps_a_walk_too(repo: Repo, tmp_path: Path) -> None:
    """Files repeated through shared trees: the entry count fits, the bytes do not."""

    def build(store: Callable[[bytes], bytes]) -> bytes:
        leaf = store(encode_tree([{"n": b"f", "t": "f", "m": 0o644, "sz": 1 << 40, "c": []}]))
        return store(encode_tree([{"n": n, "t": "d", "m": 0o755, "st": leaf} for n in (b"x", b"y")]))

    snap = _craft(repo, tmp_path, build, entries=4, entry_bytes=1 << 40)
    cp = repo.run("ls", snap, "/", "-R")
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    assert f"signed statistics claim {1 << 40} bytes of files" in cp.stderr


def test_a_snapshot_without_the_statistics_is_walked_without_a_cap(repo: Repo, tmp_path: Path) -> None:
    """Snapshots written before ``entries`` existed: no cap (only the cycle rule)."""
    snap = _craft(repo, tmp_path, _bomb(3))
    items = js(repo.ok("ls", snap, "/", "-R", "--json"))["items"]
    assert len(items) == 2 + 4 + 8


class _Crafted(Restorer):
    """A restorer whose trees come from a dict: ids that no hash could give (a tree that is its
    own descendant), to exercise the cycle rule of the walkers themselves."""

    trees: dict[bytes, list[dict[str, Any]]]

    def tree(self, tid: bytes) -> list[dict[str, Any]]:
        return self.trees[tid]


def test_a_tree_below_itself_is_never_followed(repo: Repo, tmp_path: Path) -> None:
    """Chunk ids are keyed hashes of the trees' bytes and every tree read is checked against
    its id, so no stored snapshot can hold a cycle; the rule still guards every walker (a
    reader bug, a future format). Here the trees come straight from a dict: A holds ``x`` ->
    B, B holds ``y`` -> A and ``f``. Restore reports the directory, ls and export refuse."""
    a, b = b"A" * 32, b"B" * 32
    trees = {
        a: [{"n": b"x", "t": "d", "m": 0o755, "st": b}],
        b: [{"n": b"f", "t": "p", "m": 0o644}, {"n": b"y", "t": "d", "m": 0o755, "st": a}],
    }
    put = load_put_key(str(repo.put_key))
    reader = BlobReader(Repository.open(LocalBackend(str(repo.path))), None, put.secrets, {})  # type: ignore[arg-type]
    target = tmp_path / "t"
    log = RunLog()
    restorer = _Crafted(reader, os.fsencode(target), log, budget=TreeBudget("crafted"))
    restorer.trees = trees
    stats = restorer.restore(a, [])
    assert stats.failed == 1 and stats.dirs == 2 and stats.other == 1
    (ev,) = [e for e in log.events if e.level == "err"]
    assert ev.code == "tree-damaged" and ev.path == os.fsencode(target / "x" / "y")
    assert "appears again below itself" in ev.message and "not followed" in ev.message
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["x", "x/f", "x/y"]

    with pytest.raises(TreeCycle, match="appears again below itself at /x/y"):
        TarExporter(restorer, io.BytesIO()).export(a, [])
    restorer.budget.reset()
    assert restorer.walk_tree(0, a, "/") == trees[a]
    restorer.walk_tree(1, b, "/x")
    restorer.walk_tree(1, b, "/z")  # B again, but beside its first visit, not below it: fine
    with pytest.raises(TreeCycle):
        restorer.walk_tree(2, a, "/z/y")


def test_a_name_listed_twice_is_restored_and_exported_once(repo: Repo, tmp_path: Path) -> None:
    """A directory that lists ``d`` twice, first as a symlink out of the target, then as a
    directory with a file (trees from a dict, as above): the second is reported and left out,
    so nothing is written through the symlink, by restore or by a tar extractor."""
    outside = tmp_path / "outside"
    outside.mkdir()
    top, sub = b"T" * 32, b"S" * 32
    trees = {
        top: [{"n": b"d", "t": "l", "lt": os.fsencode(outside)}, {"n": b"d", "t": "d", "m": 0o755, "st": sub}],
        sub: [{"n": b"f", "t": "p", "m": 0o644}],
    }
    put = load_put_key(str(repo.put_key))
    reader = BlobReader(Repository.open(LocalBackend(str(repo.path))), None, put.secrets, {})  # type: ignore[arg-type]
    target = tmp_path / "t"
    log = RunLog()
    restorer = _Crafted(reader, os.fsencode(target), log)
    restorer.trees = trees
    stats = restorer.restore(top, [])
    assert stats.failed == 1 and stats.links == 1
    (ev,) = [e for e in log.events if e.level == "err"]
    assert ev.path == os.fsencode(target / "d") and "a name twice in one directory" in ev.message
    assert (target / "d").is_symlink() and list(outside.iterdir()) == []
    exporter = TarExporter(restorer, io.BytesIO())
    exported = exporter.export(top, [])
    assert exported.members == 1 and exported.problems == [("/d", "left out: its directory lists this name twice")]


def test_an_oversized_tree_is_refused_before_it_is_read(repo: Repo, tmp_path: Path) -> None:
    """A root tree of more than MAX_TREE bytes (zeros: a few KB once compressed): its raw
    length, from the pack's trailer, is refused before anything is fetched or decompressed."""
    snap = _craft(repo, tmp_path, lambda store: store(bytes(MAX_TREE + 1)), entries=0, entry_bytes=0)
    target = tmp_path / "t"
    cp = repo.run("restore", snap, "--target", target, "--json")
    assert cp.returncode == ExitCode.ERR, describe(cp)
    (ev,) = [e for e in js(cp)["events"] if e["level"] == "err"]
    assert ev["code"] == "tree-damaged" and f"is {MAX_TREE + 1} bytes, more than the {MAX_TREE}" in ev["message"]
    cp = repo.run("ls", snap, "/")
    assert cp.returncode == ExitCode.INTEGRITY and "more than the" in cp.stderr, describe(cp)


def test_an_oversized_index_object_is_never_fetched(repo: Repo, tmp_path: Path) -> None:
    """An index object larger than any signed object may be is skipped from its listed size
    (and reported), and everything else keeps working."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"content")
    repo.backup(src)
    huge = b"BKIX" + bytes(64 << 20)
    (repo.path / "index" / b3(huge)).write_bytes(huge)
    doc = repo.backup(src, rc=(0, 1))
    (ev,) = [e for e in doc["events"] if e["code"] == "index-damaged"]
    assert "larger than any signed object may be" in ev["message"]
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert (restored_path(target, src) / "f").read_bytes() == b"content"
