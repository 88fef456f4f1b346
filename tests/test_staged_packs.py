"""Packs built in a staged file (storage/staged.py, repo/pack_body.py): a backup writes each blob
to a file on this machine as it comes instead of holding its packs in memory. The staged pack is
the pack memory would build; a staging file that stops taking bytes is read back and the pack goes
on in memory; a local repository takes a staged file by a link on its filesystem and by a copy
from another; a spooling backend stages in its spool, so an upstream that fails while a pack goes
up leaves the pack in the spool."""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import blake3
import pytest

from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets
from bunker.crypto.kem import DataPrivateKey
from bunker.crypto.sign import SigningKey
from bunker.errors import StorageError
from bunker.repo import blob
from bunker.repo.pack import HEADER, PackWriter, decrypt_trailer, open_group_key, parse_footer, unwrap_blob_key
from bunker.repo.pack_body import FinishedPack
from bunker.storage.file_copy import COPY_STEP, copy_fd
from bunker.storage.local import FileOps, LocalBackend
from bunker.storage.spooling import SpoolingBackend
from bunker.storage.staged import StagedFile
from helpers import Repo, js

CERT = "clients/" + "cd" * 32
SEALED = 1168


class Keys:
    def __init__(self, seed: int = 3) -> None:
        rng = random.Random(seed)
        self.secrets = PutSecrets(rng.randbytes(32))
        self.data_private = DataPrivateKey(rng.randbytes(32))
        self.signer = SigningKey(rng.randbytes(32))
        self.rng = rng


def _build(keys: Keys, staged: StagedFile | None, n: int = 12) -> tuple[FinishedPack, dict[bytes, bytes]]:
    w = PackWriter("data", keys.secrets, keys.data_private.public(), keys.signer, CERT, staged)
    plain: dict[bytes, bytes] = {}
    for i in range(n):
        data = keys.rng.randbytes(keys.rng.choice([100, 5000, 70_000])) if i % 2 else bytes([i]) * 30_000
        cid = blob.chunk_id(keys.secrets, data)
        ct, k_blob = blob.encrypt_blob(keys.secrets, cid, data)
        w.add(cid, ct, len(data), k_blob)
        plain[cid] = data
    return w.seal(), plain


def _check_pack(keys: Keys, name: str, data: bytes, plain: dict[bytes, bytes]) -> None:
    """The pack is named by its hash, and every blob opens to its content."""
    assert blake3.blake3(data).hexdigest() == name
    trailer = decrypt_trailer(parse_footer(data, len(data)), keys.secrets)
    sealed = data[len(HEADER) : len(HEADER) + SEALED]
    group = aead.Cipher(open_group_key(sealed, keys.data_private, keys.secrets.domain_id))
    assert sorted(b.chunk_id for b in trailer.blobs) == sorted(plain)
    for b in trailer.blobs:
        ct = data[b.offset : b.offset + b.length]
        assert blob.decrypt_blob(unwrap_blob_key(group, b), b.chunk_id, ct, b.raw_length) == plain[b.chunk_id]


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_a_staged_pack_is_linked_into_the_repository(tmp_path: Path) -> None:
    keys = Keys()
    repo = LocalBackend(str(tmp_path / "r"), create=True)
    staged = repo.stage("packs/")
    assert staged is not None and os.path.dirname(staged.path) == str(tmp_path / "r" / "packs")
    done, plain = _build(keys, staged)
    assert done.data is None and done.staged is staged  # nothing of it was held in memory
    assert os.path.getsize(staged.path) == done.size
    repo.put_staged(f"packs/{done.name}", staged.path)
    data = repo.get(f"packs/{done.name}")
    assert len(data) == done.size
    _check_pack(keys, done.name, data, plain)
    assert [i.name for i in repo.list("packs/")] == [f"packs/{done.name}"]
    assert _temp_files(tmp_path) == []


