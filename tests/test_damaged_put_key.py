"""A damaged put key (issue 11, point 1): one byte changed in its secret is refused before
anything is written (checksum, or for version-1 files the domain derived from the secret against
the certificate's), the caches are kept per secret, and what older versions let such a key write
is named by `check` and removed by `prune`, after which the repository checks clean."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bunker import encoding
from helpers import Repo, compare_trees, describe, js, make_env, make_tree, restored_path

FIXTURE = Path(__file__).parent / "fixtures" / "v1-repository.tar.gz"
LABEL = "BUNKER PUT KEY"


def damaged_copy(key: Path, dest: Path, *, version_1: bool) -> Path:
    """``key`` with one byte of its secret changed; ``version_1``: as a version-1 file (no
    checksum: only the domain comparison can catch it)."""
    text = key.read_text()
    body = text.split(f"-----BEGIN {LABEL}-----")[1].split(f"-----END {LABEL}-----")[0]
    fields = encoding.unpack(base64.b64decode("".join(body.split())))
    if version_1 and fields["v"] != 1:
        fields = {k: v for k, v in fields.items() if k not in ("sum", "config", "host", "host_salt")}
        fields["v"] = 1
    secret = bytearray(fields["secret"])
    secret[7] ^= 0x20
    fields["secret"] = bytes(secret)
    b64 = base64.b64encode(encoding.pack(fields)).decode()
    lines = [line for line in text.splitlines() if line.startswith("# ")]
    lines += [f"-----BEGIN {LABEL}-----", *(b64[i : i + 64] for i in range(0, len(b64), 64)), f"-----END {LABEL}-----"]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def restores(repo: Repo, src: Path, target: Path) -> None:
    """The newest snapshot restores byte for byte (the restored copy is removed afterwards)."""
    cp = repo.run("restore", "latest", "--target", target)
    assert cp.returncode == 0, describe(cp)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_a_damaged_put_key_is_refused_before_anything_is_written(repo: Repo, tmp_path: Path) -> None:
    """The issue's sequence: a backup with a corrupted secret (exit 0 before) is refused with exit
    15 and leaves the repository and this machine's state as they were; the good key's next
    backup is right, and restore works. check and verify say the key is damaged."""
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    (src / "small.txt").write_bytes(b"changed after the first backup\n")
    local = tmp_path / "r"  # the client's config, data and cache directories
    for version_1 in (False, True):
        bad = damaged_copy(repo.put_key, tmp_path / f"bad{int(version_1)}.put", version_1=version_1)
        stored, state = tree_files(repo.path), tree_files(local / "data") | tree_files(local / "cache")
        for args in (("backup", src), ("verify", src), ("check",)):
            cp = repo.run(*args, "--put-key", bad)
            assert cp.returncode == 15, describe(cp)
            assert f"put key file {bad} is damaged" in cp.stderr, describe(cp)
            assert ("checksum" if not version_1 else "its secret belongs to dedup domain") in cp.stderr
            assert "NOT STORED" not in cp.stdout and "no damage found" not in cp.stdout
        assert tree_files(repo.path) == stored
        assert tree_files(local / "data") | tree_files(local / "cache") == state
    doc = repo.backup(src)
    assert doc["seq"] == 2 and doc["stats"]["files_changed"] == 1, doc
    restores(repo, src, tmp_path / "t")
    assert repo.run("check").returncode == 0


@pytest.fixture
def v1(tmp_path: Path) -> Repo:
    """The format-1 fixture, migrated to format 2 (its put keys stay version-1 files)."""
    base = tmp_path / "v1"
    base.mkdir()
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(base, filter="data")
    manifest = json.loads((base / "manifest.json").read_text())
    env = make_env(base / "home", manifest["passphrase"], BUNKER_MASTER_KEY=str(base / "master.key"))
    repo = Repo(base / "repo", env, manifest["repo_id"], base / "master.key", base / "alpha.put", base, "alpha")
    repo.ok("migrate", "--pick", "beta=c4b1d360")
    return repo


def test_a_version_1_put_key_with_one_byte_changed_is_refused(v1: Repo, tmp_path: Path) -> None:
    src = v1.base / "src" / "alpha"
    bad = damaged_copy(v1.put_key, tmp_path / "alpha-bad.put", version_1=True)
    assert "sum" not in v1.put_key.read_text()  # a real version-1 file, as bunker wrote it
    stored = tree_files(v1.path)
    cp = v1.run("backup", src, "--put-key", bad)
    assert cp.returncode == 15, describe(cp)
    assert "its secret belongs to dedup domain" in cp.stderr and "nothing was written" in cp.stderr
    assert tree_files(v1.path) == stored
    assert v1.backup(src, args=("--put-key", str(v1.put_key)))["level"] in ("ok", "note")


# ------------------------------------------------------------------ what older versions let it write


@contextlib.contextmanager
def older_bunker(repo: Repo, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Back up in this process as bunker did before this fix: no comparison of the key's parts
    with its certificate, and one cache directory per certificate whatever the secret."""
    from bunker import dirs
    from bunker.backup import run
    from bunker.crypto.keyfile import load_put_key
    from bunker.repo.repository import Repository
    from bunker.storage import open_backend

    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(name, repo.env[name])

    def unchecked(self: Repository, put: Any) -> Any:
        return self.certificate(self.put_object("clients", put.certificate))

    monkeypatch.setattr(Repository, "check_put_key", unchecked)
    cert_dir = lambda r, put: dirs.client_cache_dir(r.repo_id, run.client_tag(put))  # noqa: E731
    monkeypatch.setattr(run, "client_cache", cert_dir, raising=False)

    def backup(key: Path, src: Path) -> Any:
        repository = Repository.open(open_backend(str(repo.path)))
        outcome = run.run_backup(repository, load_put_key(str(key)), run.BackupRequest(paths=[str(src)]))
        return outcome.committed

    yield backup


