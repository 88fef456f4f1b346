"""Config versions form a hash chain; no reader goes below what it has seen (issue 10, point 5).

Before format 2, deleting the newest config silently undid a revocation (a warning at most), and
two configs with one version number were resolved by listing order. Now every reader keeps a
floor (this machine's state, and the put key's issue-time config), refuses a rollback, and a
fork of versions makes readers apply every branch's revocations and refuse writes until the
master key merges them."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import Repo, describe, init_repo, js, make_env, run_bunker


def _configs(repo: Repo) -> set[str]:
    return {p.name for p in repo.objects("config")}


def _client(repo: Repo, tmp_path: Path, name: str) -> tuple[Path, dict[str, str]]:
    key = tmp_path / f"{name}.put"
    repo.ok("key", "new-client", name, "--out", key)
    return key, make_env(tmp_path / f"{name}-home", BUNKER_PUT_KEY=str(key))


def test_a_config_rollback_is_refused(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    _, thief_env = _client(repo, tmp_path, "thief")
    repo.backup(src, env=thief_env)
    before = _configs(repo)
    repo.ok("key", "revoke", "thief")
    newer = _configs(repo) - before
    assert len(newer) == 1
    # a put key issued after the revocation carries the config it was issued under
    _, late_env = _client(repo, tmp_path, "late")

    # the storage deletes the newest config: the revocation is undone for whoever cannot tell
    saved = tmp_path / "saved-config"
    newest = newer.pop()
    shutil.move(repo.path / "config" / newest, saved)

    # this machine has seen the newer version: every command refuses, naming the rollback
    for args in (("backup", src), ("snapshots",), ("check", "--keyless", "--expect", repo.id)):
        cp = repo.run(*args)
        assert cp.returncode == 14, describe(cp)
        assert "rolled back" in (cp.stderr + cp.stdout), describe(cp)
    # a fresh machine with a put key issued after the revocation refuses too
    cp = repo.run("backup", src, env=late_env)
    assert cp.returncode == 14 and "the put key" in cp.stderr, describe(cp)
    # (a fresh machine whose key predates the revocation cannot tell: docs/security.md says so)

    # the config back in place: everything works, and the thief stays revoked
    shutil.move(saved, repo.path / "config" / newest)
    repo.backup(src)
    cp = repo.run("backup", src, env=thief_env)
    assert cp.returncode == 12 and "revoked" in cp.stderr, describe(cp)


def test_a_fork_of_config_versions_applies_both_revocations_until_merged(tmp_path: Path) -> None:
    """Two administrators revoke different clients from two copies of the repository; the
    copies' configs meet in one repository as two versions with one number."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    keys = {}
    for name in ("a", "b", "c"):
        keys[name], env = _client(repo, tmp_path, name)
        repo.backup(src, env=env)
    copy = tmp_path / "copy"
    shutil.copytree(repo.path, copy)
    admin2 = make_env(tmp_path / "admin2")
    before = _configs(repo)
    repo.ok("key", "revoke", "a")
    run_bunker("key", "revoke", "b", "--repo", copy, "--master-key", repo.master_key, env=admin2)
    (theirs,) = {p.name for p in (copy / "config").iterdir()} - before
    shutil.copy(copy / "config" / theirs, repo.path / "config" / theirs)

    # both revocations apply
    rows = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert {r["client"] for r in rows if not r["trusted"]} == set()  # their snapshots predate the revocations
    for name in ("a", "b"):
        cp = repo.run("backup", src, "--put-key", keys[name])
        assert cp.returncode in (12, 14), describe(cp)
    # writes wait for the merge, reads go on
    cp = repo.run("backup", src, "--put-key", keys["c"])
    assert cp.returncode == 14 and "merge-configs" in cp.stderr, describe(cp)
    doc = js(repo.run("check", "--keyless", "--expect", repo.id, "--json"))
    assert any("forked" in p["problem"] for p in doc["problems"]), doc
    repo.ok("snapshots")

    doc = js(repo.ok("key", "merge-configs", "--json"))
    assert theirs in " ".join(doc["merged"]) or len(doc["merged"]) == 1
    repo.backup(src, args=("--put-key", str(keys["c"])))
    for name in ("a", "b"):
        cp = repo.run("backup", src, "--put-key", keys[name])
        assert cp.returncode == 12 and "revoked" in cp.stderr, describe(cp)
    assert js(repo.run("check", "--keyless", "--expect", repo.id, "--json"))["ok"] is True


def test_a_lost_config_version_is_replaced_by_the_master_key(repo: Repo, tmp_path: Path) -> None:
    """No copy holds the deleted version: the master key's holder writes one above it (and is
    told to revoke again what the lost version revoked)."""
    src = tmp_path / "src"
    src.mkdir()
    _, thief_env = _client(repo, tmp_path, "thief")
    before = _configs(repo)
    repo.ok("key", "revoke", "thief")
    (lost,) = _configs(repo) - before
    (repo.path / "config" / lost).unlink()
    cp = repo.run("backup", src)
    assert cp.returncode == 14 and "merge-configs" in cp.stderr, describe(cp)
    doc = js(repo.ok("key", "merge-configs", "--json"))
    assert doc["lost"] == f"config/{lost}" and doc["config_version"] == 3
    repo.backup(src)
    # the lost version's revocation must be made again: the repository could not know it
    repo.backup(src, env=thief_env)
    repo.ok("key", "revoke", "thief")
    cp = repo.run("backup", src, env=thief_env)
    assert cp.returncode == 12, describe(cp)
