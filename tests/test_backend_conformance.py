"""One conformance suite for every storage backend: the local directory, S3 through OpenDAL
(a real moto server process, and a real S3 implementation: Ceph's RADOS Gateway), S3 without
conditional PUT (the stat-then-put fallback), and sftp (a real OpenSSH sshd; the repository is a
directory of this machine reached through it)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opendal.layers import CapabilityOverrideLayer

from bunker.errors import ObjectMissing
from bunker.storage.backend import Backend, InvalidName
from bunker.storage.object_store import ObjectStoreBackend
from bunker.storage.url import open_backend
from helpers import BUNKER, S3Server

H = "0123456789abcdef" * 4
A, B, C = "packs/" + "a" * 64, "packs/" + "b" * 64, "packs/" + "c" * 64
KINDS = ["local", "s3", "rgw", "s3-stat-then-put", "sftp", "webdav", "azure", "ssh", "unix"]


class Target:
    """A backend under test, and how to see what it sent (S3: the moto or RGW server's request log)."""

    def __init__(self, kind: str, backend: Backend, server: S3Server | None = None, prefix: str = "") -> None:
        self.kind, self.backend, self.server, self.prefix = kind, backend, server, prefix

    def requests(self) -> list[str]:
        """The requests for this test's prefix, once the server logged a marker request (a stat
        of a fresh name): the log is written after each response."""
        assert self.server is not None
        marker = "snapshots/" + os.urandom(32).hex()
        self.backend.stat(marker)
        deadline = time.monotonic() + 10
        while True:
            lines = [r for r in self.server.requests() if f"/{self.server.bucket}/{self.prefix}/" in r]
            if any(marker in r for r in lines) or time.monotonic() > deadline:
                return [r for r in lines if marker not in r]
            time.sleep(0.02)


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    kind = request.param
    if kind == "local":
        b: Backend = open_backend(str(tmp_path / "repo"), create=True)
        yield Target(kind, b)
        b.close()
        return
    if kind == "webdav":
        # a wsgidav server process: no conditional write, so create-if-absent is stat-then-put
        dav = request.getfixturevalue("webdav_server")
        request.getfixturevalue("webdav_env")
        b = open_backend(dav.url(request.getfixturevalue("s3_prefix")), create=True)
        yield Target(kind, b)
        b.close()
        return
    if kind == "azure":
        # an Azurite process (npm); its access log has the same form as moto's
        az = request.getfixturevalue("azurite")
        request.getfixturevalue("azure_env")
        prefix = request.getfixturevalue("s3_prefix")
        b = open_backend(az.url(prefix), create=True)
        yield Target(kind, b, az, prefix)
        b.close()
        return
    if kind == "ssh":
        # `bunker serve --stdio` started through a real OpenSSH sshd, this Python's bunker
        sshd = request.getfixturevalue("sshd")
        request.getfixturevalue("sftp_env")
        assert BUNKER
        request.getfixturevalue("monkeypatch").setenv("BUNKER_REMOTE_PATH", BUNKER)
        b = open_backend(f"ssh://root@127.0.0.1:{sshd.port}{tmp_path / 'repo'}", create=True)
        yield Target(kind, b)
        b.close()
        return
    if kind == "unix":
        # the serve protocol's server on a unix socket, in this process
        from bunker.node.serve import ServeConfig
        from bunker.node.serve_frontends import SocketServer

        server = SocketServer(str(tmp_path / "serve.sock"), ServeConfig(str(tmp_path / "repo"))).start()
        b = open_backend(f"unix://{tmp_path / 'serve.sock'}", create=True)
        yield Target(kind, b)
        b.close()
        server.close()
        return
    if kind == "sftp":
        sshd = request.getfixturevalue("sshd")
        request.getfixturevalue("sftp_env")
        b = open_backend(sshd.url(tmp_path / "repo"), create=True)
        yield Target(kind, b)
        b.close()
        return
    # "s3" and "s3-stat-then-put": moto; "rgw": Ceph's RADOS Gateway (skipped where absent)
    server: S3Server = request.getfixturevalue("rgw_server" if kind == "rgw" else "s3_server")
    request.getfixturevalue("rgw_env" if kind == "rgw" else "s3_env")
    prefix = request.getfixturevalue("s3_prefix")
    b = open_backend(server.url(prefix), create=True)
    assert isinstance(b, ObjectStoreBackend)
    if kind == "s3-stat-then-put":
        # the same service as a store without conditional writes (B2, WebDAV...) appears to bunker
        op = b._op.layer(CapabilityOverrideLayer("write_with_if_not_exists=false"))
        b = ObjectStoreBackend(op, b.url, b.endpoint)
    yield Target(kind, b, server, prefix)
    b.close()


def test_put_get_and_ranges(target: Target) -> None:
    b = target.backend
    assert b.put(A, b"0123456789") is True
    assert b.get(A) == b"0123456789"
    assert b.get(A, 0, 10) == b"0123456789"
    assert b.get(A, 2, 3) == b"234"
    assert b.get(A, 7) == b"789"
    assert b.get(A, 8, 100) == b"89"  # a range past the end is cut at the end
    assert b.get(A, 10) == b""
    assert b.get(A, 50, 5) == b""
    assert b.get(A, 3, 0) == b""
    # negative offset: from the end (the pack reader reads a pack's last bytes this way)
    assert b.get(A, -4) == b"6789"
    assert b.get(A, -4, 2) == b"67"
    assert b.get(A, -10) == b"0123456789"
    assert b.get(A, -100) == b"0123456789"  # longer than the object: all of it
    # any buffer is accepted
    assert b.put(B, memoryview(b"xxmemoryview")[2:]) is True
    assert b.get(B) == b"memoryview"


def test_empty_object(target: Target) -> None:
    b = target.backend
    assert b.put(A, b"") is True
    assert b.get(A) == b""
    assert b.get(A, 0, 5) == b""
    assert b.get(A, -5) == b""
    info = b.stat(A)
    assert info is not None and info.size == 0
    assert [(i.name, i.size) for i in b.list("packs/")] == [(A, 0)]


def test_overwrite_replaces_the_object(target: Target) -> None:
    b = target.backend
    b.put("RECOVERY.md", b"first version, longer")
    assert b.put("RECOVERY.md", b"second") is True
    assert b.get("RECOVERY.md") == b"second"
    info = b.stat("RECOVERY.md")
    assert info is not None and info.size == 6


def test_create_if_absent(target: Target) -> None:
    b = target.backend
    assert b.capabilities().create_if_absent is (target.kind not in ("s3-stat-then-put", "webdav"))
    assert b.put(A, b"original", if_absent=True) is True
    assert b.put(A, b"intruder", if_absent=True) is False
    assert b.get(A) == b"original"
    assert b.put(A, b"replaced") is True  # a plain put still overwrites
    assert b.get(A) == b"replaced"
    if target.server is not None:
        puts = [r for r in target.requests() if r.startswith("PUT ") and A in r]
        if target.kind in ("s3", "rgw", "azure"):
            # one conditional PUT each, the refused one answered 412 (Azure: 409 BlobAlreadyExists)
            assert len(puts) == 3 and (" 412 " in puts[1] + " " or " 409 " in puts[1] + " "), puts
        else:
            assert len(puts) == 2, puts  # the refused put never sent its bytes


def test_list_sizes_and_server_times(target: Target) -> None:
    b = target.backend
    assert list(b.list("packs/")) == []
    rng = random.Random(3)
    sizes = {f"packs/{i:064x}": rng.randrange(0, 5000) for i in range(7)}
    before = time.time()
    for name, size in sizes.items():
        b.put(name, rng.randbytes(size))
    b.put("index/" + H, b"index object")
    b.put("RECOVERY.md", b"doc")
    listed = {i.name: i for i in b.list("packs/")}
    assert {n: i.size for n, i in listed.items()} == sizes
    for i in listed.values():
        # the storage's own clock (S3: Last-Modified, whole seconds); same machine here
        assert before - 5 <= i.mtime <= time.time() + 5, (i, before)
    assert [(i.name, i.size) for i in b.list("index/")] == [("index/" + H, 12)]
    assert list(b.list("snapshots/")) == []
    stat = b.stat("packs/" + f"{3:064x}")
    assert stat is not None and stat.size == sizes["packs/" + f"{3:064x}"]
    assert abs(stat.mtime - listed[stat.name].mtime) < 2


def test_delete_and_stat(target: Target) -> None:
    b = target.backend
    assert b.stat(A) is None and not b.exists(A)
    b.put(A, b"data")
    b.put(B, b"other")
    assert b.exists(A)
    b.delete(A)
    b.delete(A)  # deleting a missing object is fine
    b.delete(C)
    assert b.stat(A) is None
    assert [i.name for i in b.list("packs/")] == [B]
    assert b.get(B) == b"other"


def test_missing_object_raises_object_missing(target: Target) -> None:
    b = target.backend
    for args in ((), (0, 10), (5,), (5, 3), (-4,), (-4, 2), (0, 0)):
        with pytest.raises(ObjectMissing) as exc:
            b.get(A, *args)
        assert exc.value.object_name == A and exc.value.exit_code == 14


def test_bad_names_are_refused_before_any_request(target: Target, tmp_path: Path) -> None:
    b = target.backend
    bad = ["../escaped", "packs/../../escaped", "/etc/passwd", "packs/.hidden", "packs/a/b", "Packs/" + H, ""]
    # names that break their prefix's rule (docs/format.md section 5): never stored, read or deleted
    bad += ["packs/junk", "snapshots/evil", "sessions/notasession", "foo/bar", "packs/" + H + "\n", "status/x"]
    for name in bad:
        for call in (
            lambda n: b.put(n, b"data"),
            lambda n: b.put(n, b"data", if_absent=True),
            lambda n: b.get(n),
            lambda n: b.get(n, -5),
            lambda n: b.delete(n),
            lambda n: b.stat(n),
            lambda n: b.exists(n),
        ):
            with pytest.raises(InvalidName):
                call(name)
    for prefix in ("../", "", "packs", "nope/", "packs/../"):
        with pytest.raises(InvalidName):
            list(b.list(prefix))
    if target.server is not None:
        assert target.requests() == []
    else:
        assert not (tmp_path / "escaped").exists()
        assert sorted(p.name for p in (tmp_path / "repo").rglob("*") if p.is_file()) == []


def test_large_object_round_trip(target: Target) -> None:
    b = target.backend
    data = random.Random(20).randbytes(20 << 20)
    assert b.put(A, data) is True
    assert b.get(A) == data
    assert b.get(A, 7 << 20, 1 << 20) == data[7 << 20 : 8 << 20]
    assert b.get(A, -70000) == data[-70000:]
    info = b.stat(A)
    assert info is not None and info.size == len(data)
    if target.server is not None:
        # one single PUT: no multipart upload (whose parts would stay behind if it were killed)
        reqs = target.requests()
        assert [r.split(" ", 1)[0] for r in reqs if A in r and not r.startswith(("GET", "HEAD"))] == ["PUT"], reqs
        assert not [r for r in reqs if "uploads" in r or "partNumber" in r or "comp=block" in r], reqs


def test_concurrent_use_from_threads(target: Target) -> None:
    """Backup and check share one backend between threads."""
    b = target.backend
    names = [f"index/{i:064x}" for i in range(64)]

    def one(name: str) -> bytes:
        b.put(name, name.encode() * 3)
        return b.get(name, -len(name))

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, names)) == [n.encode() for n in names]
    assert sorted(i.name for i in b.list("index/")) == names