def test_what_a_damaged_key_wrote_is_named_by_check_and_removed_by_prune(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    bad = damaged_copy(repo.put_key, tmp_path / "bad.put", version_1=True)
    with older_bunker(repo, monkeypatch) as backup:
        backup(repo.put_key, src)  # 1
        (src / "small.txt").write_bytes(b"written while the key was damaged\n")
        (src / "new.bin").write_bytes(os.urandom(300_000))
        assert backup(bad, src).level in ("ok", "note")  # 2: what the issue found
        # 3: the good key trusted the damaged run's chunk ids (one files cache per certificate)
        poisoned = backup(repo.put_key, src)
        assert poisoned.stats["files_new"] == 0 and poisoned.stats["files_changed"] == 0
    snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
    damaged, poisoned_id = snaps[1]["id"], snaps[2]["id"]

    # the first run of this version stores again what only the damaged key's packs hold
    doc = repo.backup(src, rc=(0, 1))
    assert doc["seq"] == 4 and doc["stats"]["chunks_new"] > 0, doc
    # the files cache an older version kept per certificate was taken over: files the damaged key
    # did not touch are not read again
    assert doc["stats"]["files_new"] == 0 and doc["stats"]["files_changed"] == 2, doc
    assert not any(e["code"] == "chain-rollback" for e in doc["events"])
    restores(repo, src, tmp_path / "t")

    cp = repo.run("check")
    assert cp.returncode == 14, describe(cp)
    out = cp.stdout
    assert "written with another secret" in out and "this client's put key was damaged" in out
    assert f"snapshots/{damaged}" in out and "nobody can restore it" in out
    assert f"snapshots/{poisoned_id}" in out and "cannot be restored from it" in out
    assert "index rebuild" not in out and "are missing (deleted or withheld)" not in out
    assert "bunker prune" in out  # the next step
    # the closing advice is the one that helps: a mirror holds the same bytes
    closing = out.strip().splitlines()[-1]
    assert "from a put key that was damaged" in closing and "mirror" not in closing, closing
    assert all(p["cause"] == "other-secret" for p in js(repo.run("check", "--json"))["problems"])
    other_secret = re.findall(r"^err: (packs/[0-9a-f]{64}): written with another secret", out, re.MULTILINE)
    assert other_secret, out

    # forget the snapshot that needs those packs, then prune: the damaged snapshot is retired,
    # its packs and index objects go, and the repository checks clean
    repo.ok("forget", "--keep-last", "1", "--master-key", repo.master_key)
    pruner = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", pruner)
    first = js(repo.ok("prune", "--grace", "0s", "--put-key", pruner, "--json"))
    assert first["retired_other_secret"] == [f"snapshots/{damaged}"]
    assert first["other_secret_indexes_removed"] >= 1 and first["condemned"] >= 1
    repo.ok("prune", "--grace", "0s", "--put-key", pruner)
    assert not [p for p in other_secret if (repo.path / p).exists()]
    cp = repo.run("check")
    assert cp.returncode == 0 and "no damage found" in cp.stdout, describe(cp)
    restores(repo, src, tmp_path / "t")


def test_the_run_after_a_damaged_key_says_so_and_stores_again(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the last snapshot this client remembers was written with a damaged key, the next run
    says that (not that the repository was rolled back) and stores its data again."""
    src = tmp_path / "src"
    make_tree(src)
    with older_bunker(repo, monkeypatch) as backup:
        backup(repo.put_key, src)
        (src / "new.bin").write_bytes(os.urandom(200_000))
        backup(damaged_copy(repo.put_key, tmp_path / "bad.put", version_1=True), src)
    doc = repo.backup(src, rc=1)
    codes = {e["code"]: e for e in doc["events"]}
    assert "chain-rollback" not in codes and codes["damaged-key-snapshot"]["level"] == "warn", doc
    assert "nobody can restore it" in codes["damaged-key-snapshot"]["message"]
    assert doc["seq"] == 3 and doc["stats"]["chunks_new"] > 0, doc
    restores(repo, src, tmp_path / "t")
