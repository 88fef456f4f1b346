"""The short paths for small files: a backup's worker reads a plain file with read_simple and a
restore's worker writes one with write_whole; anything else (xattrs, holes, a file that changes,
a failed call) goes the general way (read_stable, write_file). These tests check that the short
paths give exactly what the general ones give, decline everything they do not handle and leave
nothing behind when they decline, and that a backup and restore of more small files than start
the worker processes keeps every file's content, mode, times, owner and xattrs."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bunker.backup.archiver import SMALL_POOL_AFTER as BACKUP_POOL_AFTER
from bunker.backup.file_reader import ReadOutcome, read_all, read_simple, read_stable
from bunker.restore.file_writer import PART_PREFIX, write_whole
from bunker.restore.restorer import SMALL_POOL_AFTER as RESTORE_POOL_AFTER
from helpers import Repo, compare_trees, restored_path, xattrs_supported

AS_ROOT = os.geteuid() == 0


def _take(data: bytes) -> list[bytes]:
    return [len(data).to_bytes(8, "little") + data[:16]]


def _consume(fd: int, size: int, holes: list[int]) -> tuple[list[bytes], int]:
    data = read_all(fd, size)
    return _take(data), len(data)


def test_read_simple_gives_what_read_stable_gives(tmp_path: Path) -> None:
    rng = random.Random(3)
    for size in (0, 1, 2000, 65536, 65537, 300_000):
        p = tmp_path / f"f{size}"
        p.write_bytes(rng.randbytes(size))
        path = os.fsencode(p)
        simple = read_simple(path, _take)
        assert simple is not None
        assert simple == read_stable(path, _consume)
        assert simple.status == "ok" and simple.size == size and simple.meta == {}


def test_read_simple_keeps_inode_flags(tmp_path: Path) -> None:
    p = tmp_path / "nodump"
    p.write_bytes(b"x" * 100)
    if subprocess.run(["chattr", "+d", str(p)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem keeps no inode flags (chattr +d failed)")
    simple = read_simple(os.fsencode(p), _take)
    assert simple is not None and simple.meta.get("fl")
    assert simple == read_stable(os.fsencode(p), _consume)


def test_read_simple_declines_what_it_does_not_handle(tmp_path: Path) -> None:
    taken: list[bytes] = []

    def take(data: bytes) -> list[bytes]:
        taken.append(data)
        return []

    declined = []
    link = tmp_path / "link"
    link.symlink_to("target")
    declined.append(link)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    declined.append(fifo)
    declined.append(tmp_path / "missing")
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(8 << 20)
        f.seek((8 << 20) - 1)
        f.write(b"e")
    with open(sparse, "rb") as f:
        if os.lseek(f.fileno(), 0, os.SEEK_HOLE) < (8 << 20):  # the filesystem reports the hole
            declined.append(sparse)
    if xattrs_supported(tmp_path):
        tagged = tmp_path / "tagged"
        tagged.write_bytes(b"data")
        os.setxattr(tagged, "user.k", b"v")
        declined.append(tagged)
    for p in declined:
        assert read_simple(os.fsencode(p), take) is None, p
    assert taken == []  # nothing was taken from a file it declined
    if sparse in declined:
        outcome = read_stable(os.fsencode(sparse), _consume)
        assert isinstance(outcome, ReadOutcome) and outcome.meta["hole"]


def _dir_fd(d: Path) -> int:
    return os.open(d, os.O_RDONLY | os.O_DIRECTORY)


def _entry(**kw: object) -> dict[str, object]:
    e: dict[str, object] = {"n": b"f", "t": "f", "m": 0o640, "mt": 1_700_000_000_123_456_789, "sz": 5}
    e.update(kw)
    return e


@pytest.mark.parametrize("as_root", [True, False] if AS_ROOT else [False])
def test_write_whole_writes_data_mode_times_and_owner(tmp_path: Path, as_root: bool) -> None:
    fd = _dir_fd(tmp_path)
    try:
        e = _entry(m=0o4751, u=4242, g=4343, U="", G="", at=1_600_000_000_000_000_001)
        assert write_whole(fd, os.fsencode(tmp_path / "f"), b"hello", e, as_root, True)
    finally:
        os.close(fd)
    st = os.lstat(tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"hello"
    assert st.st_mtime_ns == e["mt"] and st.st_atime_ns == e["at"]
    if as_root:  # the owner first, then the mode: chown clears the set-user-id bit
        assert (st.st_uid, st.st_gid) == (4242, 4343)
        assert stat.S_IMODE(st.st_mode) == 0o4751
    else:
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
        assert stat.S_IMODE(st.st_mode) & 0o777 == 0o751
    assert os.listdir(tmp_path) == ["f"]


def test_write_whole_declines_and_leaves_nothing(tmp_path: Path) -> None:
    fd = _dir_fd(tmp_path)
    try:
        # keys it does not restore: write_file and apply_meta do
        for extra in ({"x": {b"user.k": b"v"}}, {"acl": {"a": []}}, {"hole": [0, 5]}, {"new": 1}):
            assert not write_whole(fd, os.fsencode(tmp_path / "f"), b"hello", _entry(**extra), AS_ROOT, True)
        # a directory in the way: the rename fails, the temporary file goes
        (tmp_path / "d").mkdir()
        assert not write_whole(fd, os.fsencode(tmp_path / "d"), b"hello", _entry(), AS_ROOT, True)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["d"]
    gone = tmp_path / "gone"
    gone.mkdir()
    fd = _dir_fd(gone)
    try:
        gone.rmdir()  # cannot create in a removed directory
        assert not write_whole(fd, os.fsencode(gone / "f"), b"hello", _entry(), AS_ROOT, True)
    finally:
        os.close(fd)


def many_small_files(src: Path, *, owners: bool) -> int:
    """More small files than start the worker processes of backup and restore, with varied
    modes and times, some with xattrs (those take the general paths) and, with ``owners``,
    several owners. Returns how many."""
    count = max(BACKUP_POOL_AFTER, RESTORE_POOL_AFTER) + 400
    rng = random.Random(11)
    src.mkdir()
    tagged = xattrs_supported(src)
    for i in range(count):
        d = src / f"d{i // 300}"
        d.mkdir(exist_ok=True)
        p = d / f"f{i:05d}"
        p.write_bytes(rng.randbytes(rng.randrange(0, 5000)))
        if tagged and i % 97 == 0:
            os.setxattr(p, "user.k", str(i).encode())
        if owners and i % 3 == 0:
            os.chown(p, 1000 + i % 7, 2000 + i % 5)
        mode = rng.choice([0o600, 0o644, 0o755, 0o400, 0o2750])
        os.chmod(p, 0o400 if tagged and i % 194 == 97 else mode)  # xattrs on files their owner may not write
        t = rng.randrange(10**18, 17 * 10**17)
        os.utime(p, ns=(t + 1, t))
    return count


def assert_same_small_files(src: Path, out: Path, *, owners: bool) -> None:
    """The restored tree has the files of :func:`many_small_files` with their contents, modes,
    mtimes, xattrs and (``owners``) owners, and no temporary file of a restore."""
    compare_trees(src, out)
    for p in src.rglob("f*"):
        r = out / p.relative_to(src)
        if owners:
            st, rt = p.lstat(), r.lstat()
            assert (rt.st_uid, rt.st_gid) == (st.st_uid, st.st_gid), p
        assert os.listxattr(r) == os.listxattr(p), p
        for k in os.listxattr(p):
            assert os.getxattr(r, k) == os.getxattr(p, k)
    assert not [n for n in out.rglob("*") if n.name.startswith(os.fsdecode(PART_PREFIX))]


def test_many_small_files_keep_content_and_metadata(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    many_small_files(src, owners=AS_ROOT)
    repo.backup(src)
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--target", target)
    try:
        assert_same_small_files(src, restored_path(target, src), owners=AS_ROOT)
    finally:
        shutil.rmtree(target)