class FailingWrites(FileOps):
    """Writes fail with ENOSPC from the ``fail_at``-th on; the one before writes half its bytes."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.writes = 0

    def write(self, fd: int, data: memoryview) -> int:
        self.writes += 1
        if self.writes >= self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        if self.writes == self.fail_at - 1 and len(data) > 1:
            return super().write(fd, data[: len(data) // 2])
        return super().write(fd, data)


@pytest.mark.parametrize("fail_at", [4, 9, 16])  # among the blobs, at the last one, in the tail
def test_a_staging_file_that_fills_up_goes_on_in_memory(tmp_path: Path, fail_at: int) -> None:
    keys = Keys()
    disk = FailingWrites(fail_at)
    repo = LocalBackend(str(tmp_path / "r"), create=True, ops=disk)
    staged = repo.stage("packs/")
    assert staged is not None
    done, plain = _build(keys, staged)
    assert disk.writes >= fail_at - 1
    assert done.staged is None and done.data is not None, "the pack went on in memory"
    assert _temp_files(tmp_path) == [], "the staging file was removed"
    assert len(done.data) == done.size
    _check_pack(keys, done.name, done.data, plain)


class NoLinksAcross(FileOps):
    """Another filesystem: a hard link fails with EXDEV. Records the copies and the largest
    write."""

    largest = 0
    copied = 0

    def link(self, src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def write(self, fd: int, data: memoryview) -> int:
        self.largest = max(self.largest, len(data))
        return super().write(fd, data)

    def copy(self, src: int, dst: int) -> int:
        n = super().copy(src, dst)
        self.copied += n
        return n


def test_a_staged_file_from_another_filesystem_is_copied_by_the_kernel(tmp_path: Path) -> None:
    keys = Keys()
    spool = LocalBackend(str(tmp_path / "spool"), create=True)
    disk = NoLinksAcross()
    repo = LocalBackend(str(tmp_path / "r"), create=True, ops=disk)
    staged = spool.stage("packs/")
    assert staged is not None
    done, plain = _build(keys, staged, n=240)
    assert done.size > 2 * COPY_STEP
    repo.put_staged(f"packs/{done.name}", staged.path)
    assert disk.copied == done.size and disk.largest == 0, "copied whole, never through this process"
    _check_pack(keys, done.name, repo.get(f"packs/{done.name}"), plain)
    assert not os.path.exists(staged.path)
    assert _temp_files(tmp_path) == []


def test_a_copy_the_kernel_cannot_make_goes_in_pieces(tmp_path: Path) -> None:
    """sendfile refuses a destination opened for appending: the copy then goes through the
    caller's write, a piece at a time."""
    data = os.urandom(2 * COPY_STEP + 12345)
    (tmp_path / "src").write_bytes(data)
    writes: list[int] = []

    def write(fd: int, view: memoryview) -> int:
        writes.append(len(view))
        return os.write(fd, view)

    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        assert copy_fd(src, dst, write) == len(data)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == data
    assert len(writes) == 3 and max(writes) == COPY_STEP


class CountedSyncs(FileOps):
    """Counts file syncs, and records the staged files synced by path."""

    def __init__(self) -> None:
        self.syncs = 0
        self.paths: list[str] = []

    def fsync(self, fd: int) -> None:
        self.syncs += 1
        super().fsync(fd)

    def fsync_path(self, path: str) -> None:
        self.paths.append(path)
        super().fsync_path(path)


def test_a_staged_file_is_synced_only_where_it_is_kept(tmp_path: Path) -> None:
    """Sealing syncs nothing: a staged file linked in place is synced before it is named; one
    copied into a repository on another filesystem is not synced at all, its copy is."""
    keys = Keys()
    ops = CountedSyncs()
    repo = LocalBackend(str(tmp_path / "r"), create=True, ops=ops)
    staged = repo.stage("packs/")
    assert staged is not None
    done, plain = _build(keys, staged)
    assert ops.syncs == 0, "sealing synced the staged file"
    repo.put_staged(f"packs/{done.name}", staged.path)
    assert ops.paths == [staged.path] and ops.syncs == 1, "linked in place unsynced"
    _check_pack(keys, done.name, repo.get(f"packs/{done.name}"), plain)

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's directory")
    other = Path(tempfile.mkdtemp(prefix="bunker-spool-", dir=shm))
    try:
        spool_ops, repo_ops = CountedSyncs(), CountedSyncs()
        spool = LocalBackend(str(other / "spool"), create=True, ops=spool_ops)
        repo = LocalBackend(str(tmp_path / "r2"), create=True, ops=repo_ops)
        staged = spool.stage("packs/")
        assert staged is not None
        done, plain = _build(keys, staged)
        repo.put_staged(f"packs/{done.name}", staged.path)
        assert spool_ops.syncs == 0 and spool_ops.paths == [], "the spool's staged file was synced"
        assert repo_ops.syncs == 1 and repo_ops.paths == [], "the copy in the repository is synced"
        assert not os.path.exists(staged.path)
        _check_pack(keys, done.name, repo.get(f"packs/{done.name}"), plain)
    finally:
        shutil.rmtree(other)


class BrokenDisk(FileOps):
    """The repository's disk fails every write (EIO): a repository that stopped answering."""

    def create(self, path: str) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def link(self, src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_a_spooling_backend_stages_in_the_spool_and_keeps_what_its_upstream_refused(tmp_path: Path) -> None:
    keys = Keys()
    upstream = LocalBackend(str(tmp_path / "r"), create=True, ops=BrokenDisk())
    spool = LocalBackend(str(tmp_path / "spool"), create=True)
    backend = SpoolingBackend(upstream, spool)
    staged = backend.stage("packs/")
    assert staged is not None and staged.path.startswith(str(tmp_path / "spool")), "staged on this machine"
    done, plain = _build(keys, staged)
    with pytest.raises(StorageError):
        upstream.put_staged(f"packs/{done.name}", staged.path)
    assert os.path.exists(staged.path), "a failed put leaves the staged file"
    backend.put_staged(f"packs/{done.name}", staged.path)
    assert backend.offline
    _check_pack(keys, done.name, spool.get(f"packs/{done.name}"), plain)
    assert not (tmp_path / "r" / "packs" / done.name).exists()
    assert _temp_files(tmp_path) == []


def test_a_backup_leaves_no_staging_files_and_checks_clean(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(1500):  # enough for the worker processes (backup/archiver.py)
        (src / f"s{i:04d}").write_bytes(rng.randbytes(rng.randrange(10, 3000)))
    (src / "big").write_bytes(rng.randbytes(20 << 20))
    doc = js(repo.ok("backup", src, "--json"))
    assert doc["stats"]["files"] == 1501
    assert _temp_files(tmp_path) == []
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
