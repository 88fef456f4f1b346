"""Small files go through worker processes that encrypt their blobs and wrap the blob keys under
a key group of their own; the main process only deduplicates and lays the packs out, one key
group per worker (src/bunker/repo/grouped_pack.py, docs/format.md section 10.1)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.repo.pack import decrypt_trailer, parse_footer
from helpers import Repo, compare_trees, js, restored_path

FIRST = 1000  # the first 1,000 small files are read by the main process's threads
PAIRED = 700  # then contents that each occur twice, 700 files apart (in other batches)
AGAIN = 200  # then the first 200 contents again (stored by the main process already)
FILES = FIRST + 2 * PAIRED + AGAIN
DISTINCT = FIRST + PAIRED


def _content(i: int) -> int:
    if i < FIRST:
        return i
    if i < FIRST + 2 * PAIRED:
        return FIRST + (i - FIRST) % PAIRED
    return i - FIRST - 2 * PAIRED


def _small_files(src: Path) -> None:
    rng = random.Random(14)
    contents = [rng.randbytes(rng.randrange(100, 3000)) for _ in range(DISTINCT)]
    for i in range(FILES):
        d = src / f"d{i // 300}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}").write_bytes(contents[_content(i)])


def _data_packs(repo: Repo) -> list[tuple[bytes, object]]:
    """(pack bytes, trailer) of every data pack."""
    put = load_put_key(str(repo.put_key))
    out = []
    for p in (repo.path / "packs").iterdir():
        data = p.read_bytes()
        trailer = decrypt_trailer(parse_footer(data, len(data)), put.secrets)
        if trailer.kind == "data":
            out.append((data, trailer))
    return out


def test_worker_blobs_are_stored_once_in_key_groups_and_restore(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _small_files(src)
    first = js(repo.ok("backup", src, "--json"))["stats"]
    assert first["files"] == FILES

    packs = _data_packs(repo)
    ids = [b.chunk_id for _, t in packs for b in t.blobs]
    # each content once: repeats in other batches, and contents the main process stored, are
    # cut out of the workers' runs
    assert len(ids) == len(set(ids)) == DISTINCT, (len(ids), len(set(ids)))
    # the workers' packs are apart from the main process's; a worker keeps its key group for its
    # life and fills packs of its own, so a pack holds one sealed key, and no worker wraps under
    # another's key
    sealed = [[data[o : o + n] for o, n in t.groups] for data, t in packs]
    assert len(packs) >= 2, [len(s) for s in sealed]
    assert all(len(s) == 1 for s in sealed), [len(s) for s in sealed]
    assert 2 <= len({k for s in sealed for k in s}) <= 3  # the main process's, and one or two workers'
    assert not list(tmp_path.rglob(".tmp-*")), "the packs' staging files are gone"

    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    target = tmp_path / "restored"
    repo.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)

    # new times, same content: every file is read again, and nothing is stored again
    later = 2_000_000_000
    for d, _, names in os.walk(src):
        for n in names:
            os.utime(os.path.join(d, n), (later, later))
    second = js(repo.ok("backup", src, "--json"))["stats"]
    assert second["files_changed"] == FILES, second
    assert second["stored_new"] < first["stored_new"] / 10, second  # the trees, with their new times
    assert sorted(b.chunk_id for _, t in _data_packs(repo) for b in t.blobs) == sorted(ids)
