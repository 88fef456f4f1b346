"""`bunker backup --tar FILE|-`: a tar/pax archive as the backup source, metadata as the archive
has it. Archives made by GNU tar and by bsdtar are backed up, restored and compared with the
tree they were made from; `export-tar` output fed back in gives the same tree; unsafe member
paths are refused one by one; a truncated archive gives no snapshot; owners come from the
archive, not from the machine."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bunker.tar.reader import clean_path, parse_acl, parse_fflags, pax_ns
from helpers import (
    Repo,
    describe,
    getfacl,
    init_repo,
    js,
    lsattr,
    restored_path,
    run_ok,
    snapshot_tree,
    xattrs_supported,
)

T0 = 1_650_000_000_123_456_789
ODD = b"odd-\xff\xfe-name"
XATTR = b"\xff\x00binary value"


def _make_source(src: Path, sparse: bool = False) -> dict[str, bool]:
    """The source tree; returns which optional features work here (xattr, acl, flags)."""
    src.mkdir()
    feats = {"xattr": xattrs_supported(src)}
    (src / "a.txt").write_bytes(b"hello\n" * 100)
    (src / "empty").write_bytes(b"")
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    with open(os.fsencode(src) + b"/" + ODD, "wb") as f:
        f.write(b"raw name\n")
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "emptydir").mkdir()
    (src / "sub" / "deeper" / "n.txt").write_bytes(b"nested")
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "setuid", 0o4755)
    os.symlink("a.txt", src / "link")
    (src / "hl1").write_bytes(b"linked content")
    os.link(src / "hl1", src / "sub" / "hl2")
    os.mkfifo(src / "fifo")
    if sparse:
        with open(src / "sparse", "wb") as f:
            f.write(b"head")
            f.seek(3 << 20)
            f.write(b"middle")
            f.truncate(5 << 20)
    if feats["xattr"]:
        os.setxattr(src / "a.txt", "user.bin", XATTR)
        os.setxattr(src / "sub", "user.text", b"plain")
    feats["acl"] = run_ok(["setfacl", "-m", "u:12345:rwx,g:12345:r-x", str(src / "a.txt")])
    if feats["acl"]:
        subprocess.run(["setfacl", "-d", "-m", "u:12345:rx", str(src / "emptydir")], check=True)
    feats["flags"] = run_ok(["chattr", "+d", str(src / "empty")])
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(os.fsencode(src)), reverse=True)):
        for j, n in enumerate(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            t = T0 + 1_000_003 * (i * 50 + j)
            os.utime(os.path.join(dirpath, n), ns=(t, t), follow_symlinks=False)
        for j, n in enumerate(dirnames):
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                t = T0 - 7_000_001 * (i * 50 + j + 1)
                os.utime(p, ns=(t, t))
    return feats


def _check(src: Path, dst: Path, feats: dict[str, bool], what: str) -> None:
    want, got = snapshot_tree(src), snapshot_tree(dst)
    del want[b""], got[b""]  # the root directory itself is the restore target
    problems = [
        f"{k!r}: source {want.get(k)} restored {got.get(k)}"
        for k in sorted(set(want) | set(got))
        if want.get(k) != got.get(k)
    ]
    assert not problems, f"{what}: trees differ:\n" + "\n".join(problems)
    assert (dst / "sub" / "hl2").stat().st_ino == (dst / "hl1").stat().st_ino, f"{what}: hard link lost"
    assert (dst / "hl1").stat().st_nlink == 2
    assert stat.S_ISFIFO((dst / "fifo").lstat().st_mode)
    assert (dst / "setuid").stat().st_mode & 0o7777 == 0o4755
    assert os.readlink(dst / "link") == "a.txt"
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (dst / "a.txt").stat().st_mtime_ns == (src / "a.txt").stat().st_mtime_ns, f"{what}: ns mtime"
    if feats["xattr"]:
        assert os.getxattr(dst / "a.txt", "user.bin") == XATTR, f"{what}: binary xattr"
        assert os.getxattr(dst / "sub", "user.text") == b"plain", f"{what}: directory xattr"
    if feats["acl"]:
        for rel in ("a.txt", "emptydir"):
            assert getfacl(dst / rel) == getfacl(src / rel), f"{what}: ACL of {rel}"
        assert "user:12345:rwx" in getfacl(dst / "a.txt")
        assert "default:user:12345:r-x" in getfacl(dst / "emptydir")
    if feats["flags"] and "GNU" not in what:  # GNU tar does not carry inode flags
        assert "d" in lsattr(dst / "empty"), f"{what}: inode flags"
    if (src / "sparse").exists():
        with open(dst / "sparse", "rb") as f:  # content compared above; the holes are back
            assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) < 1 << 20, f"{what}: sparse file not sparse"
            assert os.lseek(f.fileno(), 1 << 20, os.SEEK_DATA) >= 2 << 20, f"{what}: sparse file not sparse"


def _restore(repo: Repo, target: Path) -> None:
    repo.ok("restore", "latest", "--target", str(target))


def _snapshots(repo: Repo) -> list[dict[str, Any]]:
    doc = js(repo.ok("snapshots", "--json", "--master-key", str(repo.master_key)))
    snaps: list[dict[str, Any]] = doc["snapshots"]
    return snaps


TOOLS = {
    "GNU tar": ["tar", "--xattrs", "--xattrs-include=*", "--acls", "--format=pax", "-cpf"],
    "bsdtar": ["bsdtar", "--xattrs", "--acls", "--format=pax", "-cpf"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tar_round_trip(tmp_path: Path, tool: str) -> None:
    cmd = TOOLS[tool]
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} not installed")
    src = tmp_path / "src"
    feats = _make_source(src)
    archive = tmp_path / "archive.tar"
    subprocess.run([*cmd, str(archive), "-C", str(src), "."], check=True, capture_output=True)
    repo = init_repo(tmp_path / "r")
    doc = repo.backup("--tar", str(archive))
    assert doc["stats"]["files"] >= 8, doc
    assert not [e for e in doc["events"] if e["level"] in ("warn", "err")], doc["events"]
    target = tmp_path / "restored"
    _restore(repo, target)
    _check(src, target, feats, tool)
    snap = _snapshots(repo)[-1]
    assert snap["paths"] == [f"tar:{archive}"]


def test_export_tar_fed_back_gives_the_same_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    feats = _make_source(src, sparse=True)
    repo = init_repo(tmp_path / "r")
    repo.backup(str(src))
    out = tmp_path / "out.tar"
    cp = repo.run("export-tar", "latest", "-o", str(out))
    assert cp.returncode == 0, describe(cp)
    repo2 = init_repo(tmp_path / "r2")
    doc = js(repo2.ok("backup", "--tar", "-", "--json", input=out.read_bytes()))
    assert doc["stats"]["files"] >= 8
    target = tmp_path / "restored"
    _restore(repo2, target)
    dst = restored_path(target, src)
    _check(src, dst, feats, "export-tar | backup --tar -")
    assert snapshot_tree(dst)[b""] == snapshot_tree(src)[b""], "the directory's own metadata"
    assert _snapshots(repo2)[-1]["paths"] == ["tar:-"]


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members_keep_their_holes(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "s", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"middle")
        f.truncate(5 << 20)
    archive = tmp_path / "s.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(archive), "-C", str(src), "s"], check=True)
    repo = init_repo(tmp_path / "r")
    doc = repo.backup("--tar", str(archive))
    assert doc["stats"]["stored_new"] < 1 << 20, "the holes were stored as data"
    items = js(repo.ok("ls", "latest", "-R", "--json", "--master-key", str(repo.master_key)))["items"]
    assert items[0]["size"] == 5 << 20 and items[0]["hole_bytes"] == (5 << 20) - 8192, items
    target = tmp_path / "restored"
    _restore(repo, target)
    assert (target / "s").read_bytes() == (src / "s").read_bytes()
    assert (target / "s").stat().st_blocks * 512 < 1 << 20


def _tar_bytes(members: list[tuple[str, bytes]], **kw: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o640
            ti.mtime = 1_600_000_000
            for k, v in kw.items():
                setattr(ti, k, v)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_unsafe_members_are_refused(tmp_path: Path) -> None:
    data = _tar_bytes(
        [
            ("ok.txt", b"fine"),
            ("../evil", b"escape"),
            ("/abs/evil2", b"absolute"),
            ("dir/../../evil3", b"escape too"),
            ("dir/kept", b"kept"),
            ("ok.txt", b"later wins"),
        ]
    )
    archive = tmp_path / "work" / "a.tar"
    archive.parent.mkdir()
    archive.write_bytes(data)
    repo = init_repo(tmp_path / "r")
    doc = repo.backup("--tar", str(archive), rc=3)
    errs = {e["path"] for e in doc["events"] if e["level"] == "err"}
    assert errs == {"../evil", "/abs/evil2", "dir/../../evil3"}, doc["events"]
    target = tmp_path / "work" / "restored"
    _restore(repo, target)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["dir", "dir/kept", "ok.txt"]
    assert (target / "ok.txt").read_bytes() == b"later wins"
    assert (target / "dir").stat().st_mode & 0o7777 == 0o755  # an implicit parent
    assert not (tmp_path / "work" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (tmp_path / "work" / "evil3").exists()


def test_hard_links_and_duplicates(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, target, data in [
            ("d/f", tarfile.REGTYPE, "", b"one inode"),
            ("g", tarfile.LNKTYPE, "d/f", b""),
            ("h", tarfile.LNKTYPE, "./d/f", b""),
            ("h", tarfile.REGTYPE, "", b"replaced"),
            ("bad", tarfile.LNKTYPE, "nowhere", b""),
        ]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.size, ti.mode, ti.uid = kind, target, len(data), 0o604, 77
            ti.pax_headers = {"mtime": "1600000000.000000123"}
            tar.addfile(ti, io.BytesIO(data) if data else None)
    repo = init_repo(tmp_path / "r")
    doc = js(repo.ok("backup", "--tar", "-", "--json", input=buf.getvalue(), rc=3))
    assert [(e["level"], e["path"]) for e in doc["events"] if e["level"] == "err"] == [("err", "bad")]
    items = {
        i["path"]: i for i in js(repo.ok("ls", "latest", "-R", "--json", "--master-key", str(repo.master_key)))["items"]
    }
    assert set(items) == {"/d", "/d/f", "/g", "/h"}
    f, g, h = items["/d/f"], items["/g"], items["/h"]
    assert f["link_group"] == g["link_group"] and f["nlink"] == g["nlink"] == 2, (f, g)
    assert "link_group" not in h and h["size"] == len(b"replaced")
    assert f["mtime_ns"] == g["mtime_ns"] == 1_600_000_000_000_000_123 and g["mode"] == 0o604 and g["uid"] == 77
    assert items["/d"]["mode"] == 0o755 and items["/d"]["uid"] == 77  # implicit parent: the child's owner
    target = tmp_path / "restored"
    _restore(repo, target)
    assert (target / "g").stat().st_ino == (target / "d" / "f").stat().st_ino
    assert (target / "g").read_bytes() == b"one inode" and (target / "h").read_bytes() == b"replaced"


def test_truncated_archive_gives_no_snapshot(tmp_path: Path) -> None:
    data = _tar_bytes([("small", b"x"), ("big", os.urandom(2 << 20))])
    repo = init_repo(tmp_path / "r")
    gz = gzip.compress(data)
    for bad in (data[: len(data) // 2], gz[: len(gz) // 2], b"this is not a tar archive at all" * 100):
        cp = repo.run("backup", "--tar", "-", input=bad)
        assert cp.returncode == 4, describe(cp)
        assert "tar archive" in cp.stderr, cp.stderr
        assert _snapshots(repo) == []
    cp = repo.run("backup", "--tar", "-", str(tmp_path), input=data)
    assert cp.returncode == 2, describe(cp)  # --tar and PATHS together
    cp = repo.run("backup", "--tar", "-", "--stdin-name", "x", input=data)
    assert cp.returncode == 2, describe(cp)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_owners_come_from_the_archive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"owned")
    (src / "d").mkdir()
    archive = tmp_path / "o.tar.gz"
    subprocess.run(
        ["tar", "--owner=1234", "--group=5678", "--format=pax", "-czf", str(archive), "-C", str(src), "f", "d"],
        check=True,
    )
    repo = init_repo(tmp_path / "r")
    repo.backup("--tar", str(archive))
    doc = js(repo.ok("ls", "latest", "-R", "--json", "--master-key", str(repo.master_key)))
    items = {i["path"]: i for i in doc["items"]}
    assert set(items) == {"/f", "/d"}
    for it in items.values():
        assert (it["uid"], it["gid"]) == (1234, 5678), it


def test_pax_parsers() -> None:
    assert pax_ns("1650000000.123456789") == 1_650_000_000_123_456_789
    assert pax_ns("-1.5") == -1_500_000_000
    assert pax_ns("12") == 12_000_000_000
    acl, problems = parse_acl("user::rw-,user:alice:r--:1000,group::r--,group:7:rwx,mask::rwx,other::---")
    assert not problems
    assert acl == [
        ["user", 6],
        ["user", 4, 1000, "alice"],
        ["group", 4],
        ["group", 7, 7, ""],
        ["mask", 7],
        ["other", 0],
    ]
    assert parse_fflags("nodump,noatime,bogus") == (0x40 | 0x80, ["bogus"])
    assert clean_path("./a/./b") == [b"a", b"b"]
    assert clean_path("/etc") is None and clean_path("a/../b") is None
