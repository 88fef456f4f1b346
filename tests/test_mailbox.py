"""A link's mailbox (issue 12): a flat folder of pieces named by 64 lowercase hex digits, on a local
folder (a carried disk), an sftp server or an object store (storage/mailbox.py).

The same conformance tests run on a local folder, a real S3-compatible server (moto) and a real
sshd: round trips, the name rule enforced before any backend call, strays, and atomicity under a
kill -9. Then what only a local folder has: an untrusted medium (symlinks, folders, pipes and hard
links under a piece's name are never followed), bounded memory for big pieces, a missing, a
read-only and a full medium; and, as root, writes done as the folder's owner.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import opendal
import pytest

from bunker.errors import BunkerError, ExitCode, ObjectMissing, StorageError
from bunker.storage.backend import InvalidName
from bunker.storage.full import RepositoryFull
from bunker.storage.mailbox import (
    MailboxFull,
    NotAPiece,
    PieceMissing,
    is_temp_name,
    open_mailbox,
)
from bunker.storage.refused import StorageRefused
from helpers import S3_CREDENTIALS, S3_REGION, S3Server, WebDavServer, loop_ext4

SRC = str(Path(__file__).resolve().parent.parent / "src")
MiB = 1 << 20
BAD_NAMES = ("packs/x", "../x", "A" * 64, "a" * 63, "a" * 65, "", "." + "a" * 64, "a" * 63 + "/", "x" * 64)
NOBODY = 65534


def piece() -> str:
    return secrets.token_hex(32)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def write_random(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


@dataclass
class Place:
    """Where a mailbox lives, and how a test plants foreign things there behind its back."""

    kind: str
    url: str
    folder: Path | None = None  # the folder on this machine (local; sftp and WebDAV serve one here)
    server: S3Server | WebDavServer | None = None  # a server that logs its requests
    prefix: str = ""

    @property
    def temps_shown(self) -> bool:
        """Whether writers' temp files are files named like a dot and a piece (local, sftp)."""
        return self.kind in ("local", "sftp")

    def _op(self) -> opendal.Operator:
        assert isinstance(self.server, S3Server)
        return opendal.Operator(
            "s3",
            bucket=self.server.bucket,
            root=f"/{self.prefix}/",
            endpoint=self.server.endpoint,
            region=S3_REGION,
            access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def plant(self, name: str, data: bytes = b"foreign\n") -> None:
        """A file (an object) named ``name`` (``a/b``: in a subfolder), not through the mailbox."""
        if self.folder is not None:
            path = self.folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self._op().write(name, data)

    def names(self) -> set[str]:
        """Every name at the top of the place, temp files included."""
        if self.folder is not None:
            return set(os.listdir(self.folder))
        return {e.path.rstrip("/") for e in self._op().list("/")} - {""}

    def requests(self) -> int:
        return len(self.server.requests()) if self.server is not None else 0


@pytest.fixture(params=["local", "s3", "sftp", "webdav"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    if request.param == "local":
        folder = tmp_path / "usb" / "link"
        folder.mkdir(parents=True)
        yield Place("local", str(folder), folder)
    elif request.param == "s3":
        request.getfixturevalue("s3_env")
        s3: S3Server = request.getfixturevalue("s3_server")
        prefix: str = request.getfixturevalue("s3_prefix")
        yield Place("s3", s3.url(prefix), server=s3, prefix=prefix)
    elif request.param == "sftp":
        request.getfixturevalue("sftp_env")
        folder = tmp_path / "server" / "link"
        folder.mkdir(parents=True)
        yield Place("sftp", request.getfixturevalue("sshd").url(folder), folder)
    else:
        request.getfixturevalue("webdav_env")
        dav: WebDavServer = request.getfixturevalue("webdav_server")
        prefix = "t-" + secrets.token_hex(6)
        (dav.root / prefix).mkdir()
        yield Place("webdav", dav.url(prefix), dav.root / prefix, server=dav, prefix=prefix)
        shutil.rmtree(dav.root / prefix, ignore_errors=True)


# ------------------------------------------------------------------------------------ conformance


def test_round_trip_of_empty_small_and_large_pieces(place: Place, tmp_path: Path) -> None:
    sizes = {piece(): 0, piece(): 1234, piece(): 20 * MiB}
    files = {n: write_random(tmp_path / f"src-{size}", size) for n, size in sizes.items()}
    with open_mailbox(place.url) as mb:
        assert mb.list() == [] and mb.strays().count == 0
        for n, f in files.items():
            mb.put_file(n, f)
        if isinstance(place.server, S3Server):  # one PUT per piece, never a multipart upload
            assert not [r for r in place.server.requests() if "uploads" in r or "uploadId" in r]
            puts = [r for r in place.server.requests() if r.startswith(f"PUT /{place.server.bucket}/{place.prefix}/")]
            assert len(puts) == 3, puts
        listed = mb.list()
        assert [i.name for i in listed] == sorted(sizes)
        assert {i.name: i.size for i in listed} == sizes
        assert all(i.mtime > 0 for i in listed)
        for n, size in sizes.items():
            info = mb.stat(n)
            assert info is not None and info.name == n and info.size == size
            out = tmp_path / "out" / n
            out.parent.mkdir(exist_ok=True)
            assert mb.fetch(n, out) == size
            assert digest(out) == digest(files[n])
            assert stat.S_IMODE(out.stat().st_mode) == 0o600
            out.unlink()
        assert os.listdir(tmp_path / "out") == []  # no temp file left beside a fetched piece
        if place.temps_shown and place.folder is not None:
            assert {stat.S_IMODE(p.stat().st_mode) for p in place.folder.iterdir()} == {0o600}

        # a piece sent again replaces the one there
        first = next(iter(sizes))
        again = write_random(tmp_path / "again", 4321)
        mb.put_file(first, again)
        assert mb.fetch(first, tmp_path / "again-out") == 4321
        assert digest(tmp_path / "again-out") == digest(again)

        for n in sizes:
            mb.delete(n)
        assert mb.list() == [] and mb.strays().count == 0
        assert place.names() == set()  # nothing else was ever written there
        missing = next(iter(sizes))
        assert mb.stat(missing) is None
        mb.delete(missing)  # a missing piece is no error
        with pytest.raises(PieceMissing) as e:
            mb.fetch(missing, tmp_path / "never")
        assert isinstance(e.value, ObjectMissing) and mb.url in e.value.message
        assert not (tmp_path / "never").exists()
    for f in files.values():
        f.unlink()


def test_names_that_break_the_rule_are_refused_before_any_backend_call(place: Place, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    with open_mailbox(place.url) as mb:
        mb.list()  # the first contact is made
        before, requests = place.names(), place.requests()
        parent = sorted(os.listdir(place.folder.parent)) if place.folder is not None else []
        for bad in BAD_NAMES:
            with pytest.raises(InvalidName, match="64 lowercase hex digits"):
                mb.put_file(bad, src)
            with pytest.raises(InvalidName):
                mb.fetch(bad, tmp_path / "out")
            with pytest.raises(InvalidName):
                mb.delete(bad)
            with pytest.raises(InvalidName):
                mb.stat(bad)
        assert place.requests() == requests  # not one request reached the S3 server
        assert place.names() == before == set()
        if place.folder is not None:
            assert sorted(os.listdir(place.folder.parent)) == parent  # ../x was not written either
        assert not (tmp_path / "out").exists()


def test_strays_are_listed_and_never_taken_for_pieces(place: Place, tmp_path: Path) -> None:
    good = piece()
    foreign = ["A" * 64, "a" * 63, "a" * 65, "notes.txt", "packs/x", ".DS_Store"]
    for name in foreign:
        place.plant(name)
    if place.temps_shown:
        place.plant("." + piece())  # a writer's temp file: neither a piece nor a stray
    src = tmp_path / "src"
    src.write_bytes(b"piece\n")
    with open_mailbox(place.url) as mb:
        mb.put_file(good, src)
        assert [i.name for i in mb.list()] == [good]
        strays = mb.strays()
        assert strays.shown == tuple(sorted(["A" * 64, "a" * 63, "a" * 65, "notes.txt", "packs/", ".DS_Store"]))
        assert strays.count == 6


KILLED_WRITER = """
import sys
from bunker.storage.mailbox import open_mailbox
mb = open_mailbox(sys.argv[1])
print("writing", flush=True)
mb.put_file(sys.argv[2], sys.argv[3])
print("done", flush=True)
"""


def test_a_killed_writer_leaves_nothing_a_listing_shows(place: Place, tmp_path: Path) -> None:
    src = write_random(tmp_path / "big", 64 * MiB)
    env = dict(os.environ, PYTHONPATH=SRC)
    caught = 0  # writers killed while their temp file was there (local, sftp)
    temps: set[str] = set()
    names: list[str] = []
    for attempt in range(4):
        name = piece()
        names.append(name)
        if place.temps_shown:
            temps = {n for n in os.listdir(place.folder) if is_temp_name(n)}
        child = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, place.url, name, str(src)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"writing\n", child.stderr.read() if child.stderr else ""
            if place.temps_shown:
                deadline = time.monotonic() + 60
                while child.poll() is None and {n for n in os.listdir(place.folder) if is_temp_name(n)} <= temps:
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
                caught += child.poll() is None
            else:
                time.sleep(0.05 * attempt)  # before, during or after its one PUT
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate()
        with open_mailbox(place.url) as mb:
            listed = [(i.name, i.size) for i in mb.list()]
            assert mb.strays().count == 0
            # nothing, or whole pieces: on an object store a PUT whose body the server had
            # received when its writer was killed may land after the listing of its own attempt
            assert set(listed) <= {(n, 64 * MiB) for n in names}, (listed, name)
            for n, _ in listed:
                mb.delete(n)
    if place.temps_shown:
        assert caught >= 1
        # the temp files of the killed writers, once stale, are swept (local: when a mailbox
        # opens; sftp: after the first put)
        stale = [place.folder / n for n in os.listdir(place.folder) if is_temp_name(n)]
        assert len(stale) == caught
        old = time.time() - 2 * 3600
        for t in stale:
            os.utime(t, (old, old))
        small = tmp_path / "small"
        small.write_bytes(b"small\n")
        with open_mailbox(place.url) as mb:
            mb.put_file(piece(), small)
        assert not [n for n in os.listdir(place.folder) if is_temp_name(n)]
    src.unlink()


def test_streams_without_holding_the_piece_in_memory_on_sftp(
    sftp_env: dict[str, str], sshd: object, tmp_path: Path
) -> None:
    folder = tmp_path / "link"
    folder.mkdir()
    src = write_random(tmp_path / "src", 48 * MiB)
    name = piece()
    with open_mailbox(sshd.url(folder)) as mb:  # type: ignore[attr-defined]
        mb.list()  # connected before measuring
        tracemalloc.start()
        try:
            mb.put_file(name, src)
            put_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            mb.fetch(name, tmp_path / "out")
            fetch_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert digest(tmp_path / "out") == digest(src)
    print(f"sftp 48 MiB: put peak {put_peak} B, fetch peak {fetch_peak} B")
    assert put_peak < 24 * MiB and fetch_peak < 24 * MiB, (put_peak, fetch_peak)
    src.unlink()
    (tmp_path / "out").unlink()


def test_object_store_mailbox_makes_no_prefix_folders(s3_env: dict[str, str], s3_server: S3Server) -> None:
    prefix = "t-" + secrets.token_hex(6)
    place = Place("s3", s3_server.url(prefix), server=s3_server, prefix=prefix)
    with open_mailbox(place.url, create=True) as mb:
        assert mb.list() == []
    assert place.names() == set()


# ------------------------------------------------------------------------------ a local folder


def test_a_symlink_under_a_pieces_name_is_never_followed(tmp_path: Path) -> None:
    mbdir, outside = tmp_path / "link", tmp_path / "outside"
    mbdir.mkdir()
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"not for the mailbox\n")
    to_file, to_dir, dangling, linked = piece(), piece(), piece(), piece()
    (mbdir / to_file).symlink_to(secret)
    (mbdir / to_dir).symlink_to(outside)
    (mbdir / dangling).symlink_to(outside / "new")
    os.link(secret, mbdir / linked)  # a hard link: root could read any file of the filesystem
    src = tmp_path / "src"
    src.write_bytes(b"a piece\n")
    with open_mailbox(str(mbdir)) as mb:
        assert mb.list() == []
        assert mb.strays().shown == tuple(sorted([to_file, to_dir, dangling, linked]))
        for n in (to_file, to_dir, dangling, linked):
            assert mb.stat(n) is None
            with pytest.raises(NotAPiece, match="never reads or writes through it") as e:
                mb.fetch(n, tmp_path / "out")
            assert str(mbdir) in e.value.message
        assert not (tmp_path / "out").exists()
        for n in (to_file, to_dir, dangling):
            with pytest.raises(NotAPiece, match="a symbolic link"):
                mb.put_file(n, src)
        assert secret.read_bytes() == b"not for the mailbox\n"
        assert sorted(os.listdir(outside)) == ["secret"]
        assert (mbdir / to_file).is_symlink()
        mb.delete(to_file)  # the symlink goes, never what it points to
        assert not (mbdir / to_file).is_symlink() and secret.exists()


def test_a_folder_a_pipe_and_the_mailbox_itself_as_a_symlink(tmp_path: Path) -> None:
    mbdir = tmp_path / "link"
    mbdir.mkdir()
    sub, fifo = piece(), piece()
    (mbdir / sub).mkdir()
    os.mkfifo(mbdir / fifo)
    with open_mailbox(str(mbdir)) as mb:
        assert mb.list() == []
        assert mb.strays().shown == tuple(sorted([sub + "/", fifo]))
        with pytest.raises(NotAPiece, match="a named pipe"):
            mb.fetch(fifo, tmp_path / "out")  # without hanging on the pipe
        src = tmp_path / "src"
        src.write_bytes(b"a piece\n")
        with pytest.raises(NotAPiece, match="a folder"):
            mb.put_file(sub, src)
        with pytest.raises(StorageError, match="a folder has the piece's name"):
            mb.delete(sub)
    alias = tmp_path / "alias"
    alias.symlink_to(mbdir)
    with pytest.raises(StorageRefused, match="is a symbolic link") as e:
        open_mailbox(str(alias))
    assert "realpath" in e.value.hint


def test_memory_stays_bounded_for_a_200_mib_piece(tmp_path: Path) -> None:
    mbdir = tmp_path / "link"
    mbdir.mkdir()
    src = tmp_path / "big"
    with open(src, "wb") as f:
        f.truncate(200 * MiB)
        for at in range(0, 200 * MiB, 16 * MiB):  # marks to compare, in an otherwise sparse file
            f.seek(at)
            f.write(secrets.token_bytes(64))
    name = piece()
    with open_mailbox(str(mbdir)) as mb:
        tracemalloc.start()
        try:
            mb.put_file(name, src)
            put_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            mb.fetch(name, tmp_path / "out")
            fetch_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    print(f"local 200 MiB: put peak {put_peak} B, fetch peak {fetch_peak} B")
    assert put_peak < 4 * MiB and fetch_peak < 4 * MiB, (put_peak, fetch_peak)
    assert digest(tmp_path / "out") == digest(src) == digest(mbdir / name)
    for p in (src, tmp_path / "out", mbdir / name):
        p.unlink()


def test_a_missing_folder_says_the_medium_is_not_there(tmp_path: Path) -> None:
    where = tmp_path / "media" / "usb" / "link"
    with pytest.raises(StorageError) as e:
        open_mailbox(str(where))
    assert e.value.exit_code == ExitCode.NO_REPOSITORY
    assert f"the link's mailbox {where} is not there" in e.value.message
    assert "not connected or not mounted" in e.value.message
    assert "connect and mount the medium" in e.value.hint and "then run the command again" in e.value.hint
    assert not where.parent.exists()  # nothing made without create

    with open_mailbox(f"file://{where}", create=True) as mb:
        assert mb.list() == []
    assert os.listdir(where) == []  # no repository prefix folders
    assert stat.S_IMODE(where.stat().st_mode) == 0o700


def test_urls_a_mailbox_refuses(tmp_path: Path) -> None:
    for url in ("ssh://user@host/srv/link", "unix:///run/bunker.sock"):
        with pytest.raises(BunkerError, match="a link's mailbox is a folder, not a bunker server") as e:
            open_mailbox(url)
        assert e.value.exit_code == ExitCode.USAGE and "sftp://USER@HOST/PATH" in e.value.hint
    with pytest.raises(BunkerError, match="^mailbox 'host:link' starts like a URL") as e:
        open_mailbox("host:link")
    assert e.value.exit_code == ExitCode.USAGE
    with pytest.raises(BunkerError, match="^mailbox 'sftp:/host/x' is a sftp:// URL that lacks"):
        open_mailbox("sftp:/host/x")
    with pytest.raises(BunkerError, match="no mailbox URL"):
        open_mailbox("")


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A mailbox folder holding one piece, then made read-only: a read-only bind mount as root
    (what the kernel does to a failing disk), mode 0500 otherwise."""
    disk = tmp_path / "disk"
    (disk / "link").mkdir(parents=True)
    (disk / "link" / ("a" * 64)).write_bytes(b"carried\n")
    (disk / "link" / ("a" * 64)).chmod(0o600)
    if os.geteuid() != 0:
        (disk / "link").chmod(0o500)
        try:
            yield disk / "link"
        finally:
            (disk / "link").chmod(0o700)
        return
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cp = subprocess.run(["mount", "--bind", str(disk), str(mnt)], capture_output=True, check=False)
    if cp.returncode != 0:
        pytest.skip(f"bind-mounting failed: {cp.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        yield mnt / "link"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_a_read_only_medium_is_read_but_refuses_writes(read_only_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"new piece\n")
    with open_mailbox(str(read_only_folder)) as mb:
        assert [i.name for i in mb.list()] == ["a" * 64]  # pulling from a write-protected disk works
        assert mb.fetch("a" * 64, tmp_path / "out") == 8
        with pytest.raises(StorageRefused) as e:
            mb.put_file(piece(), src)
        text = f"{e.value.message} {e.value.hint}"
        assert str(read_only_folder) in text and "then run the command again" in text
        if os.geteuid() == 0:
            assert "the medium that holds the mailbox is mounted read-only" in e.value.message
            assert "remount" in e.value.hint and "repository" not in text
        else:
            assert "may not write into the mailbox" in e.value.message
        with pytest.raises(StorageRefused):
            mb.delete("a" * 64)
    assert os.listdir(read_only_folder) == ["a" * 64]


def test_a_full_medium_says_how_much_room_the_piece_needs(tmp_path: Path) -> None:
    with loop_ext4(16 * MiB, "bunker-mailbox-full-", "the message is made in one function") as mnt:
        where = mnt / "link"
        src = write_random(tmp_path / "big", 20 * MiB)
        with open_mailbox(str(where), create=True) as mb:
            free = mb.free_space()
            assert free is not None and 0 < free < 16 * MiB
            with pytest.raises(MailboxFull) as e:
                mb.put_file(piece(), src)
            err = e.value
            assert isinstance(err, RepositoryFull) and err.exit_code == ExitCode.FATAL
            assert err.needed == 20 * MiB and err.free == free
            assert f"into the mailbox {where}: the medium is full" in err.message
            assert "the piece needs 21.0 MB" in err.message
            assert f"df -h {where}" in err.hint and "then run the command again" in err.hint

            # a write that passes the check but not the disk: the disk filled up, its folder's
            # blocks too, by another writer meanwhile
            fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for step in (MiB, 4096, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * step)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
            for i in range(100_000):
                try:
                    (where / f"{i:065d}").touch()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            empty = tmp_path / "empty"
            empty.write_bytes(b"")
            with pytest.raises(MailboxFull, match="No space left on device"):
                mb.put_file(piece(), empty)
            os.unlink(mnt / "filler")
            for n in os.listdir(where):
                os.unlink(where / n)
            assert mb.list() == [] and mb.strays().count == 0
        src.unlink()


# ------------------------------------------------------------------------------------- as root

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a root process writes as the folder's owner")


@needs_root
def test_root_writes_as_the_folders_owner(tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    os.chown(usb, NOBODY, NOBODY)
    where = usb / "link"
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o700)
    src = secret_dir / "piece"
    src.write_bytes(b"sealed bundle bytes\n" * 1000)
    src.chmod(0o600)
    name = piece()
    with open_mailbox(str(where), create=True) as mb:  # made as the owner of the folder it goes in
        st = where.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
        mb.put_file(name, src)  # nobody can read neither the source nor the path: descriptors are inherited
        st = (where / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
        assert mb.fetch(name, tmp_path / "out") == src.stat().st_size
        assert (tmp_path / "out").read_bytes() == src.read_bytes()
        assert (tmp_path / "out").stat().st_uid == 0  # the destination is root's own
        mb.delete(name)
        assert os.listdir(where) == []

        # a daemon's threads write at once: each through its own child
        names = [piece() for _ in range(4)]
        errors: list[BaseException] = []

        def put(n: str) -> None:
            try:
                mb.put_file(n, src)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert [i.name for i in mb.list()] == sorted(names)
        assert {(where / n).stat().st_uid for n in names} == {NOBODY}
        for n in names:
            mb.delete(n)

    # a folder its owner may not write: refused, naming the owner root writes as
    where.chmod(0o500)
    with open_mailbox(str(where)) as mb, pytest.raises(StorageRefused) as e:
        mb.put_file(name, src)
    assert "the folder's owner (nobody, uid 65534)" in e.value.message
    assert os.listdir(where) == []


@needs_root
def test_a_symlink_swapped_in_while_root_writes_is_never_followed(tmp_path: Path) -> None:
    where, target = tmp_path / "link", tmp_path / "target"
    where.mkdir()
    os.chown(where, NOBODY, NOBODY)
    target.write_bytes(b"root's file\n")
    src = write_random(tmp_path / "src", 32 * MiB)
    stop = threading.Event()
    swapped: list[str] = []

    def attacker() -> None:  # the folder's owner, replacing each temp file with a symlink
        while not stop.is_set():
            for n in os.listdir(where):
                if is_temp_name(n) and not (where / n).is_symlink():
                    try:
                        os.unlink(where / n)
                        os.symlink(target, where / n)
                        os.lchown(where / n, NOBODY, NOBODY)
                        swapped.append(n)
                    except OSError as exc:
                        assert exc.errno in (errno.ENOENT, errno.EEXIST)

    names = [piece() for _ in range(4)]
    written: list[str] = []
    planted = piece()
    (where / planted).symlink_to(target)  # and one waiting under a piece's name
    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        with open_mailbox(str(where)) as mb:
            with pytest.raises(NotAPiece):
                mb.put_file(planted, src)
            for n in names:
                try:
                    mb.put_file(n, src)
                except StorageError as exc:  # the attacker won the race: said, never gone through a link
                    assert (
                        "the temp file was replaced while it was written, and what now has its name is a symbolic link"
                        in exc.message
                        or "something removed a file bunker was writing" in exc.message  # between unlink and symlink
                    ), exc.message
                else:
                    written.append(n)
    finally:
        stop.set()
        thread.join(10)
    assert target.read_bytes() == b"root's file\n"
    assert target.stat().st_uid == 0
    with open_mailbox(str(where)) as mb:
        pieces = {i.name for i in mb.list()}
        assert set(written) <= pieces  # a put that returned left a whole piece
        for n in names:
            if n in pieces:
                assert digest(where / n) == digest(src)
            else:
                assert (where / n).is_symlink()
                with pytest.raises(NotAPiece):
                    mb.fetch(n, tmp_path / "out")
    print(f"temp files swapped for symlinks: {len(swapped)}; pieces whole: {len(pieces)} of {len(names)}")
    shutil.rmtree(where)
    src.unlink()


def test_after_a_put_the_folder_holds_only_hex_names(tmp_path: Path) -> None:
    """Nothing on the medium is recognisable: no fixed names, no folders, no marks."""
    mbdir = tmp_path / "link"
    with open_mailbox(str(mbdir), create=True) as mb:
        src = tmp_path / "src"
        src.write_bytes(b"piece\n")
        mb.put_file(piece(), src)
    (name,) = os.listdir(mbdir)
    assert len(name) == 64 and set(name) <= set("0123456789abcdef")


def test_a_piece_given_up_on_the_same_filesystem_is_linked_not_copied(tmp_path: Path) -> None:
    """A writer that gives its piece file up (``consume``) pays no second write on the same
    filesystem; one that keeps its file gets a copy that its later changes cannot reach. The
    given file's own name is gone once the piece is in place: a writer killed before it removes
    that name must not leave a piece with two links, which no listing shows."""
    mbdir = tmp_path / "link"
    given, kept = tmp_path / "given", tmp_path / "kept"
    given.write_bytes(b"given " * 1000)
    kept.write_bytes(b"kept " * 1000)
    inode = given.stat().st_ino
    a, b = piece(), piece()
    with open_mailbox(str(mbdir), create=True) as mb:
        mb.put_file(a, given, consume=True)
        assert not given.exists()
        assert [i.name for i in mb.list()] == [a]  # before the writer does anything more
        mb.put_file(b, kept)
    assert (mbdir / a).stat().st_ino == inode
    assert (mbdir / a).read_bytes() == b"given " * 1000 and (mbdir / a).stat().st_nlink == 1
    assert (mbdir / b).stat().st_ino != kept.stat().st_ino
    kept.write_bytes(b"changed")
    assert (mbdir / b).read_bytes() == b"kept " * 1000
