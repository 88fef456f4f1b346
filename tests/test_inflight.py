"""What a backup's reads may hold in memory at once (MAX_INFLIGHT_BYTES), file by file, and when
its small-file workers' forkserver starts."""

from __future__ import annotations

import os
from pathlib import Path

from bunker.backup.archiver import MAX_INFLIGHT_BYTES, SMALL_POOL_AFTER, SMALL_POOL_PRESTART, read_charge
from bunker.backup.chunk_store import READ_WHOLE
from helpers import Repo, processes_started


def test_a_large_file_is_charged_what_reading_it_holds(tmp_path: Path) -> None:
    """Files read as a stream hold a few MiB each: several large files are read at once
    (charging a 96 MiB file its size read a tree's large files one at a time)."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 40)
    small = tmp_path / "small"
    small.write_bytes(b"x" * 5000)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
    assert read_charge(big.stat()) == READ_WHOLE
    assert 3 * read_charge(big.stat()) <= MAX_INFLIGHT_BYTES
    assert read_charge(small.stat()) == 5000
    assert read_charge(sparse.stat()) == sparse.stat().st_blocks * 512 < READ_WHOLE


def test_a_backup_starts_the_workers_forkserver_ahead_only_for_many_small_files(repo: Repo, tmp_path: Path) -> None:
    """Past SMALL_POOL_PRESTART small files the workers' forkserver starts beside the walk, so
    the first batch (after SMALL_POOL_AFTER) finds it ready; a backup of fewer starts nothing."""
    few = tmp_path / "few"
    few.mkdir()
    for i in range(SMALL_POOL_PRESTART - 50):
        (few / f"f{i}").write_bytes(os.urandom(100))
    assert processes_started(repo, "backup", few) == 0
    some = tmp_path / "some"
    some.mkdir()
    for i in range(SMALL_POOL_PRESTART + 50):
        (some / f"f{i}").write_bytes(os.urandom(100))
    assert processes_started(repo, "backup", some) >= 1  # the forkserver, never handed a batch
    assert SMALL_POOL_PRESTART < SMALL_POOL_AFTER
