"""The repository's disk runs out of space (issue 5, "never stuck, never lost").

With root, on a real full filesystem: a small ext4 image, loop-mounted, holds the repository (the
client's own state and spool stay on the test's disk): a local repository, one served by `bunker
serve` (unix:// and ssh://: the server's disk is full) and one on a WebDAV server (wsgidav, which
answers a full disk with 500 and "No space left on device"). Without root, and in-process
besides, a FaultyBackend whose quota runs out raises what LocalBackend raises for ENOSPC; object
stores' "full" answers (MinIO's 507 XMinioStorageFull, quota codes) come from a stub server.

Either way: the run stops with a clear message (what happened, what it means, the next step) and
exit code 4, not a traceback; it does not fall back to the local spool (a full disk is not an
unreachable one); earlier snapshots are intact and nothing half-written sits under a final name;
once space is freed, the same command completes and restores byte-identical.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bunker.backup.run import BackupRequest, run_backup
from bunker.crypto.keyfile import load_put_key
from bunker.errors import ExitCode
from bunker.node.spool import Spool, spooling_repository
from bunker.repo.repository import Repository
from bunker.storage.full import RepositoryFull
from bunker.storage.local import LocalBackend
from bunker.storage.services import open_s3
from faults import FaultPlan, FaultyBackend
from helpers import BUNKER, Repo, b3, init_repo, js, loop_ext4, make_tree, restored_path, snapshot_tree, start_wsgidav

HASH_NAMED = ("config", "clients", "packs", "index", "refs", "snapshots", "retired", "gc")


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 48 MiB ext4 filesystem (no blocks reserved for root), loop-mounted."""
    with loop_ext4(48 << 20, "bunker-full-", "test_full_quota_* covers the rest") as mnt:
        yield mnt


def _fill(mnt: Path, leave: int) -> Path:
    """A file that takes all but ``leave`` bytes of the filesystem."""
    filler = mnt / "filler"
    os.sync()  # blocks of earlier writes still in delayed allocation count as free until written
    free = shutil.disk_usage(mnt).free
    with open(filler, "ab") as f:
        if free > leave:
            os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, free - leave)
        f.flush()
        os.fsync(f.fileno())
    return filler


def _assert_clear_full_message(
    stderr: str, doc: dict[str, object], where: Path | str, free: str = "Free space on that disk"
) -> None:
    assert doc["exit_code"] == ExitCode.FATAL
    text = f"{doc['error']} {doc['hint']}"
    assert "Traceback" not in stderr and "carefully" not in stderr.lower()
    assert "is full" in text and str(where) in text  # what happened, and where
    assert "nothing stored before is damaged" in text and "no new snapshot" in text  # what it means
    assert free in text and "run the same command again" in text  # the next step
    assert "cannot be reached" not in text and "did not answer" not in text and "spool" not in text


def _assert_no_partial_objects(root: Path) -> None:
    """Every hash-named object holds exactly the bytes its name says; no temp file is left."""
    assert list(root.rglob(".tmp-*")) == [] and list(root.rglob(".bunker-tmp-*")) == []
    for prefix in HASH_NAMED:
        for p in (root / prefix).iterdir() if (root / prefix).is_dir() else ():  # WebDAV: made when needed
            assert b3(p.read_bytes()) == p.name, f"{prefix}/{p.name} is not what its name says"


def _after_the_full_disk(
    repo: Repo, src: Path, first: dict[str, Any], first_state: Any, filler: Path, where: Path, tmp_path: Path
) -> None:
    """Reading needs no space: the earlier snapshot checks clean and restores on the full disk;
    once ``filler`` is gone the same backup command completes and restores."""
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

    _after_the_full_disk(repo, src, first, first_state, filler, where, tmp_path)


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


# ---------------------------------------------------------------- the storage is full elsewhere


