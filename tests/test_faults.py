"""Storage faults injected below a real local repository (tests/faults.py): the storage going
away in the middle of a backup or of a forward, slow requests, torn writes that the storage
acknowledged, and listings that miss fresh objects (eventual consistency) while prune races
backups. Nothing acknowledged is lost, and the run's level says what happened. (A full disk:
test_enospc.py; power loss: test_power_loss.py.)"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bunker.backup.run import BackupRequest, run_backup
from bunker.crypto.keyfile import load_put_key
from bunker.errors import CorruptObject, StorageError
from bunker.node.forward import forward
from bunker.node.spool import Spool, spooling_repository
from bunker.repo import leases
from bunker.repo.gc import Pruner
from bunker.repo.leases import sessions
from bunker.repo.objects import name_for
from bunker.repo.records import make_retirement
from bunker.repo.repository import Repository
from bunker.storage.local import LocalBackend
from faults import FaultPlan, FaultyBackend
from helpers import Repo, compare_trees, init_repo, js, make_tree, restored_path, snapshot_tree


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
    # the confirmed objects are packs (they go first), whose local copies stay until the
    # snapshot that needs them is up: a prune may delete packs nothing upstream names yet
    assert set(left) == set(waiting) and outcome.committed.name in left
    assert any((repo.path / n).exists() for n in waiting if n.startswith("packs/"))

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


# listings that miss fresh objects for W seconds; prune's grace must exceed it (docs: the grace
# must exceed twice the storage's listing delay plus the longest backup run)
LIST_DELAY = 0.4
GRACE = 4.0


def test_eventually_consistent_listing_with_prune_racing_backups(setup: tuple[Repo, Path], tmp_path: Path) -> None:
    """A listing omits objects younger than W (gets and stats see them): fresh snapshots, leases,
    gc records and index objects are invisible to prune and to backups for a while. A prune loop
    (grace > W) runs against backups whose content comes and goes, and snapshots are forgotten
    so that packs are condemned and deleted while later backups may deduplicate against them.
    Every snapshot not forgotten restores byte-identical and the repository checks clean."""
    repo, src = setup
    prune_key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", prune_key)
    put, pput = load_put_key(str(repo.put_key)), load_put_key(str(prune_key))
    faulty = FaultyBackend(LocalBackend(str(repo.path)), FaultPlan(list_delay=LIST_DELAY))
    rng = random.Random(5)
    pool = {f"pool-{i}.bin": rng.randbytes(150_000) for i in range(6)}  # content that comes back

    errors: list[str] = []
    done = threading.Event()
    pruned: list[Any] = []

    def pruner() -> None:
        while not done.is_set():
            try:
                pruned.append(Pruner(Repository.open(faulty), pput, grace=GRACE).run())
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(f"prune: {exc!r}")
                return
            time.sleep(0.05)

    expected: dict[str, dict[bytes, tuple[Any, ...]]] = {}
    live: list[str] = []
    levels = set()
    thread = threading.Thread(target=pruner)
    thread.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < 14 and not errors:
            for p in src.glob("pool-*.bin"):
                p.unlink()
            for name in rng.sample(sorted(pool), 2):
                (src / name).write_bytes(pool[name])
            (src / "new.bin").write_bytes(rng.randbytes(rng.randrange(1, 200_000)))
            outcome = run_backup(Repository.open(faulty), put, BackupRequest(paths=[str(src)]))
            levels.add(outcome.log.level)
            snap = outcome.committed.name.split("/", 1)[1]
            expected[snap] = snapshot_tree(src, dir_mtimes=False)
            live.append(snap)
            if len(live) > 2:  # forget the oldest: its packs become garbage unless content comes back
                old = live.pop(0)
                r = Repository.open(faulty)
                record = make_retirement(
                    f"snapshots/{old}", "test: forgotten", pput.client_key, r.check_put_key(pput).name
                )
                faulty.put(name_for("retired", record), record)
                del expected[old]
            time.sleep(LIST_DELAY)  # the client's own last snapshot is listed again (chain head)
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert levels <= {"ok", "note"}, levels
    assert faulty.hidden > 0  # the listings did miss fresh objects
    assert len(pruned) >= 3 and sum(len(r.deleted) for r in pruned) >= 1  # packs were really deleted
    assert sum(len(r.condemned) for r in pruned) >= 1

    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    for snap, state in expected.items():
        target = tmp_path / "restored" / snap
        doc = js(repo.ok("restore", snap, "--target", target, "--json"))
        assert doc["stats"]["failed"] == 0
        assert snapshot_tree(restored_path(target, src), dir_mtimes=False) == state, snap


def test_a_session_stays_listed_until_its_snapshot_is(
    setup: tuple[Repo, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With listings that miss objects younger than W, a watcher that lists as a prune does must
    see, at every moment after the backup's lease first shows, the lease or the new snapshot:
    never neither (a prune would then take the session for gone while its snapshot is not
    visible, and delete packs the snapshot needs). A run waits a moment at its end for its
    snapshot to be listed; if it is not (here: the wait is off), the lease stays to expire,
    without a checkpoint, so nobody turns the completed run into an incomplete snapshot."""
    repo, src = setup
    delay = 0.5
    faulty = FaultyBackend(LocalBackend(str(repo.path)), FaultPlan(list_delay=delay))
    put = load_put_key(str(repo.put_key))
    (src / "more.bin").write_bytes(os.urandom(6 << 20))

    def watched_backup() -> tuple[Any, list[float]]:
        before = {i.name for i in faulty.list("snapshots/")} | {i.name for i in faulty.inner.list("snapshots/")}
        seen_session = False
        gaps: list[float] = []
        done = threading.Event()

        def watch() -> None:
            nonlocal seen_session
            while not done.is_set():
                leases = list(faulty.list("sessions/"))
                snaps = {i.name for i in faulty.list("snapshots/")} - before
                if leases:
                    seen_session = True
                elif seen_session and not snaps:
                    gaps.append(time.monotonic())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            outcome = run_backup(Repository.open(faulty), put, BackupRequest(paths=[str(src)], checkpoint_seconds=0.05))
            time.sleep(2 * delay)
        finally:
            done.set()
            watcher.join()
        assert seen_session
        return outcome, gaps

    # the run waits until its snapshot is listed, then removes its lease
    outcome, gaps = watched_backup()
    assert gaps == [], f"{len(gaps)} listings showed neither the session nor its snapshot"
    assert sessions(Repository.open(faulty)) == []

    monkeypatch.setattr(leases, "LISTING_WAIT", 0.0)
    (src / "more.bin").write_bytes(os.urandom(6 << 20))
    outcome, gaps = watched_backup()
    assert gaps == [], f"{len(gaps)} listings showed neither the session nor its snapshot"
    left, claim = sorted(sessions(Repository.open(faulty)), key=lambda s: s.kind != "backup")
    assert left.checkpoint is None and left.alive(time.time())
    # so does the claim of its sequence number (repo/claims.py): until the snapshot is listed, a
    # run elsewhere could otherwise take the same number
    assert claim.kind == "claim" and claim.checkpoint is None
    after = run_backup(Repository.open(faulty), put, BackupRequest(paths=[str(src)]))
    assert not [e for e in after.log.events if e.code.startswith("incomplete")]
