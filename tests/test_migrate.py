"""`bunker migrate`: a repository made by the last format-1 bunker (tests/fixtures) becomes format
2 without rewriting data; its chains stay trusted exactly as recorded (issue 10, "Format version
and migration")."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from bunker.crypto.keyfile import load_put_key
from bunker.repo.objects import name_for
from bunker.repo.snapshot import make_snapshot, parse_snapshot
from helpers import Repo, describe, js, make_env, restored_path

FIXTURE = Path(__file__).parent / "fixtures" / "v1-repository.tar.gz"


@pytest.fixture
def v1(tmp_path: Path) -> tuple[Repo, dict[str, Any]]:
    base = tmp_path / "v1"
    base.mkdir()
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(base, filter="data")
    manifest = json.loads((base / "manifest.json").read_text())
    env = make_env(base / "home", manifest["passphrase"], BUNKER_MASTER_KEY=str(base / "master.key"))
    repo = Repo(base / "repo", env, manifest["repo_id"], base / "master.key", base / "alpha.put", base, "alpha")
    return repo, manifest


def _by_prefix(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"][:12]: r for r in rows}


def test_a_format_1_repository_is_refused_until_migrated(v1: tuple[Repo, dict[str, Any]]) -> None:
    repo, _ = v1
    for args in (("snapshots",), ("backup", repo.base / "src", "--put-key", repo.base / "alpha.put")):
        cp = repo.run(*args)
        assert cp.returncode == 15, describe(cp)
        assert "format version 1" in cp.stderr and "bunker migrate --repo" in cp.stderr


def test_migration_keeps_the_recorded_chains_trusted(v1: tuple[Repo, dict[str, Any]], tmp_path: Path) -> None:
    repo, manifest = v1
    before = {p.relative_to(repo.path) for p in repo.all_files()} - {Path("FORMAT.md"), Path("RECOVERY.md")}

    dry = js(repo.ok("migrate", "--dry-run", "--json"))
    beta = next(c for c in dry["clients"] if c["client"] == "beta")
    assert beta["heads"] == [] and len(beta["fork_branches"]) == 2
    cp = repo.run("migrate")
    assert cp.returncode == 2 and "--pick" in cp.stderr and "beta" in cp.stderr, describe(cp)
    assert {p.relative_to(repo.path) for p in repo.all_files()} >= before  # nothing written but docs

    doc = js(repo.ok("migrate", "--pick", "beta=c4b1d360", "--json"))
    assert doc["config_version"] == 3
    after = {p.relative_to(repo.path) for p in repo.all_files()}
    assert before <= after and len(after - before) <= 3  # one config, and the two documents

    rows = _by_prefix(js(repo.ok("snapshots", "--json"))["snapshots"])
    for short, want in manifest["snapshots"].items():
        trusted = not want.get("untrusted") and short != "55c69431c84e"
        assert rows[short]["trusted"] is trusted, (short, rows[short])
        if not trusted:
            continue
        target = tmp_path / f"t-{short}"
        repo.ok("restore", short, "--target", target)
        src = Path("/tmp/v1fix/b/src") / {"alpha": "alpha", "beta": "beta", "gamma": "gamma"}[want["client"]]
        for fname, text in want["files"].items():
            assert restored_path(target, src / fname).read_text() == text
        shutil.rmtree(target)

    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json")
    assert cp.returncode == 0, describe(cp)
    warns = {p["object"][10:22] for p in js(cp)["problems"] if p["object"].startswith("snapshots/")}
    assert warns == {"55c69431c84e", "c46e79ebf817"}

    # alpha's old put key continues its chain in format 2; gamma stays revoked
    src = repo.base / "src" / "alpha"
    new = repo.backup(src, args=("--put-key", str(repo.base / "alpha.put")))
    assert new["seq"] == 4
    env = parse_snapshot((repo.path / "snapshots" / new["snapshot"]).read_bytes()).env
    assert env.version == 2 and env.prev.startswith("snapshots/7e13659b189e")
    cp = repo.run("backup", src, "--put-key", repo.base / "gamma.put")
    assert cp.returncode == 12, describe(cp)
    assert js(repo.run("check", "--keyless", "--expect", repo.id, "--json"))["ok"] is True


def test_format_1_envelopes_cannot_join_after_migration(v1: tuple[Repo, dict[str, Any]], tmp_path: Path) -> None:
    """The re-signing attack stays closed for format-1 bodies: an old-format envelope around an
    old body, in a new chain or as the next link of an old one, is never trusted."""
    repo, _ = v1
    repo.ok("migrate", "--pick", "beta=c4b1d360")
    alpha1 = next(p for p in repo.objects("snapshots") if p.name.startswith("8a7008af8c86"))
    tmpl = parse_snapshot(alpha1.read_bytes())
    head = next(p for p in repo.objects("snapshots") if p.name.startswith("7e13659b189e"))
    forged = []
    for keyfile, seq, prev in (("pruner.put", 1, ""), ("alpha.put", 4, f"snapshots/{head.name}")):
        put = load_put_key(str(repo.base / keyfile))
        cert = name_for("clients", put.certificate)
        client = "pruner" if keyfile == "pruner.put" else "alpha"
        env = dataclasses.replace(tmpl.env, cert=cert, client=client, seq=seq, prev=prev, time=time.time() + 5)
        data = make_snapshot(env, tmpl.body_ct, put.client_key)
        name = name_for("snapshots", data).split("/", 1)[1]
        (repo.path / "snapshots" / name).write_bytes(data)
        forged.append(name)
    rows = {r["id"]: r for r in js(repo.ok("snapshots", "--json"))["snapshots"]}
    for name in forged:
        assert rows[name]["trusted"] is False and "format-1" in rows[name]["problem"]
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--client", "alpha", "--target", target)
    assert restored_path(target, Path("/tmp/v1fix/b/src/alpha/a.txt")).read_text() == "alpha three\n"
