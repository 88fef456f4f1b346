"""The storage layer: object names are the security boundary; local writes are atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bunker.errors import BunkerError, ObjectMissing
from bunker.storage.backend import InvalidName, validate_name, validate_prefix
from bunker.storage.local import TEMP_PREFIX, LocalBackend
from bunker.storage.url import open_backend

H = "0123456789abcdef" * 4

BAD_NAMES = [
    "../x",
    "packs/../../etc",
    "packs/../../etc/passwd",
    "packs/.hidden",
    "packs/..",
    "packs/.",
    "packs/.tmp-0123",
    "/abs",
    "/etc/passwd",
    "packs//x",
    "packs/a/b",
    "packs/",
    "packs",
    "",
    ".",
    "..",
    "unknown/" + H,
    "Packs/" + H,
    "packs/" + "a" * 129,
    "packs/x\x00y",
    "packs/x\ny",
    "packs/x y",
    "packs/\u00e9",
    "packs\\..\\x",
    "RECOVERY.md/../x",
    "recovery.md",
    "config/-dash",
    # each prefix's own rule (docs/format.md section 5)
    "packs/junk",
    "snapshots/evil",
    "index/" + "a" * 128,
    "packs/" + H + "\n",  # "$" of a regex would take it
    "packs/" + H.upper(),
    "packs/" + H[:-1],
    "packs/" + H + "/x",
    "status/junk",
    "foo/bar",
    "sessions/notasession",
    "sessions/" + H,
    "sessions/0123456789abcdef01234567",
    "sessions/0123456789abcdef01234567.",
    "sessions/0123456789abcdef01234567.01",
    "sessions/0123456789abcdef01234567.-1",
    "sessions/0123456789abcdef01234567.1" + "0" * 18,
    "sessions/0123456789ABCDEF01234567.0",
    "sessions/0123456789abcdef01234567.0\n",
]
GOOD_NAMES = [
    "packs/" + H,
    "config/" + H,
    "snapshots/" + H,
    "sessions/0123456789abcdef01234567.3",
    "gc/" + H,
    "RECOVERY.md",
    "FORMAT.md",
    "sessions/0123456789abcdef01234567.0",
    "sessions/0123456789abcdef01234567." + "9" * 18,
    "status/" + H,
    "policy/" + H,
    "nodes/" + H,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_validate_name_refuses(name: str) -> None:
    with pytest.raises(InvalidName) as exc:
        validate_name(name)
    assert isinstance(exc.value, BunkerError)
    assert "refused object name" in exc.value.message


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("prefix", ["", "packs", "../", "packs/../", "/packs/", "nope/", "packs/x/"])
def test_validate_prefix_refuses(prefix: str) -> None:
    with pytest.raises(InvalidName):
        validate_prefix(prefix)


def test_backend_refuses_bad_names_before_touching_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    b = LocalBackend(str(root), create=True)
    outside = tmp_path / "escaped"
    for name in ("../escaped", "packs/../../escaped", "/" + str(outside).lstrip("/"), "packs/.hidden"):
        with pytest.raises(InvalidName):
            b.put(name, b"data")
        with pytest.raises(InvalidName):
            b.get(name)
        with pytest.raises(InvalidName):
            b.delete(name)
        with pytest.raises(InvalidName):
            b.stat(name)
    assert not outside.exists()
    assert not (root / "packs" / ".hidden").exists()
    with pytest.raises(InvalidName):
        list(b.list("../"))


def test_local_backend_basic_operations(tmp_path: Path) -> None:
    b = open_backend(str(tmp_path / "repo"), create=True)
    name = "packs/" + H
    assert b.stat(name) is None and not b.exists(name)
    with pytest.raises(ObjectMissing):
        b.get(name)
    assert b.put(name, b"0123456789") is True
    assert b.get(name) == b"0123456789"
    assert b.get(name, 2, 3) == b"234"
    assert b.get(name, -4) == b"6789"
    assert b.get(name, -100) == b"0123456789"  # a range larger than the object gives all of it
    info = b.stat(name)
    assert info is not None and info.size == 10 and abs(info.mtime - time.time()) < 60
    # create-if-absent never overwrites
    assert b.capabilities().create_if_absent is True
    assert b.put(name, b"other", if_absent=True) is False
    assert b.get(name) == b"0123456789"
    assert b.put("packs/" + "f" * 64, b"x", if_absent=True) is True
    assert sorted(i.name for i in b.list("packs/")) == sorted([name, "packs/" + "f" * 64])
    b.delete(name)
    b.delete(name)  # deleting a missing object is fine
    assert not b.exists(name)
    # foreign files in the repository directory are not objects
    (tmp_path / "repo" / "packs" / "notes.txt~").write_text("editor backup")
    (tmp_path / "repo" / "packs" / ".tmp-deadbeef").write_text("temp")
    assert [i.name for i in b.list("packs/")] == ["packs/" + "f" * 64]
    # file:// URLs open the same backend; other schemes are refused with a usage error
    assert open_backend("file://" + str(tmp_path / "repo")).get("packs/" + "f" * 64) == b"x"
    with pytest.raises(BunkerError) as exc:
        open_backend("gopher://example.org/repo")
    assert exc.value.exit_code == 2


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    b = LocalBackend(str(root), create=True)
    for i in range(30):
        b.put(f"index/{i:064x}", os.urandom(1000 + i))
        b.put(f"packs/{i:064x}", os.urandom(5000), if_absent=True)
        b.put(f"packs/{i:064x}", b"again", if_absent=True)  # refused: must not leave its temp file
    b.put("RECOVERY.md", b"doc")
    b.put("RECOVERY.md", b"doc v2")  # replaced atomically
    assert b.get("RECOVERY.md") == b"doc v2"
    assert _temp_files(root) == []
    assert (root / "packs" / f"{0:064x}").stat().st_mode & 0o777 == 0o600


def test_stale_temp_files_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    b = LocalBackend(str(root), create=True)
    old = [
        root / "packs" / (TEMP_PREFIX + "0000aaaa"),
        root / (TEMP_PREFIX + "top"),
        root / "index" / (TEMP_PREFIX + "x"),
    ]
    fresh = root / "packs" / (TEMP_PREFIX + "1111bbbb")
    for p in [*old, fresh]:
        p.write_bytes(b"half an object")
    two_hours_ago = time.time() - 7200
    for p in old:
        os.utime(p, (two_hours_ago, two_hours_ago))
    assert b.sweep_temp_files() == 3
    assert not any(p.exists() for p in old)
    assert fresh.exists()  # a writer may still be busy with it
    assert b.sweep_temp_files(older_than=0) == 1 and not fresh.exists()
    # opening the backend sweeps too
    p = root / "snapshots" / (TEMP_PREFIX + "cccc")
    p.write_bytes(b"x")
    os.utime(p, (two_hours_ago, two_hours_ago))
    LocalBackend(str(root))
    assert not p.exists()


_KILLED_WRITER = r"""
import os, sys
from bunker.storage.local import LocalBackend
b = LocalBackend(sys.argv[1])
data = os.urandom(1 << 20) * 64
sys.stdout.write("ready\n"); sys.stdout.flush()
b.put("packs/" + "e" * 64, data)
sys.stdout.write("done\n"); sys.stdout.flush()
"""


def test_killed_writer_leaves_no_partial_object(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    LocalBackend(str(root), create=True)
    name = root / "packs" / ("e" * 64)
    for delay in (0.0, 0.05, 0.15):
        p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root)], stdout=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        # the object is either absent or complete, never half written
        if name.exists():
            assert name.stat().st_size == 64 << 20
            name.unlink()
        b = LocalBackend(str(root))
        assert [i.name for i in b.list("packs/")] == []
        b.sweep_temp_files(older_than=0)
        assert _temp_files(root) == []


def _mount_small_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "bunker-test", str(where)], capture_output=True, check=False
        ).returncode
        == 0
    )


def test_full_disk_write_fails_cleanly(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount_small_tmpfs(mnt):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        b = LocalBackend(str(mnt / "repo"), create=True)
        b.put("packs/" + "1" * 64, b"small")
        with pytest.raises(BunkerError) as exc:
            b.put("packs/" + "2" * 64, os.urandom(1 << 20))
        assert "full" in exc.value.hint
        assert not (mnt / "repo" / "packs" / ("2" * 64)).exists()
        assert _temp_files(mnt / "repo") == []
        assert b.get("packs/" + "1" * 64) == b"small"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_local_create_if_absent_without_hard_links(tmp_path: Path) -> None:
    """On a filesystem without hard links (FAT, exFAT, some network shares: link() fails with
    EPERM), a create-if-absent write still works, by a check and a rename."""
    import errno

    from bunker.storage.local import FileOps

    class NoLinks(FileOps):
        def link(self, src: str, dst: str) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    b = LocalBackend(str(tmp_path / "r"), create=True, ops=NoLinks())
    assert b.put("index/" + "a" * 64, b"one", if_absent=True) is True
    assert b.put("index/" + "a" * 64, b"two", if_absent=True) is False
    assert b.get("index/" + "a" * 64) == b"one"
    assert not [p for p in (tmp_path / "r" / "index").iterdir() if p.name.startswith(".tmp-")]
