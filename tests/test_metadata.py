"""Complete copy (docs/user-guide.md, "What a backup keeps"): every item type with its full metadata -- hard links (also
of fifos, sockets, symlinks and devices), sparse holes, fifos, unix sockets, devices, owners and
their names, setuid/setgid/sticky, ns times and atime, xattrs in every namespace, POSIX ACLs
(access and default), inode flags -- backed up, restored, and compared with tools that share no
code with bunker: mtree (or bsdtar --format=mtree), getfattr, getfacl, lsattr, and SEEK_DATA/
SEEK_HOLE maps. As root, and as an unprivileged user, who restores what it can and is told what
it could not.

The trees live on a filesystem that supports user and trusted xattrs, ACLs, inode flags and
holes: the one under /tmp when it does, else (as root) a loop-mounted ext4 image."""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bunker.encoding import FormatError, pack, unpack
from bunker.repo.tree import decode_tree, encode_tree
from helpers import describe, init_repo, js, make_env, restored_path, run_bunker
from test_small_file_paths import assert_same_small_files, many_small_files

ROOT = os.geteuid() == 0
NOBODY = 65534
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FL_IMMUTABLE, FL_APPEND, FL_NODUMP, FL_NOATIME = 0x10, 0x20, 0x40, 0x80
MTREE_KEYS = "sha256,uid,gid,mode,nlink,link,size,time,type,device"
# security.capability v2: effective, permitted CAP_NET_RAW
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
T0 = 1_650_000_000_123_456_789  # base of the ns timestamps given to every item


# ------------------------------------------------------------------------------ filesystem and tools


def _ioctl_flags(path: Path, add: int = 0, remove: int = 0) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        cur = struct.unpack("@i", buf)[0]
        if add or remove:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("@i", (cur | add) & ~remove))
        return int(cur)
    finally:
        os.close(fd)


