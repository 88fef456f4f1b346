"""Mirrors (`bunker sync`, `bunker compare`) with the real CLI: keyless copies verified by name,
resumed after kill -9, to a local directory and to S3 (moto); compare names a withheld newest
snapshot; `sync --prune` deletes only what signed records justify, after the grace."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from helpers import (
    AWS_SCRUB,
    Repo,
    S3Server,
    b3,
    compare_trees,
    describe,
    flip_bit,
    init_repo,
    js,
    kill_run_when,
    make_env,
    make_tree,
    restored_path,
    run_bunker,
)


def _sync(
    repo: Repo,
    src: str | Path,
    dst: str | Path,
    *args: str,
    rc: int | tuple[int, ...] = 0,
    env: dict[str, str] | None = None,
) -> Any:
    """`bunker sync SRC DST --json ARGS`, its exit code required to be ``rc``; its JSON report."""
    cp = run_bunker("sync", src, dst, "--json", *args, env=env or repo.env)
    assert cp.returncode in ((rc,) if isinstance(rc, int) else rc), describe(cp)
    return js(cp)


def _compare(
    repo: Repo, a: str | Path, b: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_bunker("compare", a, b, "--json", env=env or repo.env)


def _names(root: Path) -> set[str]:
    """Every object name under a local repository directory (sessions/ aside)."""
    return {
        f"{d.name}/{f.name}"
        for d in root.iterdir()
        if d.is_dir() and d.name != "sessions"
        for f in d.iterdir()
        if not f.name.startswith(".")
    }


def test_sync_to_a_directory_check_restore_and_catch_up(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    mirror = tmp_path / "mirror"
    first = _sync(repo, repo.path, mirror)
    assert first["refused"] == [] and first["copied"] == len(_names(repo.path)), first
    assert not (mirror / "sessions").exists() or not any((mirror / "sessions").iterdir())
    assert (mirror / "RECOVERY.md").is_file()
    cp = _compare(repo, repo.path, mirror)
    assert cp.returncode == 0 and js(cp)["same"] is True, describe(cp)

    # the mirror stands on its own: keyless check, and a restore from it with the master key
    keyless = js(run_bunker("check", "--keyless", "--expect", repo.id, "--json", "--repo", mirror, env=repo.env))
    assert keyless["ok"] is True, keyless
    target = tmp_path / "restored"
    cp = run_bunker(
        "restore", "latest", "--target", target, "--repo", mirror, "--master-key", repo.master_key, env=repo.env
    )
    assert cp.returncode == 0, describe(cp)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)

    # a second backup: the next sync copies exactly the new objects
    (src / "new-file.bin").write_bytes(os.urandom(300_000))
    repo.backup(src)
    new = _names(repo.path) - _names(mirror)
    second = _sync(repo, repo.path, mirror)
    assert second["copied"] == len(new) and second["skipped"] == len(_names(repo.path)) - len(new), second

    # a mirror from which the newest snapshot was deleted (withheld) is named with client and number
    newest = max(repo.objects("snapshots"), key=lambda p: p.stat().st_mtime)
    (mirror / "snapshots" / newest.name).unlink()
    cp = _compare(repo, repo.path, mirror)
    assert cp.returncode == ExitCode.DIFFERENT, describe(cp)
    doc = js(cp)
    want = f"B lacks client 'testclient''s newest snapshot #2 (snapshots/{newest.name})"
    assert any(f.startswith(want) and "behind or withheld" in f for f in doc["findings"]), doc["findings"]
    assert doc["snapshots_only"]["a"] == [f"snapshots/{newest.name}"]
    assert doc["chains"][0]["a"]["seq"] == 2 and doc["chains"][0]["b"]["seq"] == 1
    # the other way round, A is the one behind
    cp = _compare(repo, mirror, repo.path)
    assert any(f.startswith("A lacks client 'testclient''s newest snapshot #2") for f in js(cp)["findings"])
    assert _sync(repo, repo.path, mirror)["copied"] == 1
    assert _compare(repo, repo.path, mirror).returncode == 0


def test_sync_to_s3(s3_server: S3Server, s3_prefix: str, repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    env = {k: v for k, v in repo.env.items() if k not in AWS_SCRUB}
    env.update(s3_server.env())
    url = s3_server.url(s3_prefix)
    doc = _sync(repo, repo.path, url, env=env)
    assert doc["copied"] == len(_names(repo.path)) and doc["refused"] == []
    cp = _compare(repo, repo.path, url, env=env)
    assert cp.returncode == 0, describe(cp)
    keyless = js(run_bunker("check", "--keyless", "--expect", repo.id, "--json", "--repo", url, env=env))
    assert keyless["ok"] is True, keyless
    assert _sync(repo, repo.path, url, env=env)["copied"] == 0


def test_killed_sync_resumes(repo: Repo, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):  # several packs (16 MiB each), so a kill lands between them
        (data / f"f{i}.bin").write_bytes(os.urandom(12 << 20))
    repo.backup(data)
    mirror = tmp_path / "mirror"

    def some_packs() -> bool:
        d = mirror / "packs"
        return d.is_dir() and any(not p.name.startswith(".") for p in d.iterdir())

    ended, err = kill_run_when("sync", repo.path, mirror, "--jobs", "1", env=repo.env, reached=some_packs, paced=True)
    assert ended is None, f"the sync ended by itself before it was killed: {err}"
    copied_before = _names(mirror)
    assert copied_before < _names(repo.path)
    # never a snapshot before the packs it needs
    assert not (mirror / "snapshots").is_dir() or not any((mirror / "snapshots").iterdir())
    doc = _sync(repo, repo.path, mirror)
    assert doc["copied"] == len(_names(repo.path) - copied_before) and doc["skipped"] == len(copied_before), doc
    assert _compare(repo, repo.path, mirror).returncode == 0


def test_altered_object_is_refused_and_named(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    pack = repo.objects("packs")[0]
    flip_bit(pack, 100)
    mirror = tmp_path / "mirror"
    cp = run_bunker("sync", repo.path, mirror, env=repo.env)
    assert cp.returncode == ExitCode.INTEGRITY, describe(cp)
    assert f"err: packs/{pack.name}: its bytes at the source" in cp.stdout
    assert "put back a good copy" in cp.stdout
    doc = _sync(repo, repo.path, mirror, rc=ExitCode.INTEGRITY)
    assert [r["object"] for r in doc["refused"]] == [f"packs/{pack.name}"]
    assert not (mirror / "packs" / pack.name).exists()
    cp = _compare(repo, repo.path, mirror)
    assert cp.returncode == ExitCode.DIFFERENT and js(cp)["only"]["a"]["packs"]["count"] == 1, describe(cp)

    # a snapshot altered in one copy is untrusted there, never counted as equal
    snap = repo.objects("snapshots")[0]
    flip_bit(mirror / "snapshots" / snap.name, 40)
    doc = js(_compare(repo, repo.path, mirror))
    assert [u["snapshot"] for u in doc["untrusted"]["b"]] == [f"snapshots/{snap.name}"], doc
    assert any("untrusted" in f and "not counted as equal" in f for f in doc["findings"])


def test_sync_prune_follows_signed_records_after_the_grace(repo: Repo, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "only-in-a.bin").write_bytes(os.urandom(1 << 20))
    (b / "only-in-b.bin").write_bytes(os.urandom(1 << 20))
    snap_a = repo.backup(a)["snapshot"]
    repo.backup(b)
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    mirror = tmp_path / "mirror"
    repo.ok("forget", snap_a, "--put-key", key)
    before = {p.name for p in repo.objects("packs")}
    repo.ok("prune", "--put-key", key, "--grace", "0s")  # condemns a's packs
    _sync(repo, repo.path, mirror)  # the mirror takes the packs and the records
    # an object no record names, put in the mirror by someone: it must stay
    stray = os.urandom(5000)
    (mirror / "packs" / b3(stray)).write_bytes(stray)
    repo.ok("prune", "--put-key", key, "--grace", "0s")  # deletes them at the source, then its record
    gone = before - {p.name for p in repo.objects("packs")}
    assert gone and repo.objects("gc") == []

    # default grace (24 h): the condemned packs wait
    doc = _sync(repo, repo.path, mirror, "--prune")
    waiting = {w["object"] for w in doc["prune"]["waiting"]}
    assert doc["prune"]["deleted"] == [] and {n for n in waiting if n.startswith("packs/")} == {
        f"packs/{p}" for p in gone
    }
    assert all((mirror / "packs" / p).exists() for p in gone)
    dry = _sync(repo, repo.path, mirror, "--prune", "--grace", "0s", "--dry-run")
    assert sorted(n for n in dry["prune"]["deleted"] if n.startswith("packs/")) == sorted(f"packs/{p}" for p in gone)
    assert all((mirror / "packs" / p).exists() for p in gone)

    doc = _sync(repo, repo.path, mirror, "--prune", "--grace", "0s")
    assert sorted(n for n in doc["prune"]["deleted"] if n.startswith("packs/")) == sorted(f"packs/{p}" for p in gone)
    assert not any((mirror / "packs" / p).exists() for p in gone)
    assert (mirror / "packs" / b3(stray)).read_bytes() == stray  # no record justifies deleting it
    assert f"packs/{b3(stray)}" in doc["kept"]["packs"]["examples"]
    # the retired snapshot's envelope stays at the source, so it stays in the mirror too
    assert any(p.name.startswith(snap_a) for p in (mirror / "snapshots").iterdir())

    # apart from the stray pack and the condemnation record the source deleted, the copies agree
    cp = _compare(repo, repo.path, mirror)
    assert cp.returncode == ExitCode.DIFFERENT
    only_b = js(cp)["only"]["b"]
    assert only_b["packs"]["examples"] == [f"packs/{b3(stray)}"], only_b
    # the index objects the source's prune replaced went too (a cache: no record needed)
    assert set(only_b) <= {"packs", "gc"}, only_b
    assert any(n.startswith("index/") for n in doc["prune"]["deleted"]), doc["prune"]
    assert "a" not in js(cp)["only"] or not js(cp)["only"]["a"]


def test_compare_refuses_two_different_repositories(repo: Repo, tmp_path: Path) -> None:
    other = init_repo(tmp_path / "other", env_extra={})
    cp = _compare(repo, repo.path, other.path, env=make_env(tmp_path / "home"))
    assert cp.returncode == ExitCode.DIFFERENT and "two different repositories" in cp.stderr, describe(cp)
    cp = run_bunker("sync", repo.path, other.path, env=repo.env)
    assert cp.returncode == ExitCode.BAD_REPOSITORY and "holds another repository" in cp.stderr, describe(cp)


def test_sync_prune_keeps_a_condemned_pack_a_snapshot_still_names(repo: Repo, tmp_path: Path) -> None:
    """A pack condemned once and needed again stays at the source; lost there later, the
    mirror's copy is the one that repairs it: a condemnation alone never deletes it."""
    from bunker.crypto.keyfile import load_put_key
    from bunker.repo.objects import content_hash
    from bunker.repo.records import make_condemnation

    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(1 << 20))
    repo.backup(src)
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    mirror = tmp_path / "mirror"
    _sync(repo, repo.path, mirror)
    packs = sorted(p.name for p in repo.objects("packs"))
    put = load_put_key(str(key))
    record = make_condemnation(packs, put.client_key, f"clients/{content_hash(put.certificate)}")
    (repo.path / "gc" / content_hash(record)).write_bytes(record)
    for p in packs:  # the source loses them (a disk fault), the snapshot still names them
        (repo.path / "packs" / p).unlink()
    doc = _sync(repo, repo.path, mirror, "--prune", "--grace", "0s", rc=(0, 1, 3, 14))
    assert doc["prune"]["deleted"] == [], doc["prune"]
    why = {w["object"]: w["why"] for w in doc["prune"]["waiting"]}
    assert set(why) == {f"packs/{p}" for p in packs} and all("still names it" in w for w in why.values()), why
    assert all((mirror / "packs" / p).exists() for p in packs)
