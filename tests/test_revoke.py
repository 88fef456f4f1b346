"""bunker key revoke (issue 5): a stolen machine's put key is revoked by a new config version; its
later snapshots are flagged, it can no longer back up, nobody deduplicates against its packs, and
check --read-data names a blob it wrote whose content does not match its id (dedup poisoning)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.errors import ExitCode
from bunker.repo import blob
from bunker.repo.index_cache import IndexCache
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.storage.local import LocalBackend
from helpers import Repo, js, make_env


def _thief(repo: Repo, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    key = tmp_path / "thief.put"
    repo.ok("key", "new-client", "thief", "--out", key)
    return key, make_env(tmp_path / "thief-home", BUNKER_PUT_KEY=str(key))


def test_revoked_client_is_flagged_refused_and_not_deduplicated(repo: Repo, tmp_path: Path) -> None:
    key, env = _thief(repo, tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "shared.bin").write_bytes(os.urandom(1 << 20))  # content both machines have
    repo.backup(src, env=env)  # thief's #1
    second = repo.backup(src, env=env)  # thief's #2, after which the machine was stolen
    assert second["seq"] == 2

    doc = js(repo.ok("key", "revoke", "thief", "--last-seq", "1", "--json"))
    assert doc["last_trusted_seq"] == 1 and doc["config_version"] == 2

    snaps = {s["seq"]: s for s in js(repo.ok("snapshots", "--json"))["snapshots"] if s["client"] == "thief"}
    assert snaps[1]["trusted"] is True and snaps[2]["trusted"] is False
    assert "revoked" in snaps[2]["problem"]

    cp = repo.run("backup", src, env=env)
    assert cp.returncode == ExitCode.KEY_MISSING and "revoked" in cp.stderr

    # the owner stores the shared content again rather than trust the revoked client's packs
    own = repo.backup(src)
    assert own["stats"]["stored_new"] > 500_000

    # check flags the snapshot written after the last trusted one, and names the client's packs
    check = js(repo.ok("check", "--json", rc=ExitCode.INTEGRITY))
    problems = {p["object"]: p for p in check["problems"]}
    assert problems[f"snapshots/{second['snapshot']}"]["severity"] == "err"
    assert "revoked client 'thief' after its last trusted snapshot" in json.dumps(check["problems"])

    cp = repo.run("key", "revoke", "nobody")
    assert cp.returncode == ExitCode.USAGE and "thief" in cp.stderr


def test_a_writer_revoked_after_its_index_objects_were_cached_is_not_deduplicated(repo: Repo, tmp_path: Path) -> None:
    """The owner's index cache holds the thief's index objects from a backup before the
    revocation; after it, the owner's next backup stores the shared content again, and a restore
    (which reads every writer's data, through the same cache) still gets the thief's files."""
    key, env = _thief(repo, tmp_path)
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    (src / "shared.bin").write_bytes(os.urandom(1 << 20))
    (other / "own.txt").write_bytes(b"the owner's own file")
    thief = repo.backup(src, env=env)
    repo.backup(other)  # the owner loads (and caches) the index, the thief's objects too
    cache = next(Path(repo.env["XDG_CACHE_HOME"]).glob("**/index"))
    assert len(list(cache.iterdir())) >= 2

    repo.ok("key", "revoke", "thief", "--last-seq", "1", "--json")
    own = repo.backup(src)
    assert own["stats"]["stored_new"] > 500_000

    dest = tmp_path / "dest"
    repo.ok("restore", thief["snapshot"], "--target", dest)
    (restored,) = dest.rglob("shared.bin")
    assert restored.read_bytes() == (src / "shared.bin").read_bytes()


def test_check_read_data_names_a_poisoned_blob_of_a_revoked_client(repo: Repo, tmp_path: Path) -> None:
    """A client whose put key was stolen can store a blob under the id of content it guessed, with
    other content: dedup against it would poison backups. After revocation nobody uses it, and
    check --read-data names it."""
    key, _ = _thief(repo, tmp_path)
    put = load_put_key(str(key))
    r = Repository.open(LocalBackend(str(repo.path)))
    cert = r.check_put_key(put)
    writer = SessionWriter(r, put, cert.name, IndexCache(r, put.secrets, None).load())
    victim = b"the real content of a file others have " * 1000
    writer.store(blob.chunk_id(put.secrets, victim), b"evil replacement " * 1000)
    writer.flush()
    writer.close()

    repo.ok("key", "revoke", "thief", "--json")
    check = js(repo.ok("check", "--read-data", "--json", rc=ExitCode.INTEGRITY))
    text = json.dumps(check["problems"])
    assert "does not match its chunk id" in text and "revoked client 'thief'" in text
