"""Storage faults injected below a real local repository (tests/faults.py): the storage going
away in the middle of a backup or of a forward, slow requests, and torn writes that the storage
acknowledged. Nothing acknowledged is lost, and the run's level says what happened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bunker.backup.run import BackupRequest, run_backup
from bunker.crypto.keyfile import load_put_key
from bunker.errors import CorruptObject, StorageError
from bunker.node.forward import forward
from bunker.node.spool import Spool, spooling_repository
from bunker.repo.repository import Repository
from bunker.storage.local import LocalBackend
from faults import FaultPlan, FaultyBackend
from helpers import Repo, compare_trees, init_repo, js, make_tree, restored_path


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Repo, Path]:
    """A repository made by the CLI, this process's XDG directories pointing at its keys and
    state, and one CLI backup taken (which seeds the spool)."""
    repo = init_repo(tmp_path / "r")
    for k in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(k, repo.env[k])
    src = tmp_path / "src"
    make_tree(src)
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    repo.backup(src / "big.bin")
    return repo, src


def _open(repo: Repo, plan: FaultPlan) -> tuple[FaultyBackend, Repository]:
    faulty = FaultyBackend(LocalBackend(str(repo.path)), plan)
    return faulty, Repository.open(faulty)


def _pending(repo: Repo) -> list[str]:
    return [i.name for i in Spool(str(repo.path)).pending()]


def test_storage_gone_mid_backup_then_forward(setup: tuple[Repo, Path], tmp_path: Path) -> None:
    repo, src = setup
    put = load_put_key(str(repo.put_key))
    # slow requests, then the storage goes away after the first pack of the run
    faulty, upstream = _open(repo, FaultPlan(fail_after=1, match="packs/", delay=0.002))
    spool = Spool(str(repo.path))
    outcome = run_backup(spooling_repository(upstream, spool), put, BackupRequest(paths=[str(src)]))
    assert faulty.down and any("storage gone" in f for f in faulty.log)
    codes = {e.code: e.level for e in outcome.log.events}
    assert codes.get("spooled") == "note" and outcome.log.level == "note"
    assert outcome.committed.level == "note"  # the snapshot's own log says so too
    waiting = _pending(repo)
    assert any(n.startswith("packs/") for n in waiting) and f"{outcome.committed.name}" in waiting

    # the storage comes back; forward is interrupted by it going away again after two objects
    faulty, upstream = _open(repo, FaultPlan(fail_after=2))
    with pytest.raises(StorageError):
        forward(spool, upstream, put)
    left = _pending(repo)
    assert 0 < len(left) < len(waiting) and outcome.committed.name in left  # confirmed ones are gone
    assert set(left) <= set(waiting)

    fwd = js(repo.ok("forward", "--json"))
    assert fwd["left"] == 0 and fwd["snapshots"] == [outcome.committed.name.split("/", 1)[1]]
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    rdoc = js(repo.ok("restore", "latest", "--target", tmp_path / "t", "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(tmp_path / "t", src))


def test_torn_upstream_write_is_caught_and_sent_again(setup: tuple[Repo, Path], tmp_path: Path) -> None:
    """The storage acknowledges a put of a pack but keeps half of it: forward reads every object
    back before it deletes the local copy, so the pack stays in the spool and the snapshot is
    not delivered; the next forward replaces the torn object."""
    repo, src = setup
    put = load_put_key(str(repo.put_key))
    away = tmp_path / "away"
    repo.path.rename(away)
    offline = repo.backup(src)
    assert offline["spooled"]
    away.rename(repo.path)
    spool = Spool(str(repo.path))
    faulty, upstream = _open(repo, FaultPlan(torn=lambda name: name.startswith("packs/")))
    with pytest.raises(CorruptObject) as caught:
        forward(spool, upstream, put)
    assert "does not return what was just sent" in caught.value.message
    assert any(f.startswith("torn packs/") for f in faulty.log)
    assert f"snapshots/{offline['snapshot']}" in _pending(repo)
    torn = [f.split(" ", 1)[1] for f in faulty.log if f.startswith("torn ")]
    assert all(n in _pending(repo) for n in torn)  # the good copies are still here

    fwd = js(repo.ok("forward", "--json"))
    assert fwd["left"] == 0 and fwd["snapshots"] == [offline["snapshot"]]
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    rdoc = js(repo.ok("restore", "latest", "--target", tmp_path / "t", "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(tmp_path / "t", src))


def test_damaged_spool_object_is_not_forwarded(setup: tuple[Repo, Path], tmp_path: Path) -> None:
    """A spool object whose bytes no longer match its name (this machine's disk) is reported and
    never sent; the snapshot that needs it is repaired from the source files like one whose pack
    vanished upstream, and arrives complete."""
    repo, src = setup
    away = tmp_path / "away"
    repo.path.rename(away)
    (src / "fresh.bin").write_bytes(os.urandom(200_000))
    offline = repo.backup(src)
    away.rename(repo.path)
    spool_root = Path(Spool(str(repo.path)).root)
    pack = max((spool_root / "packs").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[100] ^= 1
    pack.write_bytes(bytes(data))
    cp = repo.ok("forward", "--json", rc=3)
    fwd = js(cp)
    assert fwd["damaged"] == [f"packs/{pack.name}"] and "was damaged" in cp.stderr
    assert not (repo.path / "packs" / pack.name).exists() and not pack.exists()
    (fix,) = fwd["repaired"]
    assert fix["was"] == offline["snapshot"] and fix["complete"] and fwd["snapshots"] == [fix["snapshot"]]
    assert fwd["left"] == 0
    rdoc = js(repo.ok("restore", fix["snapshot"], "--target", tmp_path / "t", "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(tmp_path / "t", src))