def _acl_value(entries: list[tuple[int, int, int]]) -> bytes:
    """A system.posix_acl_* value from (tag, perm, id) entries (the kernel's binary format)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in sorted(entries))


def _probe(d: Path) -> set[str]:
    """What the filesystem of ``d`` supports (and this process may do there)."""
    feats: set[str] = set()
    f = d / ".probe"
    f.write_bytes(b"x")
    for feat, fn in (
        ("user_xattr", lambda: os.setxattr(f, "user.bunker", b"1")),
        (
            "acl",
            lambda: os.setxattr(
                f,
                "system.posix_acl_access",
                _acl_value(
                    [(1, 6, -1 & 0xFFFFFFFF), (2, 4, 0), (4, 4, 0xFFFFFFFF), (16, 4, 0xFFFFFFFF), (32, 4, 0xFFFFFFFF)]
                ),
            ),
        ),
        ("flags", lambda: _ioctl_flags(f, add=FL_NODUMP)),
        ("trusted", lambda: os.setxattr(f, "trusted.bunker", b"1")),
        ("capability", lambda: os.setxattr(f, "security.capability", CAP_NET_RAW)),
        ("immutable", lambda: (_ioctl_flags(f, add=FL_IMMUTABLE), _ioctl_flags(f, remove=FL_IMMUTABLE))),
        ("devices", lambda: os.mknod(d / ".probe-dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))),
    ):
        try:
            fn()
            feats.add(feat)
        except OSError:
            pass
    with open(d / ".probe-sparse", "wb") as s:
        s.seek(4 << 20)
        s.write(b"data")
    fd = os.open(d / ".probe-sparse", os.O_RDONLY)
    try:
        if os.lseek(fd, 0, os.SEEK_DATA) > 0:
            feats.add("holes")
    except OSError:
        pass
    finally:
        os.close(fd)
    for p in (".probe", ".probe-sparse", ".probe-dev"):
        with contextlib.suppress(OSError):
            os.unlink(d / p)
    return feats


ROOT_FEATURES = {"trusted", "capability", "immutable", "devices"}
USER_FEATURES = {"user_xattr", "acl", "flags", "holes"}


@dataclass
class MetaFS:
    root: Path
    features: set[str]
    how: str

    def need(self, *feats: str) -> None:
        missing = sorted(set(feats) - self.features)
        if missing:
            pytest.skip(f"the filesystem for these tests ({self.how}) lacks {', '.join(missing)}")


def _unlock_tree(top: Path) -> None:
    """Clear immutable/append-only below ``top`` so that it can be deleted."""
    for dirpath, dirnames, filenames in os.walk(top):
        for n in [*dirnames, *filenames, ""]:
            p = Path(dirpath, n)
            if not p.is_symlink() and (p.is_file() or p.is_dir()):
                with contextlib.suppress(OSError):
                    if _ioctl_flags(p) & (FL_IMMUTABLE | FL_APPEND):
                        _ioctl_flags(p, remove=FL_IMMUTABLE | FL_APPEND)


def _remove(top: Path) -> None:
    if ROOT:
        _unlock_tree(top)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def meta_fs() -> Iterator[MetaFS]:
    """A world-searchable directory on a filesystem with every feature these tests need."""
    base = Path(tempfile.mkdtemp(prefix="bunker-meta-", dir="/tmp"))
    os.chmod(base, 0o755)
    need = USER_FEATURES | (ROOT_FEATURES if ROOT else set())
    feats = _probe(base)
    mounted = None
    try:
        if need <= feats and not os.environ.get("BUNKER_TEST_META_LOOP"):
            yield MetaFS(base, feats, "/tmp")
            return
        if not ROOT or not shutil.which("mkfs.ext4"):
            yield MetaFS(base, feats, "/tmp, no root to mount an ext4 image")
            return
        img, mnt = base / "ext4.img", base / "mnt"
        mnt.mkdir()
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        cp = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True, check=False)
        if cp.returncode == 0:
            cp = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, check=False)
        if cp.returncode != 0:
            yield MetaFS(base, feats, f"/tmp; mounting an ext4 image failed: {cp.stderr.decode().strip()}")
            return
        mounted = mnt
        os.chmod(mnt, 0o755)
        yield MetaFS(mnt, _probe(mnt), "a loop-mounted ext4 image")
    finally:
        if mounted is not None:
            _unlock_tree(mounted)
            subprocess.run(["umount", "-l", str(mounted)], capture_output=True, check=False)
        _remove(base)


@pytest.fixture
def work(meta_fs: MetaFS) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="t-", dir=meta_fs.root))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        _remove(d)


def _tools(*names: str) -> None:
    missing = [n for n in names if not shutil.which(n)]
    if missing:
        pytest.skip(
            f"needs {', '.join(missing)} (packages acl, attr, mtree-netbsd or libarchive-tools; "
            "scripts/test installs them as root)"
        )


# ------------------------------------------------------------------------------ an unprivileged user


@dataclass
class User:
    """How to run bunker as a user without root's powers, and whom to give the files to."""

    prefix: list[str]
    uid: int | None  # None: the tests already run unprivileged
    base: Path

    def give(self, *paths: Path) -> None:
        """Make the trees the user's, modes kept (chown clears setuid and setgid)."""
        if self.uid is None:
            return
        for top in paths:
            for p in _walk(top):
                st = os.lstat(p)
                os.chown(p, self.uid, self.uid, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(p, stat.S_IMODE(st.st_mode))

    def bunker(self, *args: str | os.PathLike[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return run_bunker(*args, env=env, prefix=self.prefix)


@pytest.fixture
def user(unprivileged: Any) -> User:
    """The `unprivileged` fixture as a real non-root user. Where user nobody cannot reach this
    Python (say, below /root), nobody runs with CAP_DAC_READ_SEARCH alone: it may then read and
    search any path, and still has none of the powers a restore needs (chown, mknod, trusted.*
    xattrs, file capabilities, immutable flags)."""
    if not ROOT:
        return User([], None, unprivileged.base)
    if unprivileged.as_nobody:
        return User(list(unprivileged.prefix), NOBODY, unprivileged.base)
    prefix = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    ]
    cp = run_bunker("--version", env=dict(os.environ, HOME=str(unprivileged.base)), prefix=prefix)
    if cp.returncode != 0:
        pytest.skip(f"cannot run bunker as a non-root user here: {cp.stderr.strip()[:200]}")
    return User(prefix, NOBODY, unprivileged.base)


# ------------------------------------------------------------------------------ building a tree


@dataclass
class Built:
    root: Path
    atimes: dict[str, int] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    root_only_xattrs: dict[str, list[str]] = field(default_factory=dict)  # path -> names
    root_only_flags: dict[str, str] = field(default_factory=dict)  # path -> lsattr letters


def build_tree(src: Path, fs: MetaFS, *, as_root: bool, sparse_size: int = 64 << 20) -> Built:
    """Every kind of item and metadata; ``as_root`` adds what only root can create."""
    b = Built(src)
    src.mkdir()
    # (no newline in a directory name: mtree -c writes directory names unescaped into comments)
    for d in ("a", "a/b", "c", "acl-dir", "flag-dir", b"\xff\xfe odd dir".decode("utf-8", "surrogateescape")):
        (src / d).mkdir()
    (src / "plain.txt").write_bytes(b"plain content\n" * 100)
    (src / "empty").write_bytes(b"")
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2751), ("odd-mode", 0o1604)):
        (src / name).write_bytes(name.encode())
        os.chmod(src / name, mode)
    os.chmod(src / "c", 0o1777)
    odd = os.fsencode(src) + b"/\xff\xfe odd dir/\xe9t\xe9 new\nline \x01ctl"
    with open(odd, "wb") as f:
        f.write(b"odd name\n")

    # hard links: a file with three names in three directories, and links of the other kinds
    (src / "a/multi").write_bytes(os.urandom(300_000))
    os.link(src / "a/multi", src / "a/b/multi-2")
    os.link(src / "a/multi", src / "c/multi-3")
    os.mkfifo(src / "fifo")
    os.link(src / "fifo", src / "a/fifo-link")
    os.symlink("plain.txt", src / "symlink")
    os.link(src / "symlink", src / "c/symlink-link", follow_symlinks=False)
    os.symlink("/nonexistent/target", src / "a/dangling")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
    os.link(src / "sock", src / "a/b/sock-link")

    # sparse: holes at the start, in the middle and at the end; and a file that is all hole
    with open(src / "sparse", "wb") as f:
        f.truncate(sparse_size)
        f.seek(1 << 20)
        f.write(os.urandom(64 << 10))
        f.seek(sparse_size // 2)
        f.write(os.urandom(1 << 20))
    with open(src / "all-hole", "wb") as f:
        f.truncate(5 << 20)

    # xattrs (binary values, odd names) and ACLs (access, default, named entries)
    os.setxattr(src / "plain.txt", "user.comment", b"a comment")
    os.setxattr(src / "plain.txt", b"user.bin\xffary", bytes(range(256)) * 4)
    os.setxattr(src / "a/multi", "user.on-a-link", b"shared by every name")
    os.setxattr(src / "a", "user.dir", b"")
    subprocess.run(["setfacl", "-m", "u:0:r,g:0:rw,u:12345:rwx", str(src / "plain.txt")], check=True)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rwx,g:12345:r-x", str(src / "acl-dir")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:0:rx,g:12345:rwx,o::-", str(src / "acl-dir")], check=True)
    (src / "acl-dir/inside").write_bytes(b"created under a default ACL\n")
    subprocess.run(["setfacl", "-m", "u:0:r", str(src / "fifo")], check=True)

    # inode flags a user may set
    (src / "nodump").write_bytes(b"not for dump\n")
    _ioctl_flags(src / "nodump", add=FL_NODUMP)
    _ioctl_flags(src / "flag-dir", add=FL_NOATIME)

    if as_root:
        (src / "owned").write_bytes(b"owned by someone else\n")
        os.chown(src / "owned", 12345, 54321)
        os.chown(src / "a/b", NOBODY, NOBODY)
        os.chown(src / "symlink", NOBODY, 12345, follow_symlinks=False)
        os.mknod(src / "chardev", stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.mknod(src / "a/blockdev", stat.S_IFBLK | 0o640, os.makedev(7, 200))
        os.link(src / "chardev", src / "c/chardev-link")
        b.devices = ["chardev", "a/blockdev", "c/chardev-link"]
        os.setxattr(src / "plain.txt", "trusted.secret", b"\x00root only\xff")
        os.setxattr(src / "symlink", "trusted.on-symlink", b"y", follow_symlinks=False)
        os.setxattr(src / "chardev", "trusted.on-device", b"z", follow_symlinks=False)
        os.setxattr(src / "setuid", "security.capability", CAP_NET_RAW)
        os.chmod(src / "setuid", 0o4755)  # after the xattr: the mode stays
        b.root_only_xattrs = {  # the devices are not created at all
            "plain.txt": ["trusted.secret"],
            "symlink": ["trusted.on-symlink"],
            "setuid": ["security.capability"],
        }
        (src / "immutable").write_bytes(b"cannot change\n")
        (src / "append-only").write_bytes(b"log line\n")
        (src / "a/b/immutable-dir").mkdir()
        (src / "a/b/immutable-dir/kept").write_bytes(b"inside an immutable directory\n")
        b.root_only_flags = {"immutable": "i", "append-only": "a", "a/b/immutable-dir": "i"}

    # times: every item gets its own ns mtime and atime, directories last (bottom-up)
    items = sorted(
        (p for p in _walk(src) if p != src), key=lambda p: (p.is_dir() and not p.is_symlink(), -len(p.parts))
    )
    for i, p in enumerate(items):
        os.utime(p, ns=(T0 + i * 3_000_000_017, T0 + i * 1_000_000_007), follow_symlinks=False)
    os.utime(src, ns=(T0 - 11, T0 - 7))
    if as_root:  # flags that forbid utime come last
        for rel, letters in b.root_only_flags.items():
            _ioctl_flags(src / rel, add=FL_IMMUTABLE if letters == "i" else FL_APPEND)
    # (listing a directory moves its atime: the paths listed before the times were set are used)
    b.atimes = {_rel(src, p): os.lstat(p).st_atime_ns for p in [src, *items]}
    return b


def _walk(top: Path) -> list[Path]:
    out = [top]
    for dirpath, dirnames, filenames in os.walk(top):
        out += [Path(dirpath, n) for n in dirnames + filenames]
    return out


def _rel(top: Path, p: Path) -> str:
    return os.path.relpath(p, top)


# ------------------------------------------------------------------------------ independent comparisons


def _mtree_lines(top: Path, keys: str = MTREE_KEYS) -> dict[str, dict[str, str]]:
    """{path: {keyword: value}} of a tree, from mtree-netbsd (or bsdtar's mtree writer)."""
    if shutil.which("mtree"):
        spec = subprocess.run(["mtree", "-c", "-K", keys, "-p", str(top)], capture_output=True, check=True).stdout
        text = subprocess.run(["mtree", "-C", "-K", keys], input=spec, capture_output=True, check=True).stdout
    else:
        opts = ",".join(["mtree:!all", "mtree:!use-set"] + [f"mtree:{k}" for k in keys.split(",")])
        text = subprocess.run(
            ["bsdtar", "-cf", "-", "--format=mtree", f"--options={opts}", "."], cwd=top, capture_output=True, check=True
        ).stdout
    out: dict[str, dict[str, str]] = {}
    for line in text.decode("ascii").splitlines():
        if not line or line.startswith("#"):
            continue
        path, *kv = line.split()
        out[path] = dict(x.split("=", 1) for x in kv)
        out[path].pop("flags", None)  # BSD chflags: none on Linux
        if out[path].get("type") != "dir":
            out[path].setdefault("nlink", "1")  # bsdtar only writes nlink when it is > 1
    return out


def _blocks(text: bytes) -> dict[str, list[str]]:
    """``# file: NAME`` blocks of getfattr/getfacl output: {NAME: sorted other lines}."""
    out: dict[str, list[str]] = {}
    for block in text.decode("utf-8", "surrogateescape").split("\n\n"):
        lines = [x for x in block.splitlines() if x]
        if lines and lines[0].startswith("# file: "):
            out[lines[0][8:]] = sorted(lines[1:])
    return out


def xattrs_of(top: Path) -> dict[str, list[str]]:
    cp = subprocess.run(
        ["getfattr", "-R", "-P", "-h", "-d", "-m", "-", "-e", "hex", "."], cwd=top, capture_output=True, check=False
    )
    return _blocks(cp.stdout)


def acls_of(top: Path, numeric: bool) -> dict[str, list[str]]:
    cp = subprocess.run(
        ["getfacl", "-R", "-P", *(["-n"] if numeric else []), "."], cwd=top, capture_output=True, check=False
    )
    return _blocks(cp.stdout)


def flags_of(top: Path) -> dict[str, str]:
    out = {}
    for p in _walk(top):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            continue  # lsattr refuses the others, and bunker never opens them
        cp = subprocess.run(["lsattr", "-d", str(p)], capture_output=True, check=True)
        out[_rel(top, p)] = cp.stdout.split(b" ", 1)[0].decode()
    return out


def holes_of(top: Path) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """{file: (size, data regions)} by SEEK_DATA/SEEK_HOLE."""
    out = {}
    for p in _walk(top):
        if p.is_symlink() or not p.is_file():
            continue
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            size, pos, regions = os.fstat(fd).st_size, 0, []
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    assert exc.errno == errno.ENXIO
                    break
                pos = os.lseek(fd, start, os.SEEK_HOLE)
                regions.append((start, pos))
            out[_rel(top, p)] = (size, regions)
        finally:
            os.close(fd)
    return out


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        f"{k}: original {a.get(k)!r}, restored {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def compare_all(src: Path, out: Path) -> None:
    """Everything must be equal: mtree keywords, xattrs, ACLs (by name and by id), flags, holes."""
    problems = diff(_mtree_lines(src), _mtree_lines(out))
    problems += diff(xattrs_of(src), xattrs_of(out))
    problems += diff(acls_of(src, False), acls_of(out, False)) + diff(acls_of(src, True), acls_of(out, True))
    problems += diff(flags_of(src), flags_of(out)) + diff(holes_of(src), holes_of(out))
    assert not problems, "restored tree differs:\n" + "\n".join(problems[:40])


def _check_atimes(b: Built, out: Path) -> None:
    got = {rel: os.lstat(out / rel).st_atime_ns for rel in b.atimes}  # no listing: it moves atimes
    assert diff(b.atimes, got) == []


# ------------------------------------------------------------------------------ as root


@pytest.mark.skipif(
    not ROOT, reason="needs root: devices, other owners, trusted.* xattrs, file capabilities, chattr +i/+a"
)
def test_every_item_and_its_metadata_as_root(meta_fs: MetaFS, work: Path) -> None:
    meta_fs.need(*USER_FEATURES, *ROOT_FEATURES)
    _tools("setfacl", "getfacl", "getfattr", "lsattr")
    if not (shutil.which("mtree") or shutil.which("bsdtar")):
        _tools("mtree")
    src = work / "src"
    built = build_tree(src, meta_fs, as_root=True)
    repo = init_repo(work / "r")
    doc = repo.backup(src, args=("--atime",))
    assert doc["stats"]["errors"] == 0 and doc["level"] == "note", doc["events"]  # note: master key here

    target = work / "t"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0, rdoc["events"]
    assert [e for e in rdoc["events"] if e["level"] != "ok"] == [], rdoc["events"]
    assert rdoc["stats"]["hardlinks"] == 6  # multi x2, fifo, symlink, socket, chardev
    out = restored_path(target, src)
    _check_atimes(built, out)  # before anything reads the restored files
    compare_all(src, out)
    if shutil.which("mtree"):  # and mtree's own verdict
        spec = subprocess.run(["mtree", "-c", "-K", MTREE_KEYS, "-p", str(src)], capture_output=True, check=True)
        cp = subprocess.run(["mtree", "-f", "/dev/stdin", "-p", str(out)], input=spec.stdout, capture_output=True)
        assert cp.returncode == 0 and not cp.stdout.strip(), cp.stdout.decode(errors="replace")
    assert os.stat(out / "a/multi").st_ino == os.stat(out / "c/multi-3").st_ino
    assert os.lstat(out / "chardev").st_ino == os.lstat(out / "c/chardev-link").st_ino

    # restoring again over that tree: immutable and append-only items are unlocked and rewritten
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0 and rdoc["level"] == "ok", rdoc["events"]
    compare_all(src, out)

    # ls shows the new kinds
    items = {it["path"]: it for it in js(repo.ok("ls", "latest", str(src), "-R", "--json"))["items"]}
    chardev = items[str(src / "chardev")]
    assert chardev["type"] == "c" and chardev["device"] == [1, 3] and chardev["nlink"] == 2
    assert chardev["link_group"] == items[str(src / "c/chardev-link")]["link_group"]
    assert items[str(src / "sock")]["type"] == "s"
    assert items[str(src / "immutable")]["flags"] == "i" and items[str(src / "nodump")]["flags"] == "d"
    assert "trusted.secret" in items[str(src / "plain.txt")]["xattrs"]
    assert "user:12345:rwx" in items[str(src / "plain.txt")]["acl"]
    assert "group:12345:rwx" in items[str(src / "acl-dir")]["default_acl"]
    assert items[str(src / "sparse")]["hole_bytes"] == (64 << 20) - (64 << 10) - (1 << 20)
    assert items[str(src / "owned")]["uid"] == 12345
    human = repo.ok("ls", "latest", str(src)).stdout
    assert "1, 3" in human and "2 links" in human and "flags i" in human and "sparse" in human


@pytest.mark.skipif(not ROOT, reason="needs root to build a tree with what only root can restore")
def test_unprivileged_restore_of_a_full_snapshot(meta_fs: MetaFS, work: Path, user: User) -> None:
    """The user restores what it can, and each thing it cannot is a `note` that names it."""
    meta_fs.need(*USER_FEATURES, *ROOT_FEATURES)
    _tools("setfacl", "getfacl", "getfattr", "lsattr")
    src = work / "src"
    built = build_tree(src, meta_fs, as_root=True)
    base = user.base
    env = make_env(base / "env")
    cp = run_bunker("init", "--repo", base / "repo", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    cp = run_bunker("backup", src, "--repo", base / "repo", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    target = work / "t"
    target.mkdir()
    user.give(base, target)

    cp = user.bunker("restore", "latest", "--repo", base / "repo", "--target", target, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    doc = js(cp)
    assert doc["level"] == "note" and doc["stats"]["failed"] == 0, doc["events"]
    out = restored_path(target, src)
    events = doc["events"]
    by_code: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_code.setdefault(e["code"], []).append(e)
    assert set(by_code) == {
        "owner-not-restored",
        "special-skipped",
        "xattr-not-restored",
        "flags-not-restored",
    }, events
    assert {Path(e["path"]) for e in by_code["special-skipped"]} == {out / d for d in built.devices}
    assert all("root" in e["message"] for e in events)  # each says how to get the rest
    owner = by_code["owner-not-restored"]
    assert len(owner) == 1 and "restore as root" in owner[0]["message"]
    # one note per item, naming what was lost (a further name of a linked inode shares its note)
    xnotes = {Path(e["path"]): e["message"] for e in by_code["xattr-not-restored"]}
    assert set(xnotes) == {out / p for p in built.root_only_xattrs}, events
    for p, names in built.root_only_xattrs.items():
        assert all(n in xnotes[out / p] for n in names), xnotes
    lost_flags = {(Path(e["path"]), e["message"].split()[2]) for e in by_code["flags-not-restored"]}
    assert lost_flags == {(out / p, f) for p, f in built.root_only_flags.items()}, events

    # everything else is there: compared without owners, devices, root-only xattrs and flags
    skip = set(built.devices)
    a, b = _mtree_lines(src), _mtree_lines(out)
    for d in (a, b):
        for k in list(d):
            if k.removeprefix("./") in skip:
                del d[k]
            else:
                d[k].pop("uid", None)
                d[k].pop("gid", None)
    assert diff(a, b) == []
    xa, xb = xattrs_of(src), xattrs_of(out)
    for name in list(xa):
        xa[name] = [x for x in xa[name] if not x.startswith(("trusted.", "security.capability"))]
        if not xa[name]:
            del xa[name]
        if name.removeprefix("./") in skip:
            xa.pop(name, None)
    assert diff(xa, xb) == []

    def strip(acls: dict[str, list[str]]) -> dict[str, list[str]]:
        return {
            k: [x for x in v if not x.startswith(("# owner", "# group"))]
            for k, v in acls.items()
            if k.removeprefix("./") not in skip
        }

    assert diff(strip(acls_of(src, True)), strip(acls_of(out, True))) == []
    fa = {k: v.replace("i", "-").replace("a", "-") for k, v in flags_of(src).items()}
    assert diff(fa, flags_of(out)) == []
    assert diff(holes_of(src), holes_of(out)) == []
    if user.uid is not None:
        assert os.stat(out / "owned").st_uid == user.uid

    # an immutable file in the way (left by root): the user cannot unlock it and is told how
    _ioctl_flags(out / "plain.txt", add=FL_IMMUTABLE)
    cp = user.bunker("restore", "latest", "--repo", base / "repo", "--target", target, "--json", env=env)
    doc = js(cp)
    assert cp.returncode == 3, describe(cp)
    errs = [e for e in doc["events"] if e["level"] == "err"]
    assert [Path(e["path"]) for e in errs] == [out / "plain.txt"], errs
    assert "chattr -i -a" in errs[0]["message"] and "as root" in errs[0]["message"]
    _ioctl_flags(out / "plain.txt", remove=FL_IMMUTABLE)


# ------------------------------------------------------------------------------ unprivileged


def test_unprivileged_backup_and_restore(meta_fs: MetaFS, work: Path, user: User) -> None:
    """A user backs up its own tree (everything but devices, other owners and root-only xattrs
    and flags) and gets all of it back, owners included, with nothing to report."""
    meta_fs.need(*USER_FEATURES)
    _tools("setfacl", "getfacl", "getfattr", "lsattr")
    if not (shutil.which("mtree") or shutil.which("bsdtar")):
        _tools("mtree")
    src = work / "src"
    build_tree(src, meta_fs, as_root=False)
    if ROOT and "trusted" in meta_fs.features:
        os.setxattr(src / "empty", "trusted.invisible", b"an unprivileged reader cannot even list this")
    target = work / "t"
    target.mkdir()
    base = user.base
    env = make_env(base / "env")
    user.give(base, src, target)

    cp = user.bunker("init", "--repo", base / "repo", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    cp = user.bunker("backup", src, "--repo", base / "repo", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    assert js(cp)["level"] == "note", js(cp)["events"]  # the master key is on this machine
    cp = user.bunker("restore", "latest", "--repo", base / "repo", "--target", target, "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    doc = js(cp)
    assert doc["stats"]["failed"] == 0, doc["events"]
    # the only thing the user cannot restore: the owners of the ancestor directories (like /tmp)
    me = (user.uid, user.uid) if user.uid is not None else (os.geteuid(), os.getegid())
    foreign = [p for p in src.parents if p != Path("/") and (os.stat(p).st_uid, os.stat(p).st_gid) != me]
    notes = [e for e in doc["events"] if e["level"] != "ok"]
    assert [e["code"] for e in notes] == (["owner-not-restored"] if foreign else []), notes
    assert not foreign or notes[0]["message"].startswith(f"{len(foreign)} restored items")
    out = restored_path(target, src)
    if ROOT and "trusted" in meta_fs.features:
        os.removexattr(src / "empty", "trusted.invisible")  # documented: not visible to the user
    compare_all(src, out)


def test_unprivileged_many_small_files(work: Path, user: User) -> None:
    """A user's backup and restore of more small files than start the worker processes: the
    workers' short paths (read_simple, write_whole) without root's powers."""
    src = work / "src"
    many_small_files(src, owners=False)
    target = work / "t"
    target.mkdir()
    env = make_env(user.base / "env")
    user.give(user.base, src, target)
    for args in (("init",), ("backup", src), ("restore", "latest", "--target", target)):
        cp = user.bunker(*args, "--repo", user.base / "repo", "--json", env=env)
        assert cp.returncode == 0, describe(cp)
    assert_same_small_files(src, restored_path(target, src), owners=False)


# ------------------------------------------------------------------------------ sparse files


def test_sparse_file_backs_up_and_restores_in_seconds(meta_fs: MetaFS, work: Path) -> None:
    """10 GiB apparent, 1.1 MiB of data: only the data is read and stored, and it stays sparse."""
    meta_fs.need("holes")
    src = work / "src"
    src.mkdir()
    big = src / "disk.img"
    head, middle = os.urandom(64 << 10), os.urandom(1 << 20)
    with open(big, "wb") as f:
        f.truncate(10 << 30)
        f.write(head)
        f.seek(7 << 30)
        f.write(middle)
    repo = init_repo(work / "r")
    t0 = time.monotonic()
    doc = repo.backup(src)
    took = time.monotonic() - t0
    assert took < 20, f"backup of a sparse 10 GiB file took {took:.1f} s"
    assert doc["stats"]["bytes"] == 10 << 30 and doc["stats"]["stored_new"] < 4 << 20, doc["stats"]
    target = work / "t"
    t0 = time.monotonic()
    repo.ok("restore", "latest", "--target", target)
    assert time.monotonic() - t0 < 20
    out = restored_path(target, src) / "disk.img"
    assert holes_of(src) == holes_of(out.parent)
    assert os.stat(out).st_size == 10 << 30 and os.stat(out).st_blocks * 512 < 8 << 20
    with open(out, "rb") as f:
        assert f.read(len(head)) == head
        f.seek(7 << 30)
        assert f.read(len(middle)) == middle
        f.seek((7 << 30) - 4096)
        assert f.read(4096) == bytes(4096)

    # verify (put key only) reads it the way backup does: holes are not data
    cp = repo.run("verify", str(src), "--json")
    assert cp.returncode == 0, describe(cp)


# ------------------------------------------------------------------------------ files cache, links, tree


def test_unchanged_files_keep_their_metadata_and_changes_are_seen(meta_fs: MetaFS, work: Path) -> None:
    """A second backup takes unchanged files from the files cache with their xattrs, ACL, flags and
    holes; an xattr change alone (only the ctime moves) is seen; unchanged trees are stored once."""
    meta_fs.need(*USER_FEATURES)
    _tools("setfacl")
    src = work / "src"
    build_tree(src, meta_fs, as_root=False, sparse_size=8 << 20)
    repo = init_repo(work / "r")
    first = repo.backup(src)
    second = repo.backup(src)
    s = second["stats"]
    assert s["files_new"] == 0 and s["files_changed"] == 0 and s["files_unchanged"] > 5, s
    assert s["stored_new"] < 20_000, s  # no new tree: the metadata is the same
    ls1, ls2 = (js(repo.ok("ls", d["snapshot"][:12], str(src), "-R", "--json"))["items"] for d in (first, second))
    assert ls1 == ls2
    plain = next(it for it in ls2 if it["path"] == str(src / "plain.txt"))
    assert "user.comment" in plain["xattrs"] and "user:12345:rwx" in plain["acl"]
    assert next(it for it in ls2 if it["path"] == str(src / "nodump"))["flags"] == "d"
    assert next(it for it in ls2 if it["path"] == str(src / "sparse"))["hole_bytes"] > 0

    os.setxattr(src / "plain.txt", "user.comment", b"changed")
    third = repo.backup(src)
    assert third["stats"]["files_changed"] == 1, third["stats"]
    target = work / "t"
    repo.ok("restore", "latest", str(src / "plain.txt"), "--target", target)
    assert os.getxattr(restored_path(target, src) / "plain.txt", "user.comment") == b"changed"


def test_hard_link_restored_alone_gets_its_data(work: Path) -> None:
    """Restoring only one name of a hard-linked inode restores the whole item there."""
    src = work / "src"
    (src / "x").mkdir(parents=True)
    (src / "y").mkdir()
    data = os.urandom(500_000)
    (src / "x/first").write_bytes(data)
    os.link(src / "x/first", src / "y/second")
    repo = init_repo(work / "r")
    repo.backup(src)
    target = work / "t"
    repo.ok("restore", "latest", str(src / "y/second"), "--target", target)
    out = restored_path(target, src)
    assert (out / "y/second").read_bytes() == data and not (out / "x").exists()
    assert os.stat(out / "y/second").st_nlink == 1


def test_hard_links_between_many_small_files(work: Path) -> None:
    """Over 1000 files go through the worker processes on both sides: links to files read by a
    worker are waited for, and linked once the data is written."""
    src = work / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
    for i in range(1200):
        (src / "a" / f"f{i:04d}").write_bytes(f"file {i}\n".encode() * (i % 7))
        if i % 3 == 0:
            os.link(src / "a" / f"f{i:04d}", src / "b" / f"l{i:04d}")
    repo = init_repo(work / "r")
    doc = repo.backup(src)
    assert doc["stats"]["errors"] == 0
    target = work / "t"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["hardlinks"] == 400 and rdoc["stats"]["failed"] == 0
    out = restored_path(target, src)
    for i in range(0, 1200, 3):
        a, b = os.stat(out / "a" / f"f{i:04d}"), os.stat(out / "b" / f"l{i:04d}")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert (out / "b" / f"l{i:04d}").read_bytes() == f"file {i}\n".encode() * (i % 7)


_FULL = [
    {
        "n": b"file",
        "t": "f",
        "m": 0o4755,
        "u": 0,
        "g": 0,
        "U": "root",
        "G": "root",
        "mt": 1,
        "ct": 2,
        "at": 3,
        "sz": 100,
        "c": [b"\x01" * 32],
        "x": {b"user.b": b"2", b"security.capability": b"\x01" * 20, b"user.a\xff": b""},
        "acl": {"a": [["user", 6], ["user", 4, 1000, "alice"], ["group", 4], ["mask", 4], ["other", 0]]},
        "fl": 0x10,
        "hole": [0, 10, 50, 20],
        "ino": 77,
        "nl": 2,
    },
    {"n": b"dir", "t": "d", "st": b"\x02" * 32, "acl": {"d": [["user", 7], ["group", 5], ["other", 0]]}, "fl": 0x80},
    {"n": b"dev", "t": "c", "dev": [1, 3], "ino": 5, "nl": 3, "x": {b"trusted.t": b"v"}},
    {"n": b"sock", "t": "s", "m": 0o755},
]


def test_tree_keys_roundtrip_and_are_canonical() -> None:
    data = encode_tree(copy.deepcopy(_FULL))
    assert decode_tree(data) == sorted(_FULL, key=lambda e: e["n"])
    shuffled = [dict(reversed(list(e.items()))) for e in reversed(copy.deepcopy(_FULL))]
    for e in shuffled:
        if "x" in e:
            e["x"] = dict(reversed(list(e["x"].items())))
    assert encode_tree(shuffled) == data
    assert pack(unpack(data)) == data  # what the generic canonical encoder writes


@pytest.mark.parametrize(
    "change",
    [
        {"x": {"user.a": b"1"}},  # xattr names are bytes
        {"x": {b"user.a": "text"}},
        {"x": {b"system.posix_acl_access": b"\x02\x00\x00\x00"}},  # the ACL belongs in acl
        {"x": [b"user.a", b"1"]},
        {"acl": {"a": [["user", 6], ["group", 4]]}},  # no other entry
        {"acl": {"a": [["user", 6], ["user", 4, 1000, "alice"], ["group", 4], ["other", 0]]}},  # no mask
        {"acl": {"a": [["user", 8], ["group", 4], ["other", 0]]}},
        {"acl": {"a": [["owner", 6], ["group", 4], ["other", 0]]}},
        {"acl": {"a": [["user", 6], ["user", 4, -1, "x"], ["group", 4], ["mask", 4], ["other", 0]]}},
        {"acl": {"d": [["user", 7], ["group", 5], ["other", 0]]}},  # a default ACL on a file
        {"acl": {"z": []}},
        {"fl": -1},
        {"fl": 1 << 40},
        {"fl": "i"},
        {"hole": [0, 10, 5]},
        {"hole": [10, 10, 0, 5]},
        {"hole": [0, 10, 10, 5]},  # adjacent holes are one hole
        {"hole": [90, 20]},  # past the end
        {"hole": [0, 0]},
        {"ino": -1},
        {"nl": 0, "ino": 1},
        {"at": "yesterday"},
        {"m": 0o17777},
        {"u": -5},
        {"U": 5},
        {"mt": 1 << 63},
        {"t": "c"},  # a device without dev
        {"t": "b", "dev": [1]},
    ],
)
def test_malformed_tree_keys_are_format_errors(change: dict[str, Any]) -> None:
    e = dict(_FULL[0], **change)
    with pytest.raises(FormatError):
        decode_tree(pack({"v": 1, "e": [e]}))


def test_malformed_entries_of_other_kinds() -> None:
    for e in (
        {"n": b"d", "t": "d", "st": b"\x02" * 32, "ino": 1, "nl": 2},  # a hard-linked directory
        {"n": b"l", "t": "l", "lt": b"x", "fl": 16},  # flags on a symlink
        {"n": b"l", "t": "l", "lt": b"x", "acl": {"a": [["user", 7], ["group", 5], ["other", 0]]}},
        {"n": b"p", "t": "p", "hole": [0, 1], "sz": 5},
    ):
        with pytest.raises(FormatError):
            decode_tree(pack({"v": 1, "e": [e]}))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_decode_tree_with_every_key_survives_mutation(data: st.DataObject) -> None:
    base = unpack(encode_tree(copy.deepcopy(_FULL)))
    entry = data.draw(st.sampled_from(base["e"]))
    key = data.draw(st.sampled_from(sorted(entry)))
    value = data.draw(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(1 << 63), (1 << 64) - 1)
            | st.binary(max_size=40)
            | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=5)
                | st.dictionaries(st.binary(max_size=5) | st.text(max_size=5), inner, max_size=4)
            ),
            max_leaves=12,
        )
    )
    entry[key] = value
    with contextlib.suppress(FormatError):
        decode_tree(msgpack.packb(base, use_bin_type=True))
