"""Repack (part of bunker prune): packs that are mostly garbage are copied, live blobs only, into
new packs with the put key; a move record says where their blobs went, and every reader of a pack
set follows it. Real local repository, real bunker processes."""

from __future__ import annotations

import os
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.repo.moves import PackMoves
from bunker.repo.objects import MAGIC_MOVED, name_for
from bunker.repo.records import make_retirement
from bunker.repo.repository import Repository
from bunker.storage.local import LocalBackend
from helpers import Repo, compare_trees, js, restored_path


def _pruner(repo: Repo, tmp_path: Path) -> tuple[Path, Repository, str]:
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    r = Repository.open(LocalBackend(str(repo.path)))
    return key, r, r.check_put_key(load_put_key(str(key))).name


def _prune(repo: Repo, key: Path, *args: str) -> dict[str, object]:
    doc: dict[str, object] = js(repo.ok("prune", "--put-key", key, "--json", "--grace", "0s", *args))
    return doc


def _retire(r: Repository, key: Path, cert: str, snap: str) -> str:
    record = make_retirement(f"snapshots/{snap}", "test: forgotten", load_put_key(str(key)).client_key, cert)
    name = name_for("retired", record)
    r.backend.put(name, record)
    return name


def _move_records(repo: Repo) -> list[Path]:
    return [p for p in repo.objects("gc") if p.read_bytes()[:4] == MAGIC_MOVED]


def _restore(repo: Repo, snap: str, src: Path, target: Path) -> None:
    js(repo.ok("restore", snap, "--target", target, "--json"))
    compare_trees(src, restored_path(target, src))


def _mixed_pack_history(repo: Repo, tmp_path: Path) -> tuple[Path, str, str]:
    """Snapshot 1 holds a 10 MiB file and a 2 MiB file in one data pack; snapshot 2 only the small
    one (deduplicated against that pack). Returns (source, snapshot 1, snapshot 2)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(10 << 20))
    (src / "small.bin").write_bytes(os.urandom(2 << 20))
    first = repo.backup(src)["snapshot"]
    (src / "big.bin").unlink()
    second = repo.backup(src)["snapshot"]
    return src, first, second


def test_mostly_garbage_pack_is_repacked_and_deleted(repo: Repo, tmp_path: Path) -> None:
    src, first, second = _mixed_pack_history(repo, tmp_path)
    key, r, cert = _pruner(repo, tmp_path)
    _retire(r, key, cert, first)

    dry = _prune(repo, key, "--dry-run")
    assert dry["repacked"] >= 1 and dry["repack_packs_written"] == 0
    assert _move_records(repo) == []

    one = _prune(repo, key)
    assert one["repacked"] >= 1 and one["repack_packs_written"] >= 1
    assert 2 << 20 <= one["repack_copied_bytes"] < 3 << 20  # the small file's blobs, not the big one's
    assert one["repack_frees_bytes"] >= 12 << 20
    moved = PackMoves.load(Repository.open(LocalBackend(str(repo.path))))
    old = sorted(moved.sources())
    assert old and all((repo.path / "packs" / p).exists() for p in old)
    _restore(repo, second, src, tmp_path / "t1")  # old and new packs both there

    two = _prune(repo, key)  # the move record is due: the old packs go
    assert two["repacked"] == 0  # the new pack is all live: no repack of a repack
    assert two["deleted"] >= len(old)
    assert not any((repo.path / "packs" / p).exists() for p in old)
    assert two["deleted_bytes"] >= 12 << 20
    assert len(_move_records(repo)) == 1  # snapshot 2 still names the old pack
    _restore(repo, second, src, tmp_path / "t2")
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    assert js(repo.ok("check", "--keyless", "--json"))["ok"] is True

    # a new backup deduplicates against the new pack, and restores
    (src / "more.bin").write_bytes(os.urandom(1 << 20))
    third = repo.backup(src)
    _restore(repo, third["snapshot"], src, tmp_path / "t3")

    # once no snapshot names the old pack any more, the move record goes too
    _retire(r, key, cert, second)
    last = _prune(repo, key)
    assert _move_records(repo) == [] and last["move_records_removed"] == 1
    _restore(repo, third["snapshot"], src, tmp_path / "t4")
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True


def test_repacked_pack_needed_again_is_rescued(repo: Repo, tmp_path: Path) -> None:
    """A snapshot that needs the garbage of a repacked pack (as one written by a backup that had
    deduplicated against it before the repack would) keeps that pack."""
    src, first, second = _mixed_pack_history(repo, tmp_path)
    key, r, cert = _pruner(repo, tmp_path)
    retired = _retire(r, key, cert, first)
    one = _prune(repo, key)
    assert one["repacked"] >= 1
    old = sorted(PackMoves.load(Repository.open(LocalBackend(str(repo.path)))).sources())

    r.backend.delete(retired)  # snapshot 1 is needed again, and it needs the big file's blobs
    two = _prune(repo, key)
    assert two["rescued"] >= 1
    assert all((repo.path / "packs" / p).exists() for p in old)
    assert not set(old) & PackMoves.load(Repository.open(LocalBackend(str(repo.path)))).sources()
    first_src = tmp_path / "first"
    first_src.mkdir()
    js(repo.ok("restore", first, "--target", first_src, "--json"))
    restored = restored_path(first_src, src)
    assert (restored / "big.bin").stat().st_size == 10 << 20
    assert (restored / "small.bin").read_bytes() == (src / "small.bin").read_bytes()
    _restore(repo, second, src, tmp_path / "t2")
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True


def test_repack_threshold_zero_disables_it(repo: Repo, tmp_path: Path) -> None:
    _, first, _ = _mixed_pack_history(repo, tmp_path)
    key, r, cert = _pruner(repo, tmp_path)
    _retire(r, key, cert, first)
    doc = _prune(repo, key, "--repack-threshold", "0")
    assert doc["repacked"] == 0 and _move_records(repo) == []
