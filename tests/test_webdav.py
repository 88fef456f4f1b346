"""WebDAV repositories through OpenDAL against a real wsgidav server process (basic auth, a
filesystem provider): staged writes, server times, credentials, errors, and the CLI end to end."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.storage.full import RepositoryFull
from bunker.storage.object_store import STALE_TMP_AGE, TMP_MARK, ObjectStoreBackend
from bunker.storage.services import open_webdav
from bunker.storage.url import open_backend
from helpers import (
    WEBDAV_USER,
    WebDavServer,
    compare_trees,
    describe,
    free_port,
    init_repo,
    js,
    make_tree,
    restored_path,
    run_bunker,
)

H = "0123456789abcdef" * 4
A = "packs/" + "a" * 64


def _open(server: WebDavServer, prefix: str, **env: str) -> ObjectStoreBackend:
    return open_webdav(server.url(prefix), env={**server.env(), **env})


def test_url_forms_and_canonical_url() -> None:
    env = {"BUNKER_WEBDAV_PASSWORD": "pw"}
    b = open_webdav("webdav+https://alice@dav.example.net:8443/remote.php/dav/files/alice/bunker/", env=env)
    assert b.url == "webdav+https://alice@dav.example.net:8443/remote.php/dav/files/alice/bunker"
    assert b.endpoint == "https://dav.example.net:8443/remote.php/dav/files/alice/bunker/"
    assert open_webdav(b.url, env=env).url == b.url  # worker processes reopen the canonical URL
    # the user from the environment; anonymous without any; a bearer token
    b = open_webdav("webdav+http://nas.local/backups", env={"BUNKER_WEBDAV_USER": "bob", **env})
    assert b.url == "webdav+http://nas.local/backups" and b.endpoint == "http://nas.local/backups/"
    assert open_webdav("webdav+http://nas.local/", env={}).endpoint == "http://nas.local/"
    assert open_webdav("webdav+https://h/p", env={"BUNKER_WEBDAV_TOKEN": "t"}).url == "webdav+https://h/p"
    caps = b.capabilities()
    assert caps.remote and caps.server_side_time and not caps.create_if_absent  # WebDAV has no conditional PUT


@pytest.mark.parametrize(
    ("url", "needs"),
    [
        ("webdav+https://alice:secret@host/p", "BUNKER_WEBDAV_PASSWORD"),  # a password in the URL
        ("webdav+https://alice@host/p", "BUNKER_WEBDAV_PASSWORD"),  # a user without a password
        ("webdav+https://host/p?x=1", "webdav+https://USER@HOST:PORT/PATH"),
        ("webdav+https://host:99999/p", "webdav+https://USER@HOST:PORT/PATH"),
        ("webdav+https:///p", "webdav+https://USER@HOST:PORT/PATH"),
        ("webdav+https://host/a/../b", "plain names"),
        ("webdav://host/p", "webdav+https://"),  # which transport is meant must be said
    ],
)
def test_bad_urls_and_missing_password_are_usage_errors(url: str, needs: str) -> None:
    with pytest.raises(BunkerError) as exc:
        open_backend(url) if url.startswith("webdav://") else open_webdav(url, env={})
    assert exc.value.exit_code == ExitCode.USAGE, exc.value
    assert needs in exc.value.hint or needs in exc.value.message, exc.value


def test_writes_are_staged_put_then_move(webdav_server: WebDavServer, s3_prefix: str) -> None:
    """wsgidav (like many servers) writes a PUT straight into the target file: a reader could see
    half an object. Each object goes to a hidden name first, then one MOVE puts it in place."""
    b = _open(webdav_server, s3_prefix)
    data = os.urandom(20 << 20)
    assert b.put(A, data) is True
    assert b.get(A) == data
    reqs = [r for r in webdav_server.requests() if f"/{s3_prefix}/" in r]
    puts = [r for r in reqs if r.startswith("PUT ")]
    assert len(puts) == 1 and f"/packs/{TMP_MARK}" in puts[0] and puts[0].endswith(" 201"), reqs
    tmp = puts[0].split()[1]
    assert [r for r in reqs if r.startswith("MOVE ")] == [f"MOVE {tmp}->/dav/{s3_prefix}/{A} 201"], reqs
    on_disk = webdav_server.root / s3_prefix / "packs"
    assert sorted(p.name for p in on_disk.iterdir()) == ["a" * 64]
    # create-if-absent: a stat, and nothing sent when the object is there
    assert b.put(A, b"other", if_absent=True) is False
    assert len([r for r in webdav_server.requests() if f"/{s3_prefix}/" in r and r.startswith("PUT ")]) == 1


def test_stale_temporary_objects_are_swept_by_a_listing(webdav_server: WebDavServer, s3_prefix: str) -> None:
    b = _open(webdav_server, s3_prefix)
    b.put(A, b"data")
    packs = webdav_server.root / s3_prefix / "packs"
    stale, fresh = packs / f"{TMP_MARK}0001", packs / f"{TMP_MARK}0002"
    stale.write_bytes(b"left by a killed upload")
    fresh.write_bytes(b"an upload in progress")
    old = time.time() - STALE_TMP_AGE - 3600
    os.utime(stale, (old, old))
    assert [i.name for i in b.list("packs/")] == [A]
    assert not stale.exists() and fresh.exists()


def test_times_are_the_servers(webdav_server: WebDavServer, s3_prefix: str) -> None:
    """An object's time is the server's getlastmodified, not the client's clock."""
    b = _open(webdav_server, s3_prefix)
    b.put(A, b"data")
    then = 1_000_000_000  # 2001-09-09
    os.utime(webdav_server.root / s3_prefix / A, (then, then))
    info = b.stat(A)
    assert info is not None and info.mtime == then
    assert [i.mtime for i in b.list("packs/")] == [then]


