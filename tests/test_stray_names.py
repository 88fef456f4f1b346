"""Names that break their prefix's rule (docs/format.md section 5), put into a real local
repository by other means than bunker: `bunker check --keyless` reports each one, and backup,
prune, restore and check never act on them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bunker.repo.config import FORMAT_VERSION
from helpers import Repo, compare_trees, js, make_tree, restored_path

NEWLINE = "packs/" + "e" * 64 + "\n"  # a hash name and a newline: one more line in a listing
DIRECTORY = "packs/" + "f" * 64  # a directory under a hash name
JUNK = {
    "packs/junk": b"junk",
    NEWLINE: b"a name with a newline",
    "snapshots/evil": b"evil",
    "index/" + "A" * 64: b"upper case",
    "sessions/notasession": b"no lease",
    "sessions/0123456789abcdef01234567.01": b"a counter with a leading zero",
    "refs/" + "b" * 63: b"63 digits",
}


def _plant(repo: Repo) -> None:
    for name, data in JUNK.items():
        (repo.path / name).write_bytes(data)
    (repo.path / DIRECTORY).mkdir()
    (repo.path / DIRECTORY / ("d" * 64)).write_bytes(b"below a directory")


def _untouched(repo: Repo) -> None:
    for name, data in JUNK.items():
        assert (repo.path / name).read_bytes() == data, name
    assert (repo.path / DIRECTORY / ("d" * 64)).read_bytes() == b"below a directory"


def test_strays_are_reported_by_a_keyless_check_and_never_used(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    _plant(repo)

    cp = repo.run("check", "--keyless", "--expect", repo.id, "--json")
    doc = js(cp)
    assert cp.returncode == 0 and doc["ok"] is True, cp.stderr
    strays = {p["object"]: p for p in doc["problems"] if "not an object of format" in p["problem"]}
    expected = {name for name in JUNK if name != NEWLINE} | {repr(NEWLINE), DIRECTORY + "/"}
    assert set(strays) == expected, doc["problems"]
    for p in strays.values():
        assert p["severity"] == "warn" and f"not an object of format {FORMAT_VERSION} (" in p["problem"]
        assert "find out who put it there" in p["problem"]
    assert "packs/ holds only files named by 64 lowercase hex digits" in strays["packs/junk"]["problem"]
    assert "<24" not in strays["sessions/notasession"]["problem"]
    assert "24 lowercase hex digits, a dot and a counter" in strays["sessions/notasession"]["problem"]
    # every other problem is the usual one of a repository that is fine
    assert [p for p in doc["problems"] if p["object"] not in strays] == []
    human = repo.ok("check", "--keyless", "--expect", repo.id).stdout
    assert f"warn: packs/junk: not an object of format {FORMAT_VERSION}" in human
    assert f"warn: {NEWLINE}" not in human  # the newline is shown escaped, never as a line break

    # a backup, prune (both phases) and a restore neither trip over them nor touch them
    (src / "added.bin").write_bytes(os.urandom(300_000))
    assert repo.backup(src)["level"] in ("ok", "note")
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    for _ in range(2):
        js(repo.ok("prune", "--put-key", key, "--grace", "0s", "--json"))
    _untouched(repo)
    target = tmp_path / "restored"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)
    doc = js(repo.ok("check", "--read-data", "--json"))
    assert doc["ok"] is True and all(p["severity"] == "warn" for p in doc["problems"]), doc["problems"]
    _untouched(repo)
