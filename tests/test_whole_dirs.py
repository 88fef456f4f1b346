"""Directories read whole by a worker process (backup/whole_dirs.py): once the small-file workers
are in use, a directory of only small new files is handed to a worker, which builds its entries,
tree and files-cache row. These tests check that such a tree is byte for byte the one the walk
builds file by file (same metadata, events and errors), that the rows it records let the next run
reuse it, that a restore gives back the source, and which directories are never handed over."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from bunker.backup.archiver import SMALL_FILE, SMALL_POOL_AFTER
from bunker.backup.tree_reuse import lstat_children
from bunker.backup.whole_dirs import whole_files
from helpers import Repo, compare_trees, js, restored_path, xattrs_supported

AS_ROOT = os.geteuid() == 0
# a year past what a tree's nanosecond times can hold (2262): tree.fit_entry stores the nearest
# time and the run logs a bad-metadata error (tmpfs and ext4 keep such times)
FAR_FUTURE_NS = 300 * 365 * 86400 * 10**9 + 10**18


def _bunker_with(patch: str) -> list[str]:
    """The bunker command with ``patch`` (Python) run first in its process."""
    run = "import sys\nsys.argv[0] = 'bunker'\nfrom bunker.cli.main import main\nmain()"
    return [sys.executable, "-c", f"{patch}\n{run}"]


# the walk reads every directory file by file: the trees the whole-directory path must equal
FILE_BY_FILE = _bunker_with("from bunker.backup.archiver import Archiver\nArchiver._hand_whole = lambda *a: False")
# the same bunker, telling on stderr how many directories it handed to the workers whole
COUNTING = _bunker_with(
    "import atexit, sys\n"
    "from bunker.backup.small_batches import SmallBatches\n"
    "handed = []\n"
    "queue_dir = SmallBatches.queue_dir\n"
    "def counted(self, job, whole, files, nbytes):\n"
    "    handed.append(files)\n"
    "    queue_dir(self, job, whole, files, nbytes)\n"
    "SmallBatches.queue_dir = counted\n"
    "atexit.register(lambda: print(f'handed-whole {len(handed)} {sum(handed)}', file=sys.stderr))"
)


def _source(src: Path) -> int:
    """Directories of small files, more than start the workers, with varied modes, times and
    owners, some files with xattrs (the worker reads those the general way) and one whose mtime
    a tree cannot hold. Returns how many files."""
    tagged = xattrs_supported(src.parent)
    count = SMALL_POOL_AFTER + 1500
    for i in range(count):
        d = src / f"d{i // 250:02d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{i:05d}"
        p.write_bytes(os.urandom(i % 3000) + b"x" * (i % 700))
        if tagged and i % 83 == 0:
            os.setxattr(p, "user.k", str(i).encode())
        if AS_ROOT and i % 5 == 0:
            os.chown(p, 1000 + i % 3, 2000 + i % 4)
        os.chmod(p, (0o600, 0o644, 0o755, 0o2750)[i % 4])
        os.utime(p, ns=(10**18 + i, 10**18 + 7 * i))
    os.utime(src / "d09" / "f02300", ns=(10**18, FAR_FUTURE_NS))
    return count


def _events(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((e["code"], e.get("path", "")) for e in doc["events"] if e["code"] != "master-key-on-client")


def _forget_files_cache(repo: Repo) -> None:
    shutil.rmtree(Path(repo.env["XDG_CACHE_HOME"]) / "bunker")


def test_a_directory_read_whole_has_the_tree_the_walk_builds(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _source(src)
    by_file = repo.backup(src, rc=3, argv0=FILE_BY_FILE)
    assert by_file["stats"]["files"] == files
    _forget_files_cache(repo)
    again = repo.backup(src, rc=3, argv0=FILE_BY_FILE)  # what a run adds when every tree exists already
    _forget_files_cache(repo)
    cp = repo.ok("backup", src, "--json", rc=3, argv0=COUNTING)  # 3: the error
    whole = js(cp)
    handed = [ln.split() for ln in cp.stderr.splitlines() if ln.startswith("handed-whole")]
    dirs, handed_files = int(handed[0][1]), int(handed[0][2])
    # after the first 1,000 small files every directory but the one they end in goes whole
    assert dirs >= 5 and handed_files >= 1250, handed
    # the same trees: the run stored no chunk the file-by-file runs did not
    assert whole["stats"]["chunks_new"] == again["stats"]["chunks_new"]
    for key in ("files", "bytes", "errors", "entries", "files_new", "files_changed", "dirs"):
        assert whole["stats"][key] == by_file["stats"][key], key
    assert whole["stats"]["errors"] == 1  # the time no tree can hold, in a directory read whole
    assert _events(whole) == _events(by_file)
    assert ("bad-metadata", str(src / "d09" / "f02300")) in _events(whole)

    # the rows the workers recorded make the next run reuse every tree but the one with an error
    nochange = repo.backup(src, rc=3)
    assert nochange["stats"]["files_unchanged"] == files
    assert nochange["stats"]["trees_reused"] == nochange["stats"]["dirs"] - 2  # d09 and src itself
    target = tmp_path / "t"
    repo.ok("restore", whole["snapshot"], "--target", target)
    try:
        out = restored_path(target, src)
        for tree in (src, out):  # its time was stored as the nearest one a tree holds
            (tree / "d09" / "f02300").unlink()
            os.utime(tree / "d09", ns=(10**18, 10**18))
        compare_trees(src, out)
        for p in (src / "d05").iterdir():
            r = out / "d05" / p.name
            assert os.listxattr(r) == os.listxattr(p), p
            if AS_ROOT:
                assert (r.lstat().st_uid, r.lstat().st_gid) == (p.lstat().st_uid, p.lstat().st_gid), p
    finally:
        shutil.rmtree(target)


def test_only_directories_of_small_new_files_of_one_name_go_whole(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        (d / f"f{i}").write_bytes(b"x" * (100 + i))

    def children() -> list[Any]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return lstat_children(fd, [(n, os.fsencode(d) + b"/" + n) for n in sorted(os.listdir(os.fsencode(d)))])
        finally:
            os.close(fd)

    got = whole_files(children(), {}, SMALL_FILE, 1 << 20)
    assert got is not None and [f[0] for f in got[0]] == [b"f0", b"f1", b"f2"] and got[1] == 303
    assert whole_files(children(), {}, SMALL_FILE, 200) is None  # more bytes than a batch
    st = (d / "f1").lstat()
    unchanged = {b"f1": [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, [b"\0" * 32], None]}
    assert whole_files(children(), unchanged, SMALL_FILE, 1 << 20) is None  # not to be read again
    changed = {b"f1": [st.st_ino, st.st_size + 1, st.st_mtime_ns, st.st_ctime_ns, [b"\0" * 32], None]}
    assert whole_files(children(), changed, SMALL_FILE, 1 << 20) is not None
    (d / "big").write_bytes(b"x" * (SMALL_FILE + 1))
    assert whole_files(children(), {}, SMALL_FILE, 1 << 30) is None
    (d / "big").unlink()
    os.link(d / "f0", d / "f0-again")
    assert whole_files(children(), {}, SMALL_FILE, 1 << 20) is None
    (d / "f0-again").unlink()
    (d / "sub").mkdir()
    assert whole_files(children(), {}, SMALL_FILE, 1 << 20) is None
    (d / "sub").rmdir()
    os.symlink("f0", d / "link")
    assert whole_files(children(), {}, SMALL_FILE, 1 << 20) is None


# the workers fail every directory handed to them whole (each file of it is then an error)
FAILING = _bunker_with(
    "from bunker.backup.small_files import SmallFilePool\n"
    "SmallFilePool.submit_dirs = lambda self, dirs: self._start().submit(int, 'not a number')"
)


def test_the_files_of_a_directory_a_worker_failed_are_errors_and_not_in_the_backup(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(SMALL_POOL_AFTER + 300):
        d = src / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(b"%d" % i)
    doc = repo.backup(src, rc=3, argv0=FAILING)
    failed = {e["path"] for e in doc["events"] if e["code"] == "read-failed"}
    # d11 and d12 went whole; the first 1,000 files, and d10 once they were seen, one by one
    assert failed == {str(p) for n in ("d11", "d12") for p in (src / n).iterdir()}
    assert all("worker failed" in e["message"] for e in doc["events"] if e["code"] == "read-failed")
    assert doc["stats"]["errors"] == 200
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--target", target)
    try:
        out = restored_path(target, src)
        assert sorted(p.name for p in out.iterdir()) == [f"d{i:02d}" for i in range(13)]
        assert not list((out / "d11").iterdir())  # the directory is kept, without the files
        assert len(list((out / "d10").iterdir())) == 100
    finally:
        shutil.rmtree(target)
