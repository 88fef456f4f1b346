"""With only the put key a machine backs up, lists envelopes and verifies its own files, but
reads no name, path, host, tag or content (promise 1)."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import Repo, init_repo, js, restored_path, tree_contains

SECRET_DIR = "zz-secretdir-quokka"
SECRET_NAME = "zebra-unicorn-secret-filename.txt"
SECRET_CONTENT = b"ultra-distinctive-content-marker-7f3a9c "
SECRET_HOST = "host-distinctive-narwhal"
SECRET_TAG = "tag-distinctive-axolotl"


def _remove_master(repo: Repo, tmp_path: Path) -> Path:
    usb = tmp_path / "usb"
    dest = usb / "master.key"
    doc = js(repo.ok("key", "export", "--master", dest, "--remove", "--json"))
    assert doc["removed"] == str(repo.master_key)
    assert dest.exists() and not repo.master_key.exists()
    return dest


def test_put_key_cannot_decrypt_or_list_names(tmp_path: Path) -> None:
    # the client's certificate binds the host (sealed), and its snapshots record it (sealed)
    repo = init_repo(tmp_path / "r", host=SECRET_HOST)
    src = tmp_path / SECRET_DIR
    src.mkdir()
    (src / SECRET_NAME).write_bytes(SECRET_CONTENT * 500)
    (src / "other.txt").write_bytes(b"other file\n")
    first = repo.backup(src, args=("--tag", SECRET_TAG))
    exported = _remove_master(repo, tmp_path)

    # backup still works with the put key alone, and no longer reports the master key
    (src / "new.txt").write_bytes(b"new\n")
    second = repo.backup(src)
    assert second["level"] == "ok"
    assert not [e for e in second["events"] if e["code"] == "master-key-on-client"]

    # ls and restore need the master key: exit 12 with a clear message
    cp = repo.run("ls", "latest")
    assert cp.returncode == 12, cp.stderr
    assert "master key" in cp.stderr and "--master-key" in cp.stderr
    assert "put key on this machine can only back up" in cp.stderr
    target = tmp_path / "t"
    cp = repo.run("restore", "latest", "--target", target)
    assert cp.returncode == 12, cp.stderr
    assert "needs the master key" in cp.stderr
    assert not restored_path(target, src / SECRET_NAME).exists()
    cp = repo.run("restore", "latest", "--target", target, "--json")
    assert cp.returncode == 12 and js(cp)["exit_code"] == 12

    # snapshots works and shows the public envelope, nothing sealed
    doc = js(repo.ok("snapshots", "--json"))
    rows = doc["snapshots"]
    assert [r["seq"] for r in rows] == [1, 2]
    assert {r["id"] for r in rows} == {first["snapshot"], second["snapshot"]}
    for r in rows:
        assert r["client"] == repo.client and r["complete"] is True and r["trusted"] is True
        assert r["level"] in ("ok", "note") and r["stats"]["files"] >= 2 and r["time"] > 0
        assert "host" not in r and "paths" not in r and "tags" not in r
    human = repo.ok("snapshots").stdout
    assert SECRET_HOST not in human and SECRET_DIR not in human and SECRET_TAG not in human

    # nothing in the repository holds a name, path, host, tag or content in the clear
    needles = [
        SECRET_NAME.encode(),
        SECRET_DIR.encode(),
        SECRET_CONTENT,
        SECRET_CONTENT.strip(),
        SECRET_HOST.encode(),
        SECRET_TAG.encode(),
        str(src).encode(),
    ]
    assert tree_contains(repo.path, needles) == []

    # with the exported master key everything is readable again
    cp = repo.ok("restore", "latest", "--target", target, "--master-key", exported)
    assert restored_path(target, src / SECRET_NAME).read_bytes() == SECRET_CONTENT * 500
    rows = js(repo.ok("snapshots", "--json", "--master-key", exported))["snapshots"]
    assert rows[0]["host"] == SECRET_HOST and rows[0]["tags"] == [SECRET_TAG]
    assert rows[0]["paths"] == [str(src)]


def test_verify_with_put_key_only(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(600_000))
    (src / "b.txt").write_bytes(b"bee\n" * 1000)
    (src / "c").write_bytes(b"")
    repo.backup(src)
    _remove_master(repo, tmp_path)

    doc = js(repo.ok("verify", src, "--json"))
    assert doc["ok"] is True and doc["stored"] == 3
    assert doc["missing"] == [] and doc["changed"] == [] and doc["new"] == []

    doc = js(repo.ok("verify", src, "--read-data", "--json"))
    assert doc["ok"] is True and doc["stored"] == 3
    # every piece of the two non-empty files was fetched, decrypted with the key derived from the
    # local content, and compared (an empty file has no chunk)
    assert doc["chunks_compared"] >= 2

    # a modified file is listed as changed and not stored
    with open(src / "b.txt", "r+b") as f:
        f.seek(100)
        f.write(b"XYZ")
    cp = repo.run("verify", src, "--json")
    assert cp.returncode == 14, cp.stderr
    doc = js(cp)
    assert doc["ok"] is False
    assert doc["changed"] == [str(src / "b.txt")]
    assert [m["path"] for m in doc["missing"]] == [str(src / "b.txt")]
    assert doc["stored"] == 2
    cp = repo.run("verify", src)
    assert cp.returncode == 14
    assert f"changed since last backup: {src / 'b.txt'}" in cp.stdout
    assert f"NOT STORED: {src / 'b.txt'}" in cp.stdout

    # a new file is listed as new and not stored
    (src / "d.new").write_bytes(os.urandom(1000))
    doc = js(repo.run("verify", src, "--json"))
    assert doc["new"] == [str(src / "d.new")]
    assert {m["path"] for m in doc["missing"]} == {str(src / "b.txt"), str(src / "d.new")}

    # after a backup everything passes again, also with --read-data
    repo.backup(src)
    doc = js(repo.ok("verify", src, "--read-data", "--json"))
    assert doc["ok"] is True and doc["stored"] == 4
