"""The client's index (repo/index_cache.py) read from real repositories: an index object a
prune rewrote between the listing and the read is not reported as damage; writers split many
entries into several index objects."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from bunker.crypto.keyfile import load_put_key
from bunker.repo import index as index_objects
from bunker.repo.index_cache import CachedIndex, IndexCache, _decode_cached, _encode_cached
from bunker.repo.liveness import all_copies
from bunker.repo.repack import repack
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.storage.backend import ObjectInfo
from bunker.storage.local import LocalBackend
from helpers import Repo, restored_path


class PrunedAfterListing(LocalBackend):
    """A local repository where a prune deletes the first listed index object right after a
    reader listed index/ (the race of a backup starting beside `bunker prune`)."""

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        infos = list(super()._list(prefix))
        if prefix == "index/" and infos:
            self._delete(infos[0].name)
        return iter(infos)


def test_an_index_object_pruned_after_the_listing_is_not_damage(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # three runs: three index objects
        (src / f"f{i}").write_bytes(bytes([i]) * 100_000)
        repo.backup(src)
    put = load_put_key(str(repo.put_key))
    whole = IndexCache(Repository.open(LocalBackend(str(repo.path))), put.secrets, None).load()
    assert len(whole.objects) == 3 and not whole.problems

    raced = IndexCache(Repository.open(PrunedAfterListing(str(repo.path))), put.secrets, None).load()
    assert raced.problems == [], raced.problems
    assert len(raced.objects) == 2 and 0 < len(raced) < len(whole)
    assert all(raced.get(cid) == whole.get(cid) for cid in raced.locations)


def test_many_entries_are_written_as_several_index_objects(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers refuse a signed object over 64 MiB (~1.3 M index entries), so a writer splits:
    a backup's session writer and a repack each write index objects of at most INDEX_BATCH
    entries (a repack: whole packs each), and every chunk stays located."""
    monkeypatch.setattr(index_objects, "INDEX_BATCH", 3)
    r = Repository.open(LocalBackend(str(repo.path)))
    put = load_put_key(str(repo.put_key))
    cert = r.check_put_key(put)

    def indexes() -> set[str]:
        return {i.name for i in r.backend.list("index/")}

    writer = SessionWriter(r, put, cert.name, IndexCache(r, put.secrets, None).load())
    rounds: list[list[bytes]] = []
    for n in (10, 3, 3, 3):  # one pack per round
        before = indexes()
        chunks = [os.urandom(1000) for _ in range(n)]
        rounds.append([blake3.blake3(c).digest() for c in chunks])
        for cid, data in zip(rounds[-1], chunks, strict=True):
            writer.store(cid, data)
        writer.flush()
        assert len(indexes() - before) == (n + 2) // 3  # 10 entries: 3 + 3 + 3 + 1
    writer.close()
    located = IndexCache(r, put.secrets, None).load()
    assert all(cid in located for ids in rounds for cid in ids)
    small = sorted({located.locations[cid].pack for ids in rounds[1:] for cid in ids})
    assert len(small) == 3

    # a repack of the three small packs (every chunk live) into packs of about 2,000 bytes: a new
    # pack per source, and an index object per new pack once three entries are waiting
    liveness = all_copies(r, put.secrets, small)
    for p in small:
        liveness.mark(b"".join(liveness.chunk_ids(p)), liveness.pack_mask([p]))
    before = indexes()
    result = repack(r, put.secrets, put.client_key, cert.name, small, liveness, 2000)
    assert len(result.written) == 3 and len(indexes() - before) == 3
    after = all_copies(r, put.secrets, [])
    copied = set().union(*(after.chunk_ids(n) for n, _ in result.written))
    assert copied == {cid for ids in rounds[1:] for cid in ids}


def test_a_restore_reads_the_cache_and_the_repository_where_the_cache_falls_short(repo: Repo, tmp_path: Path) -> None:
    """A restore on the machine that backs up reads its index cache (it holds every writer's
    entries); a cached copy that does not locate the snapshot's chunks (here: emptied) makes it
    read the repository's index objects instead, and the restore is whole."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "b.txt").write_bytes(b"b" * 1000)
    repo.backup(src)
    cache = next(Path(repo.env["XDG_CACHE_HOME"]).glob("**/index"))
    files = sorted(cache.iterdir())
    assert files
    target = tmp_path / "t1"
    cp = repo.ok("restore", "latest", "--target", target)
    assert "index cache" not in cp.stderr
    out = restored_path(target, src)
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()

    for f in files:  # every cached copy emptied (its signer kept): the cache locates nothing
        got = _decode_cached(f.read_bytes())
        f.write_bytes(_encode_cached(CachedIndex(got.signer, got.columns.select(lambda _pack: False))))
    target = tmp_path / "t2"
    cp = repo.ok("restore", "latest", "--target", target)
    assert "does not locate" in cp.stderr and "read from the repository" in cp.stderr, cp.stderr
    out = restored_path(target, src)
    for name in ("a.bin", "b.txt"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
