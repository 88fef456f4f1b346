"""Incremental backups: unchanged data costs (almost) nothing and is not read; edited copies of a
large file deduplicate."""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

from helpers import HERE, Repo, js, restored_path

AUDITED = [sys.executable, str(HERE / "tools" / "bunker_audited.py")]


def _opened(log: Path) -> set[bytes]:
    if not log.exists():
        return set()
    return {os.path.abspath(p) for p in log.read_bytes().split(b"\0") if p}


def _audited_backup(repo: Repo, src: Path, log: Path) -> tuple[dict, set[bytes]]:
    env = dict(repo.env, BUNKER_TEST_OPEN_LOG=str(log))
    cp = repo.ok("backup", src, "--json", env=env, argv0=AUDITED)
    return js(cp), _opened(log)


def _make_files(src: Path, n: int = 60) -> list[bytes]:
    rng = random.Random(3)
    paths = []
    for i in range(n):
        d = src / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i:02d}.bin"
        p.write_bytes(rng.randbytes(rng.randrange(1, 140_000)))
        paths.append(os.fsencode(p))
    (src / "empty").write_bytes(b"")
    paths.append(os.fsencode(src / "empty"))
    return paths


def test_unchanged_second_backup_adds_nothing_and_reads_nothing(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_files(src)
    total = sum(os.path.getsize(p) for p in files)

    first, opened1 = _audited_backup(repo, src, tmp_path / "open1.log")
    s1 = first["stats"]
    assert s1["files"] == len(files) and s1["files_new"] == len(files)
    assert s1["stored_new"] >= total * 0.9  # random data: stored about as large as it is
    # positive control: the audit hook does see the backup open every source file
    assert set(files) <= opened1, sorted(set(files) - opened1)[:5]

    second, opened2 = _audited_backup(repo, src, tmp_path / "open2.log")
    s2 = second["stats"]
    assert s2["files"] == len(files)
    assert s2["files_unchanged"] == len(files)
    assert s2["files_new"] == 0 and s2["files_changed"] == 0
    assert s2["stored_new"] < 0.01 * s1["stored_new"], s2
    assert s2["bytes"] == total
    # no content was read: not one source file was opened by the second run
    assert not (opened2 & set(files)), sorted(opened2 & set(files))[:5]
    assert second["seq"] == first["seq"] + 1

    # a changed file is read again, and only that one
    changed = files[7]
    with open(changed, "ab") as f:
        f.write(b"more data")
    third, opened3 = _audited_backup(repo, src, tmp_path / "open3.log")
    s3 = third["stats"]
    assert s3["files_changed"] == 1 and s3["files_unchanged"] == len(files) - 1 and s3["files_new"] == 0
    assert opened3 & set(files) == {changed}

    # and the newest snapshot restores the changed content
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--target", target)
    got = restored_path(target, Path(os.fsdecode(changed))).read_bytes()
    assert got == Path(os.fsdecode(changed)).read_bytes()


def test_edited_copy_of_large_file_dedups(repo: Repo, tmp_path: Path) -> None:
    size = 32 << 20
    rng = random.Random(11)
    original = rng.randbytes(size)
    a = tmp_path / "a"
    a.mkdir()
    (a / "big.img").write_bytes(original)
    first = repo.backup(a)
    assert first["stats"]["stored_new"] > size * 0.9

    edited = bytearray(original)
    mid = size // 2
    edited[mid : mid + 4096] = rng.randbytes(4096)  # a few KiB overwritten in the middle
    insert_at = size // 5
    edited[insert_at:insert_at] = rng.randbytes(1024)  # 1 KiB inserted
    b = tmp_path / "b"
    b.mkdir()
    (b / "big-copy.img").write_bytes(bytes(edited))
    second = repo.backup(b)
    s = second["stats"]
    assert s["files_new"] == 1
    assert s["stored_new"] < 0.25 * size, f"edited copy stored {s['stored_new']} new bytes of {size}"

    target = tmp_path / "t"
    repo.ok("restore", second["snapshot"][:16], "--target", target)
    got = restored_path(target, b / "big-copy.img").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(bytes(edited)).digest()
