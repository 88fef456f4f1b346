"""check --read-data of a repository of few bytes of packs verifies them on a thread of its own
process (repo/pack_verifier.py, IN_PROCESS_BYTES): no forkserver and workers for a pack or two,
and a damaged blob is found there as in a worker."""

from __future__ import annotations

import os
from pathlib import Path

from bunker.repo.pack_verifier import IN_PROCESS_BYTES
from helpers import Repo, js, processes_started


def test_a_few_packs_are_verified_without_worker_processes_and_damage_is_found(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(300_000))
    repo.backup(src)
    packs = repo.objects("packs")
    assert 0 < sum(p.stat().st_size for p in packs) <= IN_PROCESS_BYTES
    assert processes_started(repo, "check", "--read-data") == 0

    # a byte of the data pack's body flipped: its blob fails in the in-process verifier
    pack = max(packs, key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[100] ^= 0x40
    pack.chmod(0o600)
    pack.write_bytes(bytes(data))
    cp = repo.run("check", "--read-data", "--json")
    assert cp.returncode != 0
    doc = js(cp)
    assert doc["ok"] is False
    assert any(pack.name in str(p) for p in doc["problems"]), doc["problems"]


def test_more_bytes_are_verified_by_worker_processes(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # random: stored as they are
        (src / f"{i}.bin").write_bytes(os.urandom(IN_PROCESS_BYTES // 2))
    repo.backup(src)
    assert sum(p.stat().st_size for p in repo.objects("packs")) > IN_PROCESS_BYTES
    assert processes_started(repo, "check", "--read-data") >= 3  # the forkserver, the tracker, workers
