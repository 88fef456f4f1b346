"""`bunker export-tar`: a snapshot as a POSIX pax archive, unpacked by GNU tar and by bsdtar (tools
that share no code with bunker) and compared with the source tree: contents, modes incl. setuid
and sticky, ns mtimes, symlinks, hard links (also of a fifo), fifos, xattrs with binary values,
non-UTF-8 names, owners, a multi-chunk file; as root a character device. A unix socket is listed
on stderr and left out of the archive."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from bunker.tar.writer import FileData, acl_pax, data_regions, fflags_pax, ns_text, sparse_map_block
from helpers import Repo, describe, getfacl, init_repo, lsattr, restored_path, run_ok, snapshot_tree, xattrs_supported

ROOT = os.geteuid() == 0
T0 = 1_650_000_000_123_456_789
XATTR = b"\xff\x00binary\n value"
ODD = b"odd-\xff\xfe-name"


def _make_source(src: Path) -> dict[str, bool]:
    src.mkdir()
    feats = {"xattr": xattrs_supported(src), "dev": ROOT}
    (src / "a.txt").write_bytes(b"hello\n" * 100)
    (src / "empty").write_bytes(b"")
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    with open(src / "sparse", "wb") as f:  # exported in GNU sparse 1.0 format
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"middle")
        f.truncate(5 << 20)
    with open(os.fsencode(src) + b"/" + ODD, "wb") as f:
        f.write(b"raw name\n")
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "n.txt").write_bytes(b"nested")
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "setuid", 0o4755)
    (src / "sticky").mkdir()
    os.chmod(src / "sticky", 0o1777)
    os.symlink("a.txt", src / "link")
    os.symlink("/nonexistent/dangling", src / "dangling")
    (src / "hl1").write_bytes(b"linked content")
    os.link(src / "hl1", src / "sub" / "hl2")
    os.mkfifo(src / "fifo")
    os.link(src / "fifo", src / "sub" / "fifo2")
    os.mknod(src / "sock", stat.S_IFSOCK | 0o755)
    if feats["xattr"]:
        os.setxattr(src / "a.txt", "user.bin", XATTR)
        os.setxattr(src / "sub", "user.text", b"plain")
    feats["acl"] = shutil.which("setfacl") is not None and run_ok(
        ["setfacl", "-m", "u:12345:rwx,g:12345:r-x,u:0:r", str(src / "a.txt")]
    )
    if feats["acl"]:
        subprocess.run(["setfacl", "-d", "-m", "u:12345:rx,g:0:rwx,o::-", str(src / "sticky")], check=True)
    feats["flags"] = shutil.which("chattr") is not None and run_ok(["chattr", "+d", str(src / "empty")])
    if feats["flags"]:
        subprocess.run(["chattr", "+A", str(src / "sub" / "deeper")], check=True)
    if ROOT:
        os.mknod(src / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
        os.chown(src / "a.txt", 12345, 23456)
    # ns times everywhere, directories last (bottom-up)
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(os.fsencode(src)), reverse=True)):
        for j, n in enumerate(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            t = T0 + 1_000_003 * (i * 50 + j)
            os.utime(os.path.join(dirpath, n), ns=(t, t), follow_symlinks=False)
        for j, n in enumerate(dirnames):
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                t = T0 - 7_000_001 * (i * 50 + j + 1)
                os.utime(p, ns=(t, t))
    os.utime(src, ns=(T0 + 999, T0 + 999))
    return feats


def _export(repo: Repo, work: Path, *paths: str) -> tuple[Path, str]:
    out = work / "out.tar"
    cp = repo.run("export-tar", "latest", *paths, "-o", str(out))
    assert cp.returncode == 0, describe(cp)
    return out, cp.stderr


def _check_extracted(src: Path, top: Path, feats: dict[str, bool], tool: str) -> None:
    dst = restored_path(top, src)
    want = snapshot_tree(src)
    got = snapshot_tree(dst)
    del want[b"sock"]
    problems = [
        f"{k!r}: source {want.get(k)} extracted {got.get(k)}"
        for k in sorted(set(want) | set(got))
        if want.get(k) != got.get(k)
    ]
    assert not problems, f"{tool}: trees differ:\n" + "\n".join(problems)
    assert (dst / "sub" / "hl2").stat().st_ino == (dst / "hl1").stat().st_ino, f"{tool}: hard link lost"
    assert (dst / "sub" / "fifo2").lstat().st_ino == (dst / "fifo").lstat().st_ino, f"{tool}: fifo link lost"
    assert stat.S_ISFIFO((dst / "fifo").lstat().st_mode)
    assert (dst / "setuid").stat().st_mode & 0o7777 == 0o4755
    assert (dst / "sticky").stat().st_mode & 0o7777 == 0o1777
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    with open(dst / "sparse", "rb") as f:  # content compared above; the holes are back
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) < 1 << 20, f"{tool}: sparse file not sparse"
        assert os.lseek(f.fileno(), 1 << 20, os.SEEK_DATA) >= 2 << 20, f"{tool}: sparse file not sparse"
    with open(os.fsencode(dst) + b"/" + ODD, "rb") as f:
        assert f.read() == b"raw name\n"
    if feats["xattr"]:
        assert os.getxattr(dst / "a.txt", "user.bin") == XATTR, f"{tool}: binary xattr"
        assert os.getxattr(dst / "sub", "user.text") == b"plain", f"{tool}: directory xattr"
    if feats["acl"]:
        for rel in ("a.txt", "sticky"):
            assert getfacl(dst / rel) == getfacl(src / rel), f"{tool}: ACL of {rel}"
        assert "user:12345:rwx" in getfacl(dst / "a.txt")
        assert "default:user:12345:r-x" in getfacl(dst / "sticky")
    if feats["flags"] and tool == "bsdtar":  # GNU tar does not carry inode flags
        for rel in ("empty", "sub/deeper"):
            assert lsattr(dst / rel) == lsattr(src / rel), f"{tool}: flags of {rel}"
        assert "d" in lsattr(dst / "empty") and "A" in lsattr(dst / "sub/deeper")
    if ROOT:
        st = (dst / "null").lstat()
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3), tool
        st = (dst / "a.txt").stat()
        assert (st.st_uid, st.st_gid) == (12345, 23456), f"{tool}: owner"


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path, dict[str, bool], str, Repo]:
    src = tmp_path / "src"
    feats = _make_source(src)
    repo = init_repo(tmp_path / "r")
    repo.backup(str(src))
    out, err = _export(repo, tmp_path)
    return src, out, feats, err, repo


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_extracts_everything(tmp_path: Path, exported: tuple[Path, Path, dict[str, bool], str, Repo]) -> None:
    src, out, feats, err, _ = exported
    top = tmp_path / "gnu"
    top.mkdir()
    cp = subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--numeric-owner",
            "--warning=no-unknown-keyword",
            "-xpf",
            str(out),
            "-C",
            str(top),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr
    _check_extracted(src, top, feats, "GNU tar")
    listing = subprocess.run(["tar", "-tvf", str(out)], capture_output=True, check=True).stdout
    assert b"big.bin" in listing and b" link to " in listing and b"a.txt" in listing


@pytest.mark.skipif(shutil.which("bsdtar") is None, reason="bsdtar not installed")
def test_bsdtar_extracts_everything(tmp_path: Path, exported: tuple[Path, Path, dict[str, bool], str, Repo]) -> None:
    src, out, feats, err, _ = exported
    top = tmp_path / "bsd"
    top.mkdir()
    cp = subprocess.run(
        ["bsdtar", "--xattrs", "--acls", "--fflags", "--numeric-owner", "-xpf", str(out), "-C", str(top)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr
    _check_extracted(src, top, feats, "bsdtar")


def test_archive_members_and_socket(exported: tuple[Path, Path, dict[str, bool], str, Repo]) -> None:
    src, out, feats, err, _ = exported
    rel = os.path.abspath(src).lstrip("/")
    assert f"not in the archive: /{rel}/sock (unix socket)" in err
    with tarfile.open(out, encoding="utf-8", errors="surrogateescape") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert f"{rel}/sock" not in members
    a = members[f"{rel}/a.txt"]
    assert a.pax_headers["mtime"] == ns_text(os.lstat(src / "a.txt").st_mtime_ns)
    assert members[f"{rel}/sub/hl2"].type == tarfile.LNKTYPE
    assert members[f"{rel}/sub/hl2"].linkname == f"{rel}/hl1"
    assert members[f"{rel}/sub/fifo2"].type == tarfile.LNKTYPE
    assert members[f"{rel}/fifo"].type == tarfile.FIFOTYPE
    assert members[f"{rel}/link"].issym() and members[f"{rel}/link"].linkname == "a.txt"
    assert members[f"{rel}/" + ODD.decode("utf-8", "surrogateescape")].size == 9
    assert members[f"{rel}/big.bin"].size == os.path.getsize(src / "big.bin")
    sp = members[f"{rel}/sparse"]  # tarfile names it by GNU.sparse.name
    assert sp.pax_headers["GNU.sparse.major"] == "1" and sp.pax_headers["GNU.sparse.minor"] == "0"
    assert sp.pax_headers["GNU.sparse.realsize"] == str(5 << 20)
    assert sp.sparse is not None and sum(n for _, n in sp.sparse) < 1 << 20  # only the data regions
    assert f"{rel}/GNUSparseFile.0/sparse".encode() in out.read_bytes()
    if feats["acl"]:
        assert "user:12345:rwx:12345" in a.pax_headers["SCHILY.acl.access"]
        assert "SCHILY.acl.default" in members[f"{rel}/sticky"].pax_headers
    if feats["flags"]:
        assert members[f"{rel}/empty"].pax_headers["SCHILY.fflags"] == "nodump"
        assert members[f"{rel}/sub/deeper"].pax_headers["SCHILY.fflags"] == "noatime"
    if feats["xattr"]:
        assert a.pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == XATTR
    if ROOT:
        assert (members[f"{rel}/null"].devmajor, members[f"{rel}/null"].devminor) == (1, 3)
        assert (a.uid, a.gid) == (12345, 23456)


def test_export_of_a_path_to_stdout(tmp_path: Path, exported: tuple[Path, Path, dict[str, bool], str, Repo]) -> None:
    src, _, _, _, repo = exported
    cp = repo.run("export-tar", "latest", str(src / "sub"))
    assert cp.returncode == 0, describe(cp)
    (tmp_path / "sub.tar").write_bytes(cp.stdout_bytes)  # type: ignore[attr-defined]
    with tarfile.open(tmp_path / "sub.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    names = sorted(members)
    rel = os.path.abspath(src).lstrip("/")
    # hl2 and fifo2 are the first names of their inodes met in this archive: full members
    assert members[f"{rel}/sub/hl2"].isreg() and members[f"{rel}/sub/hl2"].size == len(b"linked content")
    assert members[f"{rel}/sub/fifo2"].isfifo()
    assert names == [f"{rel}/sub", f"{rel}/sub/deeper", f"{rel}/sub/deeper/n.txt", f"{rel}/sub/fifo2", f"{rel}/sub/hl2"]
    cp = repo.run("export-tar", "latest", "/no/such/path", "-o", str(tmp_path / "x.tar"))
    assert cp.returncode == 2 and "not in this snapshot" in cp.stderr, describe(cp)
    assert not (tmp_path / "x.tar").exists()


def test_helpers() -> None:
    assert ns_text(1_500_000_000_000_000_001) == "1500000000.000000001"
    assert ns_text(-1_500_000_000) == "-1.500000000"
    acl = [["user", 6], ["user", 4, 1000, "alice"], ["group", 4], ["group", 5, 7, ""], ["mask", 5], ["other", 0]]
    assert acl_pax(acl) == "user::rw-,user:1000:r--:1000,group::r--,group:7:r-x:7,mask::r-x,other::---"
    assert fflags_pax(0x10 | 0x20 | 0x40 | 0x80) == ("schg,sappnd,nodump,noatime", 0)
    assert fflags_pax(0x400) == ("", 0x400)
    # a sparse file: holes come back as zeros, exactly sz bytes
    chunks = {b"1": b"abc", b"2": b"de"}
    e = {"sz": 10, "c": [b"1", b"2"], "hole": [0, 2, 5, 3]}
    data = FileData(e, chunks.__getitem__, lambda c: len(chunks[c]), lambda w: None)
    assert data.read(4) + data.read() == b"\0\0abc\0\0\0de"
    data = FileData(e, chunks.__getitem__, lambda c: len(chunks[c]), lambda w: None, sparse=True)
    assert data.length == 512 + 5
    assert data.read() == b"2\n2\n3\n8\n2\n".ljust(512, b"\0") + b"abcde"
    assert data_regions(10, [0, 2, 5, 3]) == [(2, 3), (8, 2)]
    assert data_regions(10, [4, 6]) == [(0, 4), (10, 0)]
    assert data_regions(10, [0, 10]) == [(10, 0)]
    assert sparse_map_block([(10, 0)]) == b"1\n10\n0\n".ljust(512, b"\0")


def test_needs_the_master_key(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    repo = init_repo(tmp_path / "r")
    repo.backup(str(src))
    repo.master_key.rename(tmp_path / "away.master")
    cp = repo.run("export-tar", "latest", "-o", str(tmp_path / "out.tar"))
    assert cp.returncode == 12 and "master key" in cp.stderr, describe(cp)
    assert not (tmp_path / "out.tar").exists()
    cp = repo.run("export-tar", "latest", "--master-key", str(tmp_path / "away.master"))
    assert cp.returncode == 0, describe(cp)
    with tarfile.open(fileobj=io.BytesIO(cp.stdout_bytes)) as tar:  # type: ignore[attr-defined]
        assert any(m.name.endswith("/src/f") for m in tar.getmembers())
