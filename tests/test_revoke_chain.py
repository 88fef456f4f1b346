"""A revocation names the last trusted snapshot object, not a number (issue 10, point 4).

Before format 2 a revocation kept the snapshots up to a sequence number trusted, so a stolen
key could still mint trusted snapshots with a number at or below it: a fork of the chain that
`latest`, restore and retention believed. Now only the chain that ends at the named snapshot is
trusted; anything else of that client is untrusted everywhere, and a fork is damage in `check`."""

from __future__ import annotations

import time
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from helpers import Repo, describe, js, resign_snapshot, restored_path


def _thief(repo: Repo, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """Client ``thief`` with snapshots #1 and #2 of one file."""
    key = tmp_path / "thief.put"
    repo.ok("key", "new-client", "thief", "--out", key)
    src = tmp_path / "src"
    src.mkdir()
    names = []
    for text in (b"first\n", b"second\n"):
        (src / "f.txt").write_bytes(text)
        names.append(repo.backup(src, args=("--put-key", str(key)))["snapshot"])
    return key, src, names


def _mint(repo: Repo, key: Path, template: str, *, seq: int, prev: str) -> str:
    """What a stolen key can do: sign a new envelope (here around an old body of its own run,
    dated now) as link ``seq`` after ``prev``."""
    prev_name = f"snapshots/{prev}" if prev else ""
    return resign_snapshot(repo.path, template, load_put_key(str(key)), seq=seq, prev=prev_name, time=time.time() + 5)


def test_a_revoked_key_cannot_mint_trusted_snapshots_below_its_last(repo: Repo, tmp_path: Path) -> None:
    key, src, (s1, s2) = _thief(repo, tmp_path)
    doc = js(repo.ok("key", "revoke", "thief", "--json"))
    assert doc["last_trusted"] == f"snapshots/{s2}" and doc["last_trusted_seq"] == 2

    # the revoked key is refused for backups
    cp = repo.run("backup", src, "--put-key", key)
    assert cp.returncode == 12, describe(cp)

    # it forks the chain below its last trusted snapshot: #2 after #1, and a new #1
    fork2 = _mint(repo, key, s1, seq=2, prev=s1)
    fork1 = _mint(repo, key, s1, seq=1, prev="")
    rows = {r["id"]: r for r in js(repo.ok("snapshots", "--json"))["snapshots"]}
    for forged in (fork2, fork1):
        assert rows[forged]["trusted"] is False, rows[forged]
        assert "revoked client 'thief'" in rows[forged]["problem"]
    assert rows[s1]["trusted"] and rows[s2]["trusted"]

    # latest for that client is its genuine last snapshot, not the newer forgery
    target = tmp_path / "t"
    repo.ok("restore", "latest", "--client", "thief", "--target", target)
    assert restored_path(target, src / "f.txt").read_bytes() == b"second\n"
    cp = repo.run("restore", fork2[:12], "--target", tmp_path / "t2")
    assert cp.returncode == 2 and "no snapshot" in cp.stderr, describe(cp)

    # retention never counts them
    fdoc = js(repo.ok("forget", "--keep-last", "5", "--dry-run", "--json"))
    kept = {s["id"] for g in fdoc["groups"] for s in g["snapshots"]}
    assert fork1 not in kept and fork2 not in kept

    # check: both named, as errors, in every mode
    for mode in (("--keyless", "--expect", repo.id), ()):
        cp = repo.run("check", *mode, "--json")
        assert cp.returncode == 14, describe(cp)
        errs = {p["object"] for p in js(cp)["problems"] if p["severity"] == "err"}
        assert {f"snapshots/{fork1}", f"snapshots/{fork2}"} <= errs


def test_revoke_names_a_snapshot_and_refuses_to_guess_on_a_fork(repo: Repo, tmp_path: Path) -> None:
    key, src, (s1, s2) = _thief(repo, tmp_path)
    # the client's own chain was forked before the revocation (two heads)
    other = _mint(repo, key, s2, seq=2, prev=s1)
    cp = repo.run("key", "revoke", "thief")
    assert cp.returncode == 2 and "several heads" in cp.stderr and s2[:12] in cp.stderr, describe(cp)
    doc = js(repo.ok("key", "revoke", "thief", "--last", other[:10], "--json"))
    assert doc["last_trusted"] == f"snapshots/{other}"
    rows = {r["id"]: r for r in js(repo.ok("snapshots", "--json"))["snapshots"]}
    assert rows[other]["trusted"] and rows[s1]["trusted"] and not rows[s2]["trusted"]

    # --last-seq picks on the chain; 0 trusts nothing
    doc = js(repo.ok("key", "revoke", "thief", "--last-seq", "0", "--json"))
    assert doc["last_trusted"] == "" and doc["last_trusted_seq"] == 0
    rows = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert not any(r["trusted"] for r in rows if r["client"] == "thief")