def _full_disk_run(
    repo: Repo, where: Path, small_fs: Path, src: Path, tmp_path: Path, free: str, shown: Path | str
) -> None:
    """A backup onto a repository whose storage (``where``, on ``small_fs``) fills: in the middle
    of the packs, then full to the last byte; the message names ``shown`` and says ``free``.
    Nothing spooled, nothing partial, the earlier snapshot restores; after freeing space the same
    command completes."""
    first = repo.backup(src, args=("--no-progress",))
    first_state = snapshot_tree(src, dir_mtimes=False)
    (src / "big.bin").write_bytes(os.urandom(12 << 20))
    for leave in (3 << 20, 0):
        filler = _fill(small_fs, leave=leave)
        t0 = time.monotonic()
        cp = repo.run("backup", src, "--json", "--no-progress")
        assert cp.returncode == ExitCode.FATAL, cp.stderr
        _assert_clear_full_message(cp.stderr, js(cp), shown, free)
        assert time.monotonic() - t0 < 60  # no minutes of retries
        assert _spooled(repo) == []  # not taken for an unreachable repository
        _assert_no_partial_objects(where)
        assert [p.name for p in (where / "snapshots").iterdir()] == [first["snapshot"]]

    _after_the_full_disk(repo, src, first, first_state, filler, where, tmp_path)


@pytest.mark.parametrize("via", ["unix", "ssh"])
def test_full_server_disk_over_bunker_serve(small_fs: Path, tmp_path: Path, via: str, request: Any) -> None:
    """The disk of a `bunker serve` server fills: the server answers FAILED with the kind "full"
    (FORMAT.md section 22), the client stops with "the server's disk is full" and does not spool."""
    assert BUNKER
    where = small_fs / "repo"
    server: subprocess.Popen[bytes] | None = None
    if via == "unix":
        sock = tmp_path / "bunker.sock"
        server = subprocess.Popen(
            [BUNKER, "serve", "--socket", str(sock), "--repo", str(where)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        url, extra = f"unix://{sock}", {}
    else:
        sshd = request.getfixturevalue("sshd")
        url, extra = f"ssh://root@127.0.0.1:{sshd.port}{where}", {**sshd.env(), "BUNKER_REMOTE_PATH": BUNKER}
    try:
        repo = dataclasses.replace(init_repo(tmp_path / "home", url=url, env_extra=extra), path=where)
        src = tmp_path / "src"
        make_tree(src)
        _full_disk_run(repo, where, small_fs, src, tmp_path, "Free space on the server's disk", where)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)


def test_full_webdav_server(small_fs: Path, tmp_path: Path) -> None:
    """A WebDAV server's disk fills (wsgidav answers 500 with "No space left on device"): the run
    stops with "the WebDAV storage is full", and the refused upload's remains are removed."""
    (small_fs / "dav-root").mkdir()
    workdir = tmp_path / "dav"  # wsgidav's log and settings stay off the full disk
    (workdir / "dav-root").mkdir(parents=True)
    # wsgidav refuses paths that leave its root through a symlink: the small disk is bind-mounted
    subprocess.run(["mount", "--bind", str(small_fs / "dav-root"), str(workdir / "dav-root")], check=True)
    try:
        server = start_wsgidav(workdir)
        try:
            repo = init_repo(tmp_path / "home", url=server.url("p"), env_extra=server.env())
            repo = dataclasses.replace(repo, path=small_fs / "dav-root" / "p")
            src = tmp_path / "src"
            make_tree(src)
            _full_disk_run(repo, repo.path, small_fs, src, tmp_path, "Free space on the WebDAV server", server.endpoint)
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", "-l", str(workdir / "dav-root")], capture_output=True, check=False)


# ------------------------------------------------------- object stores that answer "full" (a stub)


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every PUT with the server's ``status`` and ``body``; everything else 404."""

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server: Any = self.server
        server.puts += 1
        self._reply(server.status, server.body)

    def do_GET(self) -> None:  # noqa: N802
        self._reply(404, b"")

    do_HEAD = do_GET

    def log_message(self, *args: Any) -> None:
        pass


def _s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        "<Key>k</Key><BucketName>b</BucketName><Resource>/b/k</Resource><RequestId>1</RequestId></Error>"
    ).encode()


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        # MinIO: drives below the free-space threshold; a bucket quota
        (507, "XMinioStorageFull", "Storage backend has reached its minimum free drive threshold."),
        (400, "XMinioAdminBucketQuotaExceeded", "Bucket quota exceeded"),
        (403, "QuotaExceeded", ""),  # Ceph RGW: a user or bucket quota
    ],
)
def test_object_store_full_answers_are_repository_full(status: int, code: str, message: str) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    srv.status, srv.body, srv.puts = status, _s3_error(code, message), 0  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = {
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "BUNKER_STORAGE_RETRIES": "2",
            "BUNKER_STORAGE_RETRY_DELAY": "0.05",
        }
        b = open_s3(
            f"s3://bucket/p?endpoint=http://127.0.0.1:{srv.server_port}&region=us-east-1&path_style=true", env=env
        )
        with pytest.raises(RepositoryFull) as caught:
            b.put("packs/" + "a" * 64, b"data")
        err = caught.value
        _assert_clear_full_message(
            "", {"exit_code": err.exit_code, "error": err.message, "hint": err.hint}, "127.0.0.1", "Free space"
        )
        assert srv.puts == 1, "an answer that the storage is full is not retried"  # type: ignore[attr-defined]
        assert code in err.message and "S3 storage is full or its quota is used up" in err.message
        assert "Free space on the S3 server, or have its quota raised" in err.hint
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------- the rerun after a full disk uses what was stored (issue 11 point 9)


