"""The client's index (repo/index_cache.py) read from real repositories: an index object a
prune rewrote between the listing and the read is not reported as damage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.repo.index_cache import IndexCache
from bunker.repo.repository import Repository
from bunker.storage.backend import ObjectInfo
from bunker.storage.local import LocalBackend
from helpers import Repo


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
