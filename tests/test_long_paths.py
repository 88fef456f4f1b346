"""Paths longer than PATH_MAX (4096 bytes) and names of up to NAME_MAX (255) raw bytes: backup,
restore (as root and as an unprivileged user), `bunker verify` and `export-tar` of a tree whose
deepest items sit more than 8000 bytes below /.

No path-based tool reaches such items (os.walk, getfattr, open() all fail with ENAMETOOLONG), so
the trees are built and compared through directory descriptors (``dir_fd`` calls and
``/proc/self/fd/N/name`` for xattrs); mtree-netbsd, which walks with fts and chdir, checks them
independently where it is installed.

The deepest directory holds more than 1000 small files, so that the last of them are read and
written by the worker processes (backup and restore start them after 1000 small files) and not
only by the main process's threads."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bunker.backup.archiver import SMALL_FILE, SMALL_POOL_AFTER
from helpers import describe, init_repo, js, make_env, restored_path, run_bunker, xattrs_supported

ROOT = os.geteuid() == 0
PATH_MAX = 4096
T0 = 1_700_000_000_123_456_789
XATTR = b"\xff\x00deep value"
SMALL_COUNT = SMALL_POOL_AFTER + 12  # the last ones go to the worker processes
MTREE_KEYS = "sha256,mode,nlink,link,size,time,type"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _name(i: int, length: int) -> bytes:
    """A directory name of exactly ``length`` bytes, not UTF-8 (raw bytes 0xff 0xe9)."""
    return (b"d%02d-" % i + b"\xff\xe9-caf\xc3\xa9 " * 40)[:length]


@contextlib.contextmanager
def _opened(path: bytes | Path, flags: int = _DIR, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _down(top: Path, chain: list[bytes]) -> Iterator[int]:
    """A descriptor of the directory ``chain`` below ``top``, opened one name at a time."""
    fd = os.open(top, _DIR)
    try:
        for name in chain:
            nxt = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _proc(dfd: int, name: bytes) -> bytes:
    """A path to ``name`` in the directory ``dfd`` that the xattr calls accept at any depth."""
    return b"/proc/self/fd/%d/%s" % (dfd, name)


@dataclass
class Deep:
    """The built tree: its top, the chain of directory names, and what it holds."""

    top: Path
    chain: list[bytes]
    side: int  # index in ``chain`` of the directory that holds the other hard link name
    xattrs: bool
    trusted: bool

    @property
    def leaf_rel(self) -> bytes:
        return b"/".join(self.chain)


def _write(dfd: int, name: bytes, data: bytes, mode: int) -> None:
    with _opened(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, dir_fd=dfd) as fd:
        os.write(fd, data)
    os.chmod(name, mode, dir_fd=dfd)


def build(top: Path, as_root: bool) -> Deep:
    """A chain of 34 directories with 250-255-byte names (> 8000 bytes below /); its deepest
    directory holds small files, a large file, a symlink, a fifo, xattrs and one name of a hard
    link pair whose other name sits in a directory halfway down (already past PATH_MAX)."""
    top.mkdir()
    chain = [_name(i, 255 if i % 3 == 0 else 250) for i in range(34)]
    side = 18
    xattrs = xattrs_supported(top)
    trusted = False
    fds = [os.open(top, _DIR)]
    try:
        for name in chain:
            os.mkdir(name, 0o755, dir_fd=fds[-1])
            fds.append(os.open(name, _DIR, dir_fd=fds[-1]))
        assert len(os.fsencode(top)) + len(b"/".join(chain)) > 8000
        leaf = fds[-1]
        for i in range(SMALL_COUNT):
            _write(leaf, b"s%04d" % i, b"small file %d\n" % i, 0o644)
        _write(leaf, b"z-small", os.urandom(3000), 0o604)  # sorts last: read by a worker process
        _write(leaf, b"big", os.urandom(SMALL_FILE + 50_000), 0o640)  # read by a thread
        os.symlink(b"../\xff\xfe-target/" + chain[0], b"link", dir_fd=leaf)
        os.mkfifo(b"fifo", 0o620, dir_fd=leaf)
        os.mkdir(b"side \xfe", 0o750, dir_fd=fds[side])
        with _opened(b"side \xfe", dir_fd=fds[side]) as sfd:
            os.link(b"z-small", b"hard\xff", src_dir_fd=leaf, dst_dir_fd=sfd)
        if xattrs:
            os.setxattr(_proc(leaf, b"z-small"), b"user.deep", XATTR)
            os.setxattr(_proc(fds[-2], chain[-1]), b"user.dir", b"on the deepest directory")
        if as_root:  # trusted.* goes on fifos and symlinks too: read and set by path (/proc/self/fd)
            with contextlib.suppress(OSError):
                os.setxattr(_proc(leaf, b"fifo"), b"trusted.fifo", b"f", follow_symlinks=False)
                os.setxattr(_proc(leaf, b"link"), b"trusted.link", b"l", follow_symlinks=False)
                trusted = True
        # ns times, directories bottom-up (creating items changes a directory's mtime)
        for j, name in enumerate(sorted(os.fsencode(n) for n in os.listdir(leaf))):
            t = T0 + j * 1_000_003
            os.utime(name, ns=(t, t), dir_fd=leaf, follow_symlinks=False)
        os.utime(b"side \xfe", ns=(T0 - 5, T0 - 5), dir_fd=fds[side], follow_symlinks=False)
        for i in range(len(chain) - 1, -1, -1):
            t = T0 - (i + 1) * 777_777_777
            os.utime(chain[i], ns=(t, t), dir_fd=fds[i], follow_symlinks=False)
    finally:
        for fd in fds:
            os.close(fd)
    return Deep(top, chain, side, xattrs, trusted)


def scan(top: Path, *, dir_times: bool = True, skip_xattr: tuple[bytes, ...] = ()) -> dict[bytes, tuple[Any, ...]]:
    """{relative path: (kind, mode, mtime_ns, content digest | link target, xattrs, nlink)} of a
    tree of any depth, read through directory descriptors; hard links as an extra key
    ``b"#links"``: the sorted groups of names of each inode with more than one."""
    out: dict[bytes, tuple[Any, ...]] = {}
    inodes: dict[int, list[bytes]] = {}

    def item(dfd: int, name: bytes, rel: bytes) -> None:
        st = os.lstat(name, dir_fd=dfd)
        mode = st.st_mode
        p = _proc(dfd, name)
        x = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
        x = {os.fsencode(n): v for n, v in x.items() if not os.fsencode(n).startswith(skip_xattr)}
        extra: Any = None
        if stat.S_ISREG(mode):
            with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd), "rb") as f:
                extra = (st.st_size, hashlib.sha256(f.read()).hexdigest())
            if st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(mode):
            extra = os.readlink(name, dir_fd=dfd)
        is_dir = stat.S_ISDIR(mode)
        mtime = st.st_mtime_ns if (dir_times or not is_dir) else None
        kind = stat.S_IFMT(mode)
        out[rel] = (kind, None if stat.S_ISLNK(mode) else stat.S_IMODE(mode), mtime, extra, x, st.st_nlink)
        if is_dir:
            with _opened(name, dir_fd=dfd) as sub:
                for n in sorted(os.fsencode(c) for c in os.listdir(sub)):
                    item(sub, n, rel + b"/" + n)

    top_b = os.fsencode(top)
    with _opened(os.path.dirname(top_b)) as parent:
        item(parent, os.path.basename(top_b), b".")
    out[b"#links"] = tuple(sorted(tuple(sorted(names)) for names in inodes.values()))
    return out


def differences(want: dict[bytes, tuple[Any, ...]], got: dict[bytes, tuple[Any, ...]]) -> list[str]:
    """Readable differences (names cut short: they are thousands of bytes long)."""

    def short(rel: bytes) -> str:
        return f"{len(rel)}-byte path ...{rel[-60:]!r}"

    return [
        f"{short(k)}: source {want.get(k)!r:.200} got {got.get(k)!r:.200}"
        for k in sorted(set(want) | set(got))
        if want.get(k) != got.get(k)
    ]


def _mtree_check(src: Path, out: Path, keys: str = MTREE_KEYS) -> None:
    """mtree-netbsd's own verdict on the restored tree (it walks with fts and chdir, so it
    reaches any depth); skipped where it is not installed."""
    if not shutil.which("mtree"):
        return
    spec = subprocess.run(["mtree", "-c", "-K", keys, "-p", str(src)], capture_output=True, check=True).stdout
    assert spec.count(b"type=file") + spec.count(b"/set type=file") > 0
    cp = subprocess.run(["mtree", "-f", "/dev/stdin", "-p", str(out)], input=spec, capture_output=True)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-2000:]


def _events(doc: dict[str, Any]) -> list[str]:
    return [f"{e['level']} {e['code']}: {e['message'][:200]}" for e in doc["events"]]


# ------------------------------------------------------------------------------------------ tests


def test_backup_restore_and_verify_beyond_path_max(tmp_path: Path) -> None:
    """Everything below PATH_MAX and beyond comes back exactly: content, modes, ns mtimes (also of
    the directories), symlink targets, fifos, xattrs, the hard link pair across directories."""
    src = tmp_path / "src"
    deep = build(src, as_root=ROOT)
    want = scan(src)
    assert len(want) == len(deep.chain) + SMALL_COUNT + 7 + 1  # dirs, small files, the rest, #links
    pair = (b"./" + b"/".join(deep.chain[: deep.side]) + b"/side \xfe/hard\xff", b"./" + deep.leaf_rel + b"/z-small")
    assert want[b"#links"] == (tuple(sorted(pair)),)
    repo = init_repo(tmp_path / "r")
    doc = repo.backup(src)
    assert doc["level"] in ("ok", "note"), _events(doc)
    assert [e for e in doc["events"] if e["level"] not in ("ok", "note")] == []
    assert doc["stats"]["errors"] == 0 and doc["stats"]["files"] == SMALL_COUNT + 3, doc["stats"]

    target = tmp_path / "t"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["level"] == "ok", _events(rdoc)
    assert rdoc["stats"]["failed"] == 0 and rdoc["stats"]["hardlinks"] == 1, rdoc["stats"]
    out = restored_path(target, src)
    assert differences(want, scan(out)) == []
    _mtree_check(src, out, MTREE_KEYS + (",uid,gid" if ROOT else ""))

    # restoring again over the existing tree replaces each item in place
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0, _events(rdoc)
    assert differences(want, scan(out)) == []

    # one deep item on its own (its missing ancestors are made on the way)
    alone = tmp_path / "alone"
    rel = b"/" + deep.leaf_rel + b"/z-small"
    repo.ok("restore", "latest", os.fsdecode(os.fsencode(src) + rel), "--target", alone)
    got = scan(alone)
    assert got[b"./" + os.fsencode(src).lstrip(b"/") + rel][3] == want[b"." + rel][3]
    assert len(got) == len(os.fsencode(src).strip(b"/").split(b"/")) + len(deep.chain) + 3  # ., dirs, file, #links

    # verify (put key only) reads every file again, through the same descriptors
    vdoc = js(repo.ok("verify", src, "--read-data", "--json"))
    assert vdoc["ok"] is True and vdoc["missing"] == [] and vdoc["unreadable"] == [], vdoc
    assert vdoc["stored"] == SMALL_COUNT + 3  # every name of a regular file, the hard link's too
    with _down(src, deep.chain) as dfd, _opened(b"big", os.O_WRONLY | os.O_CLOEXEC, dir_fd=dfd) as fd:
        os.pwrite(fd, b"changed", 1000)
    cp = repo.run("verify", src, "--json")
    assert cp.returncode != 0, describe(cp)
    assert [m["path"].rsplit("/", 1)[1] for m in js(cp)["missing"]] == ["big"]


def test_unprivileged_restore_beyond_path_max(tmp_path: Path, unprivileged: Any) -> None:
    """A user without root's powers restores the deep tree (of another owner) it was given the
    repository of: everything but the owners, with one note that says so."""
    base = unprivileged.base
    src = base / "src"
    build(src, as_root=False)
    want = scan(src)
    env = make_env(base / "env")
    cp = run_bunker("init", "--repo", base / "repo", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    cp = run_bunker("backup", src, "--repo", base / "repo", "--json", env=env)
    assert cp.returncode == 0, describe(cp)
    target = base / "t"
    target.mkdir()
    prefix, nobody = list(unprivileged.prefix), unprivileged.as_nobody
    if ROOT and not nobody:  # this Python is out of nobody's reach: nobody may then read and search all
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        if run_bunker("--version", env=env, prefix=as_nobody + caps).returncode == 0:
            prefix, nobody = as_nobody + caps, True
    if nobody:  # the repository, keys and target become the user's; the source stays root's
        for d in (base / "repo", base / "env", target):
            for dirpath, dirnames, filenames in os.walk(d):
                os.chown(dirpath, 65534, 65534)
                for n in dirnames + filenames:
                    os.chown(os.path.join(dirpath, n), 65534, 65534, follow_symlinks=False)

    cp = run_bunker("restore", "latest", "--repo", base / "repo", "--target", target, "--json", env=env, prefix=prefix)
    assert cp.returncode == 0, describe(cp)
    doc = js(cp)
    assert doc["stats"]["failed"] == 0 and doc["stats"]["hardlinks"] == 1, _events(doc)
    codes = {e["code"] for e in doc["events"] if e["level"] != "ok"}
    # (without nobody: the tests' own user, or root without the right to ignore file modes)
    assert codes == ({"owner-not-restored"} if ROOT and nobody else set()), _events(doc)
    assert all(e["level"] in ("ok", "note") for e in doc["events"]), _events(doc)
    assert differences(want, scan(restored_path(target, src))) == []


def _member(src: Path, rel: bytes) -> bytes:
    """The archive member name of a scanned item (relative, like the snapshot's paths)."""
    return os.fsencode(src).strip(b"/") + rel[1:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[bytes, tuple[Any, ...]]]:
    """A deep tree, backed up and exported once for the tests that read the archive."""
    tmp_path = tmp_path_factory.mktemp("export")
    src = tmp_path / "src"
    build(src, as_root=False)
    repo = init_repo(tmp_path / "r")
    repo.backup(src)
    out = tmp_path / "out.tar"
    cp = repo.run("export-tar", "latest", "-o", str(out))
    assert cp.returncode == 0 and "left out" not in cp.stderr, describe(cp)
    return src, out, scan(src)


def test_export_tar_carries_names_beyond_path_max(
    exported: tuple[Path, Path, dict[bytes, tuple[Any, ...]]],
) -> None:
    """Every item is a member under its full raw-byte name (pax ``path`` records, also past
    PATH_MAX), with its type, mode, mtime, size, link target and xattrs; the further hard link
    name is a hard-link member naming the first."""
    src, out, want = exported
    members = {}
    with tarfile.open(out, encoding="utf-8", errors="surrogateescape") as tar:
        for ti in tar:
            members[ti.name.encode("utf-8", "surrogateescape")] = ti
    items = {_member(src, rel): v for rel, v in want.items() if rel != b"#links"}
    ancestors = {b"/".join(os.fsencode(src).strip(b"/").split(b"/")[:i]) for i in range(1, src.as_posix().count("/"))}
    assert set(members) - ancestors == set(items)
    assert max(len(n) for n in members) > 8000
    first, other = sorted(want[b"#links"][0], key=lambda r: r.endswith(b"z-small"), reverse=True)
    for name, (kind, mode, mtime, extra, x, _) in items.items():
        ti = members[name]
        assert ti.mode == mode or stat.S_ISLNK(kind), name[-40:]
        assert ti.pax_headers["mtime"] == f"{mtime // 10**9}.{mtime % 10**9:09d}", name[-40:]
        if name == _member(src, other):  # archived after its first name, as a link to it
            assert ti.islnk() and ti.linkname.encode("utf-8", "surrogateescape") == _member(src, first)
            continue  # the inode's xattrs are on the first name's member
        if stat.S_ISREG(kind):
            assert ti.isreg() and ti.size == extra[0]
        elif stat.S_ISLNK(kind):
            assert ti.issym() and ti.linkname.encode("utf-8", "surrogateescape") == extra
        for xn, xv in x.items():
            assert ti.pax_headers["SCHILY.xattr." + xn.decode()].encode("utf-8", "surrogateescape") == xv


def _extract(tool: list[str], out: Path, top: Path) -> tuple[int, list[str]]:
    top.mkdir()
    cp = subprocess.run([*tool, "-xpf", str(out), "-C", str(top)], capture_output=True, check=False)
    return cp.returncode, cp.stderr.decode("utf-8", "backslashreplace").splitlines()


@pytest.mark.skipif(shutil.which("bsdtar") is None, reason="bsdtar not installed")
def test_bsdtar_extracts_the_export_beyond_path_max(
    tmp_path: Path, exported: tuple[Path, Path, dict[bytes, tuple[Any, ...]]]
) -> None:
    """bsdtar (3.6) recreates every item past PATH_MAX with its content, mode and xattrs, but
    not what it sets by path afterwards: there it leaves the mtimes of directories, symlinks and
    fifos, directory xattrs, and hard links to a name past PATH_MAX ("File name too long").
    Everything else must be exact; `bunker restore` recreates all of it (see above)."""
    src, out, want = exported
    top = tmp_path / "bsd"
    _extract(["bsdtar", "--xattrs"], out, top)
    got = scan(restored_path(top, src))
    unexplained = []
    for rel in sorted(set(want) | set(got)):
        w, g = want.get(rel), got.get(rel)
        if w == g or rel == b"#links":
            continue
        deep = len(_member(src, rel)) >= PATH_MAX - 255
        assert w is not None, f"extra item {rel[-60:]!r}"
        if deep and g is None and rel in want[b"#links"][0]:
            continue  # the hard link's second name
        if g is not None and deep:
            kind = w[0]
            w2, g2 = list(w), list(g)
            if not stat.S_ISREG(kind):
                w2[2] = g2[2] = None  # mtime
            if stat.S_ISDIR(kind):
                w2[4] = g2[4] = None  # xattrs
            if stat.S_ISREG(kind):
                w2[5] = g2[5] = None  # nlink: its other name is missing
            if w2 == g2:
                continue
        unexplained.append(f"{rel[-60:]!r}: source {w!r:.200} extracted {g!r:.200}")
    assert unexplained == []
    # every regular file is there with its content and xattrs, at any depth
    files = [rel for rel, v in want.items() if rel != b"#links" and stat.S_ISREG(v[0])]
    assert sum(1 for rel in files if rel in got and got[rel][3] == want[rel][3]) >= len(files) - 1


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_extracts_the_export_up_to_path_max(
    tmp_path: Path, exported: tuple[Path, Path, dict[bytes, tuple[Any, ...]]]
) -> None:
    """GNU tar (1.34) reads the long pax names but creates items by their full relative path, so
    the kernel refuses every one past PATH_MAX ("File name too long"); what it creates is exact."""
    src, out, want = exported
    top = tmp_path / "gnu"
    rc, errors = _extract(["tar", "--xattrs", "--xattrs-include=*", "--warning=no-unknown-keyword"], out, top)
    problems = [e for e in errors if "File name too long" not in e and "Exiting with failure status" not in e]
    assert problems == [] and rc in (0, 2), errors[:5]
    got = scan(restored_path(top, src))
    assert got, "nothing extracted"
    for rel, g in got.items():
        if rel == b"#links":
            continue
        w = want[rel]
        same = (w[0], w[1], w[3], w[4]) == (g[0], g[1], g[3], g[4])  # not nlink and directory times:
        assert same, f"{rel[-60:]!r}: source {w!r:.200} extracted {g!r:.200}"  # children may be missing
        if not stat.S_ISDIR(w[0]):
            assert w[2] == g[2], rel[-60:]
    if rc == 2:  # what was refused is exactly what lies past PATH_MAX
        missing = {rel for rel in want if rel not in got and rel != b"#links"}
        assert missing and all(len(_member(src, rel)) >= PATH_MAX for rel in missing)


def test_deep_path_calls(tmp_path: Path) -> None:
    """The helpers behind all of the above, in-process: each call on a path past PATH_MAX, the
    per-thread directory cache (same directory, a directory below it, forgotten), and a symlink
    among the components refused rather than followed."""
    from bunker.fs import deep_path

    top = os.fsencode(tmp_path)
    a = top + b"/" + b"/".join(_name(i, 250) for i in range(20))
    b = a + b"/" + b"/".join(_name(i, 255) for i in range(20, 40))
    assert len(a) > PATH_MAX and len(b) > 2 * PATH_MAX
    deep_path.forget()
    deep_path.makedirs(b, 0o755)
    deep_path.makedirs(b, 0o755)  # exists already: fine
    fd = deep_path.open(a + b"/f\xff", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"data")
    os.close(fd)
    deep_path.link(a + b"/f\xff", b + b"/g")  # two deep directories
    assert deep_path.lstat(b + b"/g").st_nlink == 2
    deep_path.symlink(b"../f\xff", b + b"/l")
    assert deep_path.readlink(b + b"/l") == b"../f\xff"
    deep_path.mkfifo(b + b"/p", 0o600)
    deep_path.mknod(b + b"/s", stat.S_IFSOCK | 0o600)
    deep_path.chmod(b + b"/g", 0o640)
    deep_path.chown(b + b"/l", os.geteuid(), os.getegid())
    deep_path.utime(b + b"/l", (T0, T0 + 1))
    st = deep_path.lstat(b + b"/l")
    assert stat.S_ISLNK(st.st_mode) and st.st_mtime_ns == T0 + 1
    assert stat.S_IMODE(deep_path.lstat(a + b"/f\xff").st_mode) == 0o640
    assert sorted(deep_path.listdir(b)) == [b"g", b"l", b"p", b"s"]
    assert len(deep_path.listdir(top)) == 1
    # one descriptor of a deep directory serves many calls (a restore's files), and a rename
    # within one directory resolves it once
    pfd = deep_path.open_parent(b + b"/g")
    try:
        assert os.stat(b"g", dir_fd=pfd, follow_symlinks=False).st_nlink == 2
    finally:
        os.close(pfd)
    deep_path.rename(b + b"/p", b + b"/p2")
    assert sorted(deep_path.listdir(b)) == [b"g", b"l", b"p2", b"s"]
    deep_path.rename(b + b"/p2", b + b"/p")
    if xattrs_supported(tmp_path):
        os.setxattr(deep_path.xattr_path(b + b"/g"), b"user.k", b"v")
        assert os.getxattr(deep_path.xattr_path(a + b"/f\xff"), b"user.k") == b"v"
    # from the cached directory to a sibling, up, and down again (``..`` then names)
    for sub in (b"x1", b"x2"):
        deep_path.mkdir(b + b"/" + sub, 0o700)
        deep_path.symlink(sub, b + b"/" + sub + b"/me")
    assert [deep_path.readlink(b + b"/" + sub + b"/me") for sub in (b"x1", b"x2", b"x1")] == [b"x1", b"x2", b"x1"]
    assert deep_path.readlink(b + b"/l") == b"../f\xff"  # one level up
    assert deep_path.readlink(b + b"/x2/me") == b"x2"
    deep_path.unlink(b + b"/g")
    assert not deep_path.lexists(b + b"/g") and deep_path.lexists(b + b"/l")
    with pytest.raises(NotADirectoryError):
        deep_path.makedirs(a + b"/f\xff/x" + b"/y" * 10)
    # a directory on the way replaced by a symlink to a copy: refused, not followed
    last = os.path.basename(a)
    with _down(tmp_path, a[len(top) + 1 :].split(b"/")[:-1]) as pfd:
        os.rename(last, b"moved", src_dir_fd=pfd, dst_dir_fd=pfd)
        os.symlink(b"moved", last, dir_fd=pfd)
    deep_path.forget()  # the cache still holds the moved directory
    with pytest.raises(NotADirectoryError):
        deep_path.lstat(b + b"/l")
    deep_path.forget()
