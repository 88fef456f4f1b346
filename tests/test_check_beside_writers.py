"""`bunker check` beside backups and prunes (issue 11, point 8): objects that a prune deletes
(condemned packs, index objects it writes anew, its records) and leases that end between the
check's listing and its reading are no damage, nor is a snapshot written while the check runs.
The check runs in-process on a backend that runs a real prune and a real backup at the moment
it finishes listing the packs, and ends a session once the check has listed the leases."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bunker.crypto.keyfile import load_master_key, load_put_key
from bunker.repo import agreed_copies
from bunker.repo.check import Checker
from bunker.repo.gc import Pruner
from bunker.repo.leases import Lease
from bunker.repo.repository import Repository
from bunker.storage.backend import ObjectInfo
from bunker.storage.local import LocalBackend
from helpers import PASSPHRASE, Repo, init_repo, js, make_tree


class Meanwhile(LocalBackend):
    """A local repository where something happens right after a listing of a prefix."""

    def __init__(self, root: str, hooks: dict[tuple[str, int], Callable[[], None]]) -> None:
        super().__init__(root)
        self.hooks = hooks  # (prefix, n-th listing of it) -> what happens after that listing
        self.calls: dict[str, int] = {}

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        found = list(super()._list(prefix))
        self.calls[prefix] = self.calls.get(prefix, 0) + 1
        hook = self.hooks.get((prefix, self.calls[prefix]))
        if hook is not None:
            hook()
        yield from found


@pytest.mark.parametrize("mode", ["keyless", "put-key", "read-data", "put-key-table"])
def test_check_beside_a_prune_a_backup_and_an_ending_session_reports_no_damage(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(put-key-table: where index entries place chunks is kept in the table a check of a large
    repository uses, repo/agreed_copies.py, also for what the second listing adds.)"""
    if mode == "put-key-table":
        monkeypatch.setattr(agreed_copies, "LARGE", 1)
        mode = "put-key"
    repo: Repo = init_repo(tmp_path / "r")
    prune_key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", prune_key)
    first = tmp_path / "first"
    first.mkdir()
    (first / "only-in-the-first.bin").write_bytes(os.urandom(3_000_000))
    gone = repo.backup(first)["snapshot"]
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    repo.ok("forget", gone, "--put-key", prune_key)
    pruned = js(repo.ok("prune", "--put-key", prune_key, "--grace", "0s", "--repack-threshold", "0", "--json"))
    assert pruned["condemned"], pruned  # the first snapshot's own packs wait for the next prune

    put, pput = load_put_key(str(repo.put_key)), load_put_key(str(prune_key))
    deleted: list[str] = []
    ended: list[str] = []
    other = Repository.open(LocalBackend(str(repo.path)))
    lease = Lease(other, put.client_key, other.check_put_key(put).client, other.check_put_key(put).name, "backup")

    def prune_and_back_up() -> None:
        # the check has listed the packs: a prune deletes the condemned ones (and writes index
        # objects anew without them), and a backup stores a new snapshot with new packs
        report = Pruner(Repository.open(LocalBackend(str(repo.path))), pput, grace=0.0, repack_threshold=0.0).run()
        deleted.extend(report.deleted)
        (src / "during-the-check.bin").write_bytes(os.urandom(1_000_000))
        repo.backup(src)
        lease.write()  # a session that starts now ...

    def session_ends() -> None:
        # ... and ends once the check has listed it, before the check reads it
        ended.extend(p.name for p in (repo.path / "sessions").iterdir() if not p.name.startswith("."))
        lease.release()

    backend = Meanwhile(str(repo.path), {("packs/", 1): prune_and_back_up, ("sessions/", 2): session_ends})
    master = load_master_key(str(repo.master_key), PASSPHRASE) if mode == "read-data" else None
    checker = Checker(backend, repo.id, secrets=None if mode == "keyless" else put.secrets, master=master)
    report = checker.run(keyless=mode == "keyless")
    assert deleted and ended, "nothing happened beside the check"
    assert [p.to_json() for p in report.problems] == []
    assert report.counts["vanished_while_checking"] >= len(deleted)
    # and the repository really is whole
    args = ("--keyless", "--expect", repo.id) if mode == "keyless" else ("--read-data",) if master else ()
    assert js(repo.ok("check", *args, "--json"))["ok"] is True


def test_a_pack_a_live_snapshot_needs_that_vanishes_while_checking_is_reported(tmp_path: Path) -> None:
    """Not everything that vanishes is a prune's doing: a pack a live snapshot needs is damage."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    victim = max(repo.objects("packs"), key=lambda p: p.stat().st_size)
    backend = Meanwhile(str(repo.path), {("packs/", 1): victim.unlink})
    put = load_put_key(str(repo.put_key))
    report = Checker(backend, repo.id, secrets=put.secrets).run(keyless=False)
    problems = [p.problem for p in report.problems]
    assert any(f"packs/{victim.name}" in p and "missing" in p for p in problems), problems
    assert not report.ok
