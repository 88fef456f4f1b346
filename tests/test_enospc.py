"""The repository's disk runs out of space (issue 5, "never stuck, never lost").

With root, on a real full filesystem: a small ext4 image, loop-mounted, holds the repository (the
client's own state and spool stay on the test's disk). Without root, and in-process besides, a
FaultyBackend whose quota runs out raises what LocalBackend raises for ENOSPC.

Either way: the run stops with a clear message (what happened, what it means, the next step) and
exit code 4, not a traceback; it does not fall back to the local spool (a full disk is not an
unreachable one); earlier snapshots are intact and nothing half-written sits under a final name;
once space is freed, the same command completes and restores byte-identical.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bunker.backup.run import BackupRequest, run_backup
from bunker.crypto.keyfile import load_put_key
from bunker.errors import ExitCode
from bunker.node.spool import Spool, spooling_repository
from bunker.repo.repository import Repository
from bunker.storage.local import LocalBackend, RepositoryFull
from faults import FaultPlan, FaultyBackend
from helpers import Repo, b3, init_repo, js, make_tree, restored_path, snapshot_tree

HASH_NAMED = ("config", "clients", "packs", "index", "refs", "snapshots", "retired", "gc")


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 48 MiB ext4 filesystem (no blocks reserved for root), loop-mounted."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 to mount a small filesystem (test_full_quota_* covers the rest)")
    base = Path(tempfile.mkdtemp(prefix="bunker-full-", dir="/tmp"))
    img, mnt = base / "ext4.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(48 << 20)
    mounted = False
    try:
        cp = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], capture_output=True, check=False)
        if cp.returncode == 0:
            cp = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, check=False)
        if cp.returncode != 0:
            pytest.skip(f"mounting an ext4 image failed: {cp.stderr.decode().strip()}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _fill(mnt: Path, leave: int) -> Path:
    """A file that takes all but ``leave`` bytes of the filesystem."""
    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free
    with open(filler, "ab") as f:
        if free > leave:
            os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, free - leave)
        f.flush()
        os.fsync(f.fileno())
    return filler


def _assert_clear_full_message(stderr: str, doc: dict[str, object], where: Path | str) -> None:
    assert doc["exit_code"] == ExitCode.FATAL
    text = f"{doc['error']} {doc['hint']}"
    assert "Traceback" not in stderr and "carefully" not in stderr.lower()
    assert "is full" in text and str(where) in text  # what happened, and where
    assert "nothing stored before is damaged" in text and "no new snapshot" in text  # what it means
    assert "Free space on that disk" in text and "run the same command again" in text  # the next step
    assert "cannot be reached" not in text and "spool" not in text


def _assert_no_partial_objects(root: Path) -> None:
    """Every hash-named object holds exactly the bytes its name says; no temp file is left."""
    assert list(root.rglob(".tmp-*")) == []
    for prefix in HASH_NAMED:
        for p in (root / prefix).iterdir():
            assert b3(p.read_bytes()) == p.name, f"{prefix}/{p.name} is not what its name says"


def _spooled(repo: Repo) -> list[Path]:
    spool = Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "spool"
    return [p for p in spool.rglob("*") if p.is_file() and p.parent.name in ("packs", "index", "refs", "snapshots")]


def test_full_filesystem_mid_backup(small_fs: Path, tmp_path: Path) -> None:
    where = small_fs / "repo"
    repo = init_repo(tmp_path / "home", url=str(where))
    repo = dataclasses.replace(repo, path=where)
    src = tmp_path / "src"
    make_tree(src)
    first = repo.backup(src, args=("--no-progress",))
    first_state = snapshot_tree(src, dir_mtimes=False)
    (src / "big.bin").write_bytes(os.urandom(12 << 20))

    # the disk fills in the middle of the packs, then a disk already full to the last byte (the
    # lease, the run's first write, fails)
    for leave in (3 << 20, 0):
        filler = _fill(small_fs, leave=leave)
        cp = repo.run("backup", src, "--json", "--no-progress")
        assert cp.returncode == ExitCode.FATAL, cp.stderr
        _assert_clear_full_message(cp.stderr, js(cp), where)
        assert _spooled(repo) == []  # not taken for an unreachable repository
        _assert_no_partial_objects(where)
        snaps = [p.name for p in (where / "snapshots").iterdir()]
        assert snaps == [first["snapshot"]]

    # reading needs no space: the earlier snapshot checks clean and restores, on the full disk
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    js(repo.ok("restore", first["snapshot"], "--target", tmp_path / "t1", "--json"))
    assert snapshot_tree(restored_path(tmp_path / "t1", src), dir_mtimes=False) == first_state

    filler.unlink()  # space is freed: the same command completes
    again = repo.backup(src, args=("--no-progress",))
    assert again["spooled"] is False and again["level"] in ("ok", "note")
    js(repo.ok("restore", again["snapshot"], "--target", tmp_path / "t2", "--json"))
    assert snapshot_tree(restored_path(tmp_path / "t2", src), dir_mtimes=False) == snapshot_tree(src, dir_mtimes=False)
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    _assert_no_partial_objects(where)


@pytest.mark.parametrize("quota", [0, 150_000, 1_500_000])
def test_full_quota_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quota: int) -> None:
    """The same without root: the storage takes ``quota`` more bytes, then every put fails as
    LocalBackend fails on ENOSPC (0: the lease; then packs at different points)."""
    repo = init_repo(tmp_path / "r")
    for k in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(k, repo.env[k])
    src = tmp_path / "src"
    make_tree(src)
    first = repo.backup(src)
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    put = load_put_key(str(repo.put_key))
    spool = Spool(str(repo.path))
    spool.seed(Repository.open(LocalBackend(str(repo.path))), put)

    faulty = FaultyBackend(LocalBackend(str(repo.path)), FaultPlan(quota=quota))
    upstream = Repository.open(faulty)
    with pytest.raises(RepositoryFull) as caught:
        run_backup(spooling_repository(upstream, spool), put, BackupRequest(paths=[str(src)]))
    assert any(f.startswith("full ") for f in faulty.log)
    err = caught.value
    _assert_clear_full_message("", {"exit_code": err.exit_code, "error": err.message, "hint": err.hint}, repo.path)
    assert spool.pending() == []  # nothing went to the spool
    _assert_no_partial_objects(repo.path)
    assert [p.name for p in repo.objects("snapshots")] == [first["snapshot"]]
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True

    faulty.heal()
    outcome = run_backup(spooling_repository(Repository.open(faulty), spool), put, BackupRequest(paths=[str(src)]))
    assert outcome.log.level in ("ok", "note") and spool.pending() == []
    snap = outcome.committed.name.split("/", 1)[1]
    js(repo.ok("restore", snap, "--target", tmp_path / "t", "--json"))
    assert snapshot_tree(restored_path(tmp_path / "t", src), dir_mtimes=False) == snapshot_tree(src, dir_mtimes=False)
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