def test_wrong_password_is_access_denied(webdav_server: WebDavServer, s3_prefix: str) -> None:
    b = _open(webdav_server, s3_prefix, BUNKER_WEBDAV_PASSWORD="wrong")
    with pytest.raises(StorageError) as exc:
        b.put(A, b"data")
    assert exc.value.exit_code == ExitCode.FATAL
    assert "access denied" in exc.value.message and "BUNKER_WEBDAV_PASSWORD" in exc.value.hint, exc.value


def test_unreachable_server_is_a_storage_error_after_retries() -> None:
    url = f"webdav+http://{WEBDAV_USER}@127.0.0.1:{free_port()}/dav/x"
    env = {"BUNKER_WEBDAV_PASSWORD": "pw", "BUNKER_STORAGE_RETRIES": "2", "BUNKER_STORAGE_RETRY_DELAY": "0.05"}
    b = open_webdav(url, env=env)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as exc:
        b.stat(A)
    assert exc.value.exit_code == ExitCode.NO_REPOSITORY
    # nothing listens: retried briefly, then unreachable (issue 11 point 18; test_no_answer.py)
    assert "nothing answers there" in exc.value.message and "127.0.0.1" in exc.value.message
    assert time.monotonic() - t0 >= 0.1  # two retries were made


class _FullDav(http.server.BaseHTTPRequestHandler):
    """A WebDAV server whose storage is full (Apache mod_dav, Nextcloud): 507 Insufficient Storage
    (RFC 4918) to the method ``server.full``; collections are made, and every request is logged in
    ``server.seen``."""

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv: Any = self.server
        srv.seen.append(f"{self.command} {self.path}")
        if self.command == srv.full:
            status = 507
            body = b'<?xml version="1.0"?><d:error xmlns:d="DAV:"><s:message>Insufficient space</s:message></d:error>'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PROPFIND(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(404)

    def do_MKCOL(self) -> None:  # noqa: N802
        self._answer(201)

    def do_PUT(self) -> None:  # noqa: N802
        self._answer(201)

    def do_DELETE(self) -> None:  # noqa: N802
        self._answer(204)

    def log_message(self, *args: Any) -> None:
        pass


def test_507_insufficient_storage_is_repository_full() -> None:
    """A full WebDAV server is not an unreachable one: RepositoryFull (exit 4, a backup does not
    spool) with the next step, at once (no retries), and the temporary upload is removed."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FullDav)
    srv.full, srv.seen = "PUT", []  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = {"BUNKER_WEBDAV_PASSWORD": "pw", "BUNKER_STORAGE_RETRIES": "2", "BUNKER_STORAGE_RETRY_DELAY": "0.05"}
        b = open_webdav(f"webdav+http://{WEBDAV_USER}@127.0.0.1:{srv.server_port}/dav/p", env=env)
        with pytest.raises(RepositoryFull) as exc:
            b.put(A, b"data")
        err = exc.value
        assert err.exit_code == ExitCode.FATAL and not isinstance(err, StorageError)
        assert f"could not write {A} at http://127.0.0.1:{srv.server_port}/dav/p/" in err.message
        assert "the WebDAV storage is full or its quota is used up (HTTP 507 Insufficient Storage)" in err.message
        assert "nothing stored before is damaged" in err.hint and "no new snapshot" in err.hint
        assert "Free space on the WebDAV server, or have its quota raised" in err.hint
        assert "run the same command again" in err.hint
        seen: list[str] = srv.seen  # type: ignore[attr-defined]
        assert len([r for r in seen if r.startswith("PUT ")]) == 1, seen  # not retried
        tmp = next(r.split()[1] for r in seen if r.startswith("PUT "))
        assert f"/packs/{TMP_MARK}" in tmp and f"DELETE {tmp}" in seen, seen  # nothing left behind
    finally:
        srv.shutdown()
        srv.server_close()


def test_init_backup_restore_check_on_webdav(webdav_server: WebDavServer, s3_prefix: str, tmp_path: Path) -> None:
    url = webdav_server.url(s3_prefix)
    repo = init_repo(tmp_path / "r", url=url, env_extra=webdav_server.env())
    src = tmp_path / "src"
    files = make_tree(src)
    doc = repo.backup(src)
    assert doc["stats"]["files"] == len(files) and doc["stats"]["errors"] == 0
    assert doc["repository"] == url
    target = tmp_path / "target"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    keyless = js(repo.ok("check", "--keyless", "--expect", repo.id, "--json"))
    assert keyless["ok"] is True, keyless
    # no temporary object stays behind, and `init` refuses a prefix that holds a repository
    leftovers = [p for p in (webdav_server.root / s3_prefix).rglob("*") if p.name.startswith(TMP_MARK)]
    assert leftovers == []
    cp = run_bunker("init", "--repo", url, "--client", "again", env=repo.env)
    assert cp.returncode == ExitCode.BAD_REPOSITORY, describe(cp)