def test_rerun_after_a_full_disk_uses_the_packs_it_stored(small_fs: Path, tmp_path: Path) -> None:
    """The disk fills after the first 16 MiB pack of a 28 MiB file was stored: the message says
    what was stored (kept) and how much room the next run needs; freeing just that much (plus a
    little) is enough, because the rerun indexes the stopped run's pack (signed by this client,
    named by no index) before it deduplicates, instead of storing the same data again."""
    where = small_fs / "repo"
    repo = dataclasses.replace(init_repo(tmp_path / "home", url=str(where)), path=where)
    src = tmp_path / "src"
    make_tree(src)
    first = repo.backup(src, args=("--no-progress",))
    (src / "big.bin").write_bytes(os.urandom(28 << 20))
    filler = _fill(small_fs, leave=20 << 20)  # room for the first pack, not for the second

    # one pack at a time: with two in flight the disk may fill under the first one as well
    cp = repo.run("backup", src, "--json", "--no-progress", env={**repo.env, "BUNKER_UPLOADS_IN_FLIGHT": "1"})
    assert cp.returncode == ExitCode.FATAL, cp.stderr
    doc = js(cp)
    _assert_clear_full_message(cp.stderr, doc, where)
    m = re.search(r"this run stored ([0-9.]+) MB in (\d+) pack\(s\): kept", doc["error"])
    assert m and float(m.group(1)) > 16 and int(m.group(2)) >= 1, doc["error"]
    need = re.search(r"the next run needs room for (?:at most )?about ([0-9.]+) MB", doc["hint"])
    assert need, doc["hint"]
    needed = float(need.group(1)) * 1e6
    # about the second half of big.bin (12 MiB, less what the stopped run had not read yet), not all of it
    assert 8e6 < needed < 16e6, doc["hint"]
    assert [p.name for p in (where / "snapshots").iterdir()] == [first["snapshot"]]

    # free what the message asks for, and a little for metadata and the filesystem's own blocks
    free = shutil.disk_usage(small_fs).free
    with open(filler, "r+b") as f:
        f.truncate(max(0, os.fstat(f.fileno()).st_size - int(needed + (2 << 20) - free)))
    again = repo.backup(src, args=("--no-progress",))
    assert again["level"] in ("ok", "note") and again["spooled"] is False
    reindexed = [e for e in again["events"] if e["code"] == "packs-reindexed"]
    assert len(reindexed) == 1 and "not stored again" in reindexed[0]["message"], again["events"]
    assert again["stats"]["stored_new"] < needed + (2 << 20)  # and what the stopped run had not read yet
    js(repo.ok("restore", again["snapshot"], "--target", tmp_path / "t", "--json"))
    assert snapshot_tree(restored_path(tmp_path / "t", src), dir_mtimes=False) == snapshot_tree(src, dir_mtimes=False)
    shutil.rmtree(tmp_path / "t")
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    _assert_no_partial_objects(where)
    # the mark is gone: the next run reads no pack footers for it
    third = repo.backup(src, args=("--no-progress",))
    assert not [e for e in third["events"] if e["code"] == "packs-reindexed"]
