"""A repository that refuses writes is not an unreachable one (issue 11, point 2).

A disk the kernel remounted read-only (ext4 ``errors=remount-ro``), a directory whose permissions
refuse this user, a `bunker serve` whose disk is read-only, an sftp server that answers
"Failure", an object store that answers 403: the backup is still kept (in the local spool), but
the run ends at level err (exit 3) at once, naming the refusal and the next step, instead of
passing as `note` for days. `check` on this machine takes its own spooled snapshots as pending (a
note), not as a rollback; once the repository takes writes again, `bunker forward` delivers them
and everything checks clean and restores.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bunker.errors import ExitCode
from bunker.storage.refused import StorageRefused
from bunker.storage.services import open_s3
from conftest import Unprivileged
from helpers import (
    Repo,
    describe,
    init_repo,
    js,
    make_env,
    make_tree,
    restored_path,
    run_bunker,
    serve_socket,
    snapshot_tree,
)


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    """A directory bind-mounted onto itself elsewhere: remountable read-only and back (root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to bind-mount and remount a directory read-only")
    disk, mnt = tmp_path / "disk", tmp_path / "mnt"
    disk.mkdir()
    mnt.mkdir()
    cp = subprocess.run(["mount", "--bind", str(disk), str(mnt)], capture_output=True, check=False)
    if cp.returncode != 0:
        pytest.skip(f"bind-mounting failed: {cp.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _remount(mnt: Path, mode: str) -> None:
    """What ext4's errors=remount-ro does to a failing disk (``ro``), and the repair (``rw``)."""
    subprocess.run(["mount", "-o", f"remount,bind,{mode}", str(mnt)], check=True)


def _refused_backup(repo: Repo, src: Path, *needles: str, **kw: Any) -> dict[str, Any]:
    """A backup into a refusing repository: exit 3 at once, spooled, an err naming the refusal
    and the next step."""
    t0 = time.monotonic()
    cp = repo.run("backup", src, "--json", "--no-progress", **kw)
    assert cp.returncode == ExitCode.ERR, describe(cp)
    assert time.monotonic() - t0 < 60  # no minutes of retries
    doc = js(cp)
    assert doc["level"] == "err" and doc["spooled"] is True
    errs = [e for e in doc["events"] if e["level"] == "err"]
    assert [e["code"] for e in errs] == ["repository-refused"], doc["events"]
    text = errs[0]["message"]
    assert "refuses writes" in text and "stored locally" in text and "then run `bunker forward`" in text
    assert "cannot be reached" not in text
    for n in needles:
        assert n in text, text
    assert "Traceback" not in cp.stderr
    return doc


def _pending_check(repo: Repo, **kw: Any) -> None:
    """`check` on this machine: the spooled snapshots are pending (a note), not a rollback."""
    cp = repo.run("check", "--json", **kw)
    assert cp.returncode == 0, describe(cp)
    doc = js(cp)
    assert doc["ok"] is True
    notes = [p for p in doc["problems"] if p["severity"] == "note"]
    assert len(notes) == 1 and "wait in this machine's local spool" in notes[0]["problem"], doc["problems"]
    assert not [p for p in doc["problems"] if p["severity"] == "err"]


def _delivered(repo: Repo, src: Path, tmp_path: Path, **kw: Any) -> None:
    """The repository takes writes again: forward delivers, check is clean, latest restores."""
    repo.ok("forward", **kw)
    doc = js(repo.ok("check", "--json", **kw))
    assert doc["ok"] is True and not [p for p in doc["problems"] if p["severity"] in ("err", "note")], doc
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json", **kw))
    assert snapshot_tree(restored_path(target, src), dir_mtimes=False) == snapshot_tree(src, dir_mtimes=False)
    shutil.rmtree(target)


def test_read_only_repository_is_refused_at_once(mount_point: Path, tmp_path: Path) -> None:
    where = mount_point / "repo"
    repo = dataclasses.replace(init_repo(tmp_path / "home", url=str(where)), path=where)
    src = tmp_path / "src"
    make_tree(src)
    first = repo.backup(src, args=("--no-progress",))

    _remount(mount_point, "ro")
    try:
        (src / "new.txt").write_bytes(b"written while the disk was read-only\n")
        _refused_backup(repo, src, "Read-only file system", "mounted read-only", "remount")
        (src / "later.txt").write_bytes(b"and another run\n")
        _refused_backup(repo, src, "Read-only file system")  # the next run forwards nothing, refused again
        assert [p.name for p in repo.objects("snapshots")] == [first["snapshot"]]
        _pending_check(repo)
    finally:
        _remount(mount_point, "rw")
    _delivered(repo, src, tmp_path)


def test_directory_this_user_may_not_write_is_refused(unprivileged: Unprivileged) -> None:
    base = unprivileged.base
    src, where = base / "src", base / "repo"
    make_tree(src, seed=3)
    env = make_env(base / "env")
    unprivileged.own(base)
    pre = unprivileged.prefix
    cp = run_bunker("init", "--repo", where, "--client", "c", "--json", env=env, prefix=pre)
    assert cp.returncode == 0, describe(cp)
    repo = Repo(where, env, "", Path(), Path(), base)
    cp = repo.run("backup", src, "--json", "--no-progress", prefix=pre)
    assert cp.returncode == 0, describe(cp)

    modes = {p: p.stat().st_mode for p in [where, *where.iterdir()] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)  # readable, not writable: what a wrong chown or chmod leaves
    try:
        (src / "new.txt").write_bytes(b"written while the repository refused\n")
        _refused_backup(repo, src, "Permission denied", "may not write", "writable by this user", prefix=pre)
        _pending_check(repo, prefix=pre)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    _delivered(repo, src, base, prefix=pre)


def test_bunker_serve_on_a_read_only_disk_answers_refused(mount_point: Path, tmp_path: Path) -> None:
    """The server's disk is read-only: FAILED with the kind "refused" (FORMAT.md section 22)."""
    where, sock = mount_point / "repo", tmp_path / "bunker.sock"
    with serve_socket(sock, where):
        repo = dataclasses.replace(init_repo(tmp_path / "home", url=f"unix://{sock}"), path=where)
        src = tmp_path / "src"
        make_tree(src, seed=4)
        repo.backup(src, args=("--no-progress",))
        _remount(mount_point, "ro")
        try:
            (src / "new.txt").write_bytes(b"new\n")
            _refused_backup(repo, src, "the server's repository refuses writes", "Read-only file system")
            _pending_check(repo)
        finally:
            _remount(mount_point, "rw")
        _delivered(repo, src, tmp_path)


def test_sftp_server_on_a_read_only_disk_is_refused(mount_point: Path, tmp_path: Path, sshd: Any) -> None:
    """OpenSSH's sftp-server answers a read-only disk with "Failure": it answered, so refused."""
    where = mount_point / "repo"
    repo = dataclasses.replace(init_repo(tmp_path / "home", url=sshd.url(str(where)), env_extra=sshd.env()), path=where)
    src = tmp_path / "src"
    make_tree(src, seed=5)
    repo.backup(src, args=("--no-progress",))
    _remount(mount_point, "ro")
    try:
        (src / "new.txt").write_bytes(b"new\n")
        _refused_backup(repo, src, "the server refused to store it", "not mounted read-only")
        _pending_check(repo)
    finally:
        _remount(mount_point, "rw")
    _delivered(repo, src, tmp_path)


class _Denied(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that lets nothing be written: 403 AccessDenied to every PUT."""

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
            b"</Message><RequestId>1</RequestId></Error>"
        )
        self.server.puts += 1  # type: ignore[attr-defined]
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_object_store_access_denied_is_refused() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Denied)
    srv.puts = 0  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "BUNKER_STORAGE_RETRIES": "2"}
        b = open_s3(
            f"s3://bucket/p?endpoint=http://127.0.0.1:{srv.server_port}&region=us-east-1&path_style=true", env=env
        )
        with pytest.raises(StorageRefused) as caught:
            b.put("packs/" + "a" * 64, b"data")
        assert "access denied" in caught.value.message and "AccessDenied" in caught.value.message
        assert "may read, write, list and delete" in caught.value.hint
        assert srv.puts == 1  # type: ignore[attr-defined]  # a refusal is not retried
    finally:
        srv.shutdown()
        srv.server_close()
