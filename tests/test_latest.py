"""`latest` is the newest snapshot by *trusted* time (the signed time, never later than when the
storage stored the snapshot: repo/retention.py), and never a retired (forgotten) snapshot.

Snapshots at other times are signed the way a client signs them (a second client's put key, an
envelope copied from a real backup); the test, playing the storage, sets each object's
modification time to when it "arrived"."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from bunker.crypto.keyfile import load_put_key
from bunker.repo.objects import name_for
from bunker.repo.records import make_retirement
from bunker.repo.repository import Repository
from bunker.repo.selection import Filters, select
from bunker.repo.snapshot import make_snapshot, parse_snapshot
from bunker.storage.local import LocalBackend
from helpers import Repo, js, restored_path

YEAR = 365 * 86400.0


def _src(tmp_path: Path, name: str, text: bytes) -> Path:
    src = tmp_path / name
    src.mkdir()
    (src / "f.txt").write_bytes(text)
    return src


def _open(repo: Repo) -> Repository:
    return Repository.open(LocalBackend(str(repo.path)))


def test_a_forged_future_time_does_not_make_latest(repo: Repo, tmp_path: Path) -> None:
    """Client "crafted" signs a snapshot dated a year ahead; the storage received it an hour ago.
    testclient's backup, stored now, is the latest one, for `select` and for `restore latest`."""
    old = repo.backup(_src(tmp_path, "old", b"old content\n"))["snapshot"]
    key = tmp_path / "crafted.put"
    repo.ok("key", "new-client", "crafted", "--out", key)
    put = load_put_key(str(key))
    template = parse_snapshot((repo.path / "snapshots" / old).read_bytes())
    env = dataclasses.replace(
        template.env,
        client="crafted",
        cert=name_for("clients", put.certificate),
        seq=1,
        prev="",
        time=time.time() + YEAR,
    )
    data = make_snapshot(env, template.body_ct, put.client_key)
    forged = repo.path / name_for("snapshots", data)
    forged.write_bytes(data)
    t = time.time() - 3600
    os.utime(forged, (t, t))
    os.utime(repo.path / "snapshots" / old, (t - 60, t - 60))

    newest = repo.backup(_src(tmp_path, "new", b"new content\n"))["snapshot"]
    r = _open(repo)
    assert select(r, "latest", Filters(), None).name == f"snapshots/{newest}"
    # by client it still works: the forged one is crafted's latest
    assert select(r, "latest", Filters(client="crafted"), None).name == f"snapshots/{forged.name}"
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert (restored_path(target, tmp_path / "new") / "f.txt").read_bytes() == b"new content\n"


def test_retired_snapshots_are_never_latest(repo: Repo, tmp_path: Path) -> None:
    src = _src(tmp_path, "src", b"one\n")
    first = repo.backup(src)["snapshot"]
    (src / "f.txt").write_bytes(b"two\n")
    second = repo.backup(src)["snapshot"]
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    put = load_put_key(str(key))
    r = _open(repo)
    assert select(r, "latest", Filters(), None).name == f"snapshots/{second}"
    record = make_retirement(f"snapshots/{second}", "test: forgotten", put.client_key, r.check_put_key(put).name)
    r.backend.put(name_for("retired", record), record)

    r = _open(repo)
    assert select(r, "latest", Filters(), None).name == f"snapshots/{first}"
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert (restored_path(target, src) / "f.txt").read_bytes() == b"one\n"
    # named by its id, a retired snapshot is still read while its data is stored
    assert select(r, second[:12], Filters(), None).name == f"snapshots/{second}"

    record = make_retirement(f"snapshots/{first}", "test: forgotten", put.client_key, r.check_put_key(put).name)
    r.backend.put(name_for("retired", record), record)
    cp = repo.run("restore", "latest", "--target", tmp_path / "t2")
    assert cp.returncode != 0 and "forgotten snapshots are never `latest`" in cp.stderr
    assert "--all" in cp.stderr
