"""bunker prune: two-phase GC with leases, against a real local repository and real (killed)
backup processes. Lease ages are the storage's own object times: the tests age a dead session's
lease files with utime, which is what the storage clock would show after the wait."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.errors import ExitCode
from bunker.repo.objects import name_for
from bunker.repo.records import make_retirement
from bunker.repo.repository import Repository
from bunker.storage.local import LocalBackend
from helpers import BUNKER, Repo, compare_trees, js, make_env, make_tree, restored_path


def _pruner(repo: Repo, tmp_path: Path) -> Path:
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    return key


def _prune(repo: Repo, key: Path, *args: str, rc: int = 0) -> dict[str, object]:
    doc: dict[str, object] = js(repo.ok("prune", "--put-key", key, "--json", *args, rc=rc))
    return doc


def _killed_backup(repo: Repo, path: Path) -> set[str]:
    """Start a backup of ``path`` and kill -9 it once it uploaded a pack; returns the new packs."""
    before = {p.name for p in repo.objects("packs")}
    proc = subprocess.Popen(
        [BUNKER, "backup", "--repo", str(repo.path), "--no-progress", str(path)],
        env=repo.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            new = {p.name for p in repo.objects("packs")} - before
            if new:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    new = {p.name for p in repo.objects("packs")} - before
    assert new, "the killed backup uploaded no pack"
    return new


def _age_sessions(repo: Repo, seconds: float) -> None:
    """Make every lease look ``seconds`` old to the storage (a dead session's last refresh)."""
    for p in repo.objects("sessions"):
        t = time.time() - seconds
        os.utime(p, (t, t))


def _two_sources(repo: Repo, tmp_path: Path, size_a: int) -> tuple[Path, Path, str]:
    """Directories a (one file of ``size_a`` bytes) and b (1 MiB) backed up one after the other,
    sharing no data; returns them and a's snapshot id."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "only-in-a.bin").write_bytes(os.urandom(size_a))
    (b / "only-in-b.bin").write_bytes(os.urandom(1 << 20))
    snap_a = repo.backup(a)["snapshot"]
    repo.backup(b)
    return a, b, snap_a


def test_prune_needs_the_prune_capability(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    cp = repo.run("prune", "--json")
    assert cp.returncode == ExitCode.KEY_MISSING
    assert "--prune" in cp.stderr and "nothing was deleted" in cp.stderr


def test_killed_backup_garbage_is_condemned_then_deleted(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(48 << 20))
    orphans = _killed_backup(repo, big)
    key = _pruner(repo, tmp_path)

    dry = _prune(repo, key, "--grace", "0s", "--dry-run")
    assert dry["condemned"] >= len(orphans) and repo.objects("gc") == []

    first = _prune(repo, key, "--grace", "0s")
    assert first["condemned"] >= len(orphans) and first["deleted"] == 0
    assert len(repo.objects("gc")) == 1

    # a backup after the condemnation never deduplicates against the condemned packs (from
    # another machine: this one's next backup would clear its own killed session at once)
    other = tmp_path / "other.put"
    repo.ok("key", "new-client", "other", "--out", other)
    again = repo.backup(big, env=make_env(tmp_path / "other-home", BUNKER_PUT_KEY=str(other)))
    assert again["stats"]["stored_new"] >= 40 << 20

    # the killed session's lease is still fresh: its packs wait for it
    second = _prune(repo, key, "--grace", "0s")
    assert second["deleted"] == 0 and second["waiting"]
    assert "still running" in second["waiting"][0]["reason"]  # type: ignore[index]
    assert all((repo.path / "packs" / p).exists() for p in orphans)

    _age_sessions(repo, 3600)  # the killed session's lease expired
    third = _prune(repo, key, "--grace", "0s")
    assert third["deleted"] >= len(orphans) and third["waiting"] == []
    assert not any((repo.path / "packs" / p).exists() for p in orphans)
    assert repo.objects("gc") == [] and repo.objects("sessions") == []

    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    for snap, path in ((again["snapshot"], big), ("latest", big)):
        target = tmp_path / f"t-{snap[:6]}"
        # on this machine `latest` is its own client's unless told otherwise (issue 11 point 11)
        js(repo.ok("restore", snap, "--target", target, "--json", "--client", "other"))
        assert restored_path(target, path).read_bytes() == big.read_bytes()


def test_grace_period_delays_deletion(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 << 20))
    _killed_backup(repo, big)
    _age_sessions(repo, 3600)
    key = _pruner(repo, tmp_path)
    first = _prune(repo, key)  # default grace: 24 h
    assert first["condemned"] >= 1
    second = _prune(repo, key)
    assert second["deleted"] == 0 and "grace period" in second["waiting"][0]["reason"]  # type: ignore[index]
    (rec,) = repo.objects("gc")
    t = time.time() - 25 * 3600
    os.utime(rec, (t, t))  # the storage stored the record 25 h ago
    third = _prune(repo, key)
    assert third["deleted"] >= 1 and repo.objects("gc") == []
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True


def test_forgotten_data_goes_and_a_needed_pack_is_rescued(repo: Repo, tmp_path: Path) -> None:
    """Packs only a retired snapshot needs are condemned; if a snapshot names one again by the
    time of deletion (a backup that had deduplicated against it finished), it is kept."""
    a, b, snap_a = _two_sources(repo, tmp_path, 3 << 20)
    key = _pruner(repo, tmp_path)
    put = load_put_key(str(key))
    r = Repository.open(LocalBackend(str(repo.path)))
    cert = r.check_put_key(put)
    record = make_retirement(f"snapshots/{snap_a}", "test: forgotten", put.client_key, cert.name)
    retired = name_for("retired", record)
    r.backend.put(retired, record)

    first = _prune(repo, key, "--grace", "0s")
    assert first["condemned"] >= 1
    r.backend.delete(retired)  # snapshot a is needed again before the deletion is due
    second = _prune(repo, key, "--grace", "0s")
    assert second["rescued"] >= 1 and second["deleted"] == 0 and repo.objects("gc") == []
    target = tmp_path / "ta"
    js(repo.ok("restore", snap_a, "--target", target, "--json"))
    compare_trees(a, restored_path(target, a))

    r.backend.put(retired, record)  # forgotten for good
    _prune(repo, key, "--grace", "0s")
    third = _prune(repo, key, "--grace", "0s")
    assert third["deleted"] >= 1 and third["deleted_bytes"] >= 3 << 20
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    target = tmp_path / "tb"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    compare_trees(b, restored_path(target, b))


def test_garbage_whose_chunks_another_pack_holds_too_is_condemned(repo: Repo, tmp_path: Path) -> None:
    """A pack that holds only chunks another pack holds too (stored again by a run that did not
    know the other copy: killed before its index was written, or beside a condemnation) goes
    once nothing needs it. The index locates each chunk in one pack only, and prune used to
    condemn only the packs it located: such a copy stayed for ever (or, once the other copy
    was deleted, was condemned by the prune after that one)."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "data.bin").write_bytes(os.urandom(3 << 20))
    repo.backup(a)
    index, hidden = repo.path / "index", tmp_path / "hidden-index"
    hidden.mkdir()
    for p in index.iterdir():  # a run that does not know where the first copy is
        p.rename(hidden / p.name)
    before = {p.name for p in repo.objects("packs")}
    other = tmp_path / "other.put"
    repo.ok("key", "new-client", "other", "--out", other)
    copy = repo.backup(a, env=make_env(tmp_path / "other-home", BUNKER_PUT_KEY=str(other)))
    assert copy["stats"]["stored_new"] >= 3 << 20
    copies = {p.name for p in repo.objects("packs")} - before
    # its index objects are gone (as if it was killed before it wrote them); the first run's are back
    for p in index.iterdir():
        p.unlink()
    for p in hidden.iterdir():
        p.rename(index / p.name)
    key = _pruner(repo, tmp_path)
    put = load_put_key(str(key))
    r = Repository.open(LocalBackend(str(repo.path)))
    record = make_retirement(
        f"snapshots/{copy['snapshot']}", "test: forgotten", put.client_key, r.check_put_key(put).name
    )
    r.backend.put(name_for("retired", record), record)

    first = _prune(repo, key, "--grace", "0s")
    assert first["condemned"] >= len(copies)
    second = _prune(repo, key, "--grace", "0s")
    assert second["condemned"] == 0 and second["waiting"] == [], second
    assert not any((repo.path / "packs" / p).exists() for p in copies) and repo.objects("gc") == []
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    compare_trees(a, restored_path(target, a))


def test_index_entries_of_vanished_packs_are_dropped(repo: Repo, tmp_path: Path) -> None:
    """An index object naming packs that are gone (left by a killed prune, or missed by a rewrite)
    only misleads: check reports it, and the next prune writes it anew without those entries."""
    a, b, snap_a = _two_sources(repo, tmp_path, 1 << 20)
    index_before = {p.name: p.read_bytes() for p in repo.objects("index")}
    key = _pruner(repo, tmp_path)
    put = load_put_key(str(key))
    r = Repository.open(LocalBackend(str(repo.path)))
    record = make_retirement(f"snapshots/{snap_a}", "test: forgotten", put.client_key, r.check_put_key(put).name)
    r.backend.put(name_for("retired", record), record)
    _prune(repo, key, "--grace", "0s", "--repack-threshold", "0")
    second = _prune(repo, key, "--grace", "0s", "--repack-threshold", "0")
    assert second["deleted"] >= 1
    # a stale copy of an index object comes back, as a prune killed at the wrong moment would leave
    stale = [n for n in index_before if not (repo.path / "index" / n).exists()]
    assert stale
    for n in stale:
        p = repo.path / "index" / n
        p.write_bytes(index_before[n])
        os.utime(p, (time.time() - 60, time.time() - 60))
    bad = js(repo.ok("check", "--json", rc=14))
    assert any("missing" in x["problem"] for x in bad["problems"])
    third = _prune(repo, key, "--grace", "0s")
    assert third["indexes_rewritten"] >= 1
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    compare_trees(b, restored_path(target, b))
