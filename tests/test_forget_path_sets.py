"""Retention per path set with a put key (issue 11, point 14): every envelope carries a path-set id
(a keyed hash of its sorted paths under a key every put key of the domain has, docs/format.md
section 13), so `bunker forget` with a prune-capable put key groups per client and path set, as
the master key does. Envelopes without one (older snapshots) are grouped by client only, and the
output says so. Real backups through the real CLI; "older" envelopes are signed by a second
client's put key (test_forget.py's Crafted) with the field left out."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import load_master_key, load_put_key
from bunker.encoding import FormatError
from bunker.repo.snapshot import Envelope, is_path_set_id, parse_snapshot, path_set_id
from helpers import PASSPHRASE, Repo, js
from test_checkpoint import _kill_after_checkpoint, _tree
from test_forget import DAY, _actions, _crafted_client, _env, _forget, _listed, _noon_yesterday


def _env_of(repo: Repo, snap: str) -> Envelope:
    return parse_snapshot((repo.path / "snapshots" / snap).read_bytes()).env


def _pruner(repo: Repo, tmp_path: Path) -> Path:
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    return key


def _tree_of(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_keep_last_keeps_the_newest_of_every_path_set(repo: Repo, tmp_path: Path) -> None:
    """The issue's scenario: one backup of Documents, then three of etc; `--keep-last 2` with a
    prune-capable put key retired the only Documents snapshot, because the etc snapshots filled
    the client's one group."""
    docs = _tree_of(tmp_path / "Documents", {"letter.txt": b"the only copy\n"})
    etc = _tree_of(tmp_path / "etc", {"hosts": b"127.0.0.1 localhost\n"})
    only_docs = repo.backup(docs)["snapshot"]
    etcs = []
    for i in range(3):
        (etc / "hosts").write_bytes(f"127.0.0.{i} localhost\n".encode())
        etcs.append(repo.backup(etc)["snapshot"])
    key = _pruner(repo, tmp_path)
    doc = _forget(repo, "--keep-last", "2", "--put-key", key)
    assert doc["grouping"] == "client+path-set" and doc["grouped_by_client_only"] == {}
    assert _actions(doc) == {
        only_docs: ["last #1"],
        etcs[2]: ["last #1"],
        etcs[1]: ["last #2"],
        etcs[0]: None,
    }
    assert doc["forgotten"] == 1 and len(doc["retirement_records"]) == 1
    assert set(_listed(repo)) == {only_docs, etcs[1], etcs[2]}
    # the ids are the paths' under the domain's key: what the master key computes from the bodies
    put = load_put_key(str(repo.put_key))
    assert {g["path_set"] for g in doc["groups"]} == {
        path_set_id(put.secrets, [str(docs)]),
        path_set_id(put.secrets, [str(etc)]),
    }
    human = repo.ok("forget", "--keep-last", "2", "--put-key", key, "--dry-run", env=_env(repo)).stdout
    assert "grouped by client and path set (path-set ids; the paths themselves are sealed)" in human
    assert f"path set {path_set_id(put.secrets, [str(docs)])[:12]}" in human


def test_path_set_id_is_keyed_sorted_and_per_domain(repo: Repo, tmp_path: Path) -> None:
    put = load_put_key(str(repo.put_key))
    s = put.secrets
    one = path_set_id(s, ["/home/a/Documents", "/etc"])
    assert is_path_set_id(one) and len(one) == 32
    assert path_set_id(s, ["/etc", "/home/a/Documents", "/etc"]) == one  # a set: order and repeats do not count
    assert path_set_id(s, ["/etc"]) != one
    assert path_set_id(s, [b"/etc", "/home/a/Documents"]) == one  # bytes are the path's own bytes
    assert path_set_id(s, ["/data/caf\udce9"]) == path_set_id(s, [b"/data/caf\xe9"])  # undecodable names
    # another domain's key gives unrelated ids for the same paths
    other = PutSecrets(bytes(32))
    assert path_set_id(other, ["/home/a/Documents", "/etc"]) != one
    # the master key derives the same key for every domain it made
    master = load_master_key(str(repo.master_key), PASSPHRASE)
    assert path_set_id(master.put_secrets("default"), ["/etc", "/home/a/Documents"]) == one


def test_every_kind_of_backup_names_its_path_set(repo: Repo, tmp_path: Path) -> None:
    """Paths: absolute; --stdin-name NAME: [NAME]; --tar FILE: ["tar:" + absolute FILE]; --tar -:
    ["tar:-"] (docs/format.md section 13)."""
    s = load_put_key(str(repo.put_key)).secrets
    a = _tree_of(tmp_path / "a", {"x": b"x"})
    b = _tree_of(tmp_path / "b", {"y": b"y"})
    snap = repo.backup(b, a)["snapshot"]
    assert _env_of(repo, snap).path_set == path_set_id(s, [str(a), str(b)])
    cp = repo.ok("backup", "--stdin-name", "db.sql", "--json", input="SELECT 1;\n")
    assert _env_of(repo, js(cp)["snapshot"]).path_set == path_set_id(s, ["db.sql"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("f")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"f"))
    archive = tmp_path / "in.tar"
    archive.write_bytes(buf.getvalue())
    snap = js(repo.ok("backup", "--tar", archive, "--json"))["snapshot"]
    assert _env_of(repo, snap).path_set == path_set_id(s, [f"tar:{archive}"])
    cp = repo.ok("backup", "--tar", "-", "--json", input=buf.getvalue())
    assert _env_of(repo, js(cp)["snapshot"]).path_set == path_set_id(s, ["tar:-"])
    # one group per path set, named by the put key as by the master key
    with_put = _forget(repo, "--keep-last", "1", "--dry-run")
    with_master = _forget(repo, "--keep-last", "1", "--dry-run", "--master-key", repo.master_key)
    assert len(with_put["groups"]) == len(with_master["groups"]) == 4
    assert _actions(with_put) == _actions(with_master)
    assert sorted(g["paths"] for g in with_master["groups"]) == sorted(
        [[str(a), str(b)], ["db.sql"], [f"tar:{archive}"], ["tar:-"]]
    )


def test_older_envelopes_are_grouped_by_client_only_and_the_output_says_so(repo: Repo, tmp_path: Path) -> None:
    c = _crafted_client(repo, tmp_path)
    t0 = _noon_yesterday()
    old = [c.add(repo, t0 - k * DAY, t0 - k * DAY + 5, path_set="") for k in (3, 2)]
    new = [c.add(repo, t0 - k * DAY, t0 - k * DAY + 5) for k in (1, 0)]
    assert not _env_of(repo, old[0]).path_set and _env_of(repo, new[0]).path_set
    doc = _forget(repo, "--client", "crafted", "--keep-last", "1", "--dry-run")
    assert doc["grouped_by_client_only"] == {"crafted": 2}
    groups = {g["path_set"]: _actions({"groups": [g]}) for g in doc["groups"]}
    assert groups == {
        None: {old[1]: ["last #1"], old[0]: None},
        _env_of(repo, new[0]).path_set: {new[1]: ["last #1"], new[0]: None},
    }
    human = repo.ok("forget", "--client", "crafted", "--keep-last", "1", "--dry-run", env=_env(repo)).stdout
    assert (
        "2 snapshot(s) of client crafted were written before path-set ids: they form one group of any paths "
        "(pass --master-key FILE to group them by the paths sealed in them)" in human
    )
    assert "client crafted, any paths (no path-set id)" in human
    # the master key reads their paths: old and new snapshots of one path set are one group
    doc = _forget(repo, "--client", "crafted", "--keep-last", "1", "--dry-run", "--master-key", repo.master_key)
    assert doc["grouped_by_client_only"] == {}
    assert _actions(doc) == {new[1]: ["last #1"], new[0]: None, old[1]: None, old[0]: None}


def test_a_policy_never_forgets_the_newest_snapshot_of_a_path_set(repo: Repo, tmp_path: Path) -> None:
    """With one path set backed up once long ago and another daily, no policy forgets the lone
    snapshot: it is the newest of its path set. Only `forget ID` does."""
    c = _crafted_client(repo, tmp_path)
    t0 = _noon_yesterday()
    lone = c.add(repo, t0 - 400 * DAY, t0 - 400 * DAY + 5, paths=["/home/a/Documents"])
    daily = [c.add(repo, t0 - k * DAY, t0 - k * DAY + 5, paths=["/etc"]) for k in (2, 1, 0)]
    for rules in (["--keep-last", "1"], ["--keep-within", "2d"], ["--keep-daily", "1"], ["--keep-monthly", "1"]):
        doc = _forget(repo, "--client", "crafted", *rules, "--dry-run")
        acts = _actions(doc)
        assert acts[lone], (rules, acts)  # kept, with the rule that keeps it
        assert acts[daily[2]] and acts[daily[0]] is None
    key = _pruner(repo, tmp_path)
    _forget(repo, "--client", "crafted", "--keep-last", "1", "--put-key", key)
    assert lone in _listed(repo)
    doc = _forget(repo, lone[:12], "--put-key", key)
    assert doc["forgotten"] == 1 and "newest snapshot of its path set" in doc["snapshots"][0]["why"]
    assert lone not in _listed(repo)


def test_dry_run_and_real_run_give_the_same_reasons_with_any_key(repo: Repo, tmp_path: Path) -> None:
    """A dry run with the master key and the real run by a prune-capable put key (say, from cron)
    decide the same and give the same reasons; a dry run and the real run with one key print the
    same lines but for the summary."""
    c = _crafted_client(repo, tmp_path)
    t0 = _noon_yesterday()
    for k in (9, 5, 4, 3, 2, 1, 0):
        c.add(repo, t0 - k * DAY, t0 - k * DAY + 5, paths=["/etc"])
    c.add(repo, t0 - 6 * DAY, t0 - 6 * DAY + 5)  # the template's paths
    rules = ("--client", "crafted", "--keep-daily", "2", "--keep-weekly", "2", "--keep-within", "3d")
    key = _pruner(repo, tmp_path)
    master_dry = _forget(repo, *rules, "--dry-run", "--master-key", repo.master_key)
    put_dry = _forget(repo, *rules, "--dry-run", "--put-key", key)
    human_dry = repo.ok("forget", *rules, "--dry-run", "--put-key", key, env=_env(repo)).stdout.splitlines()
    human_real = repo.ok("forget", *rules, "--put-key", key, env=_env(repo)).stdout.splitlines()
    assert _actions(master_dry) == _actions(put_dry)
    assert human_dry[:-1] == human_real[:-1]
    n = put_dry["forgotten"]
    assert n and human_dry[-1].startswith(f"dry run: {n} of 8") and human_real[-1].startswith(f"forgot {n} of 8")
    retired = {n for n, v in _actions(put_dry).items() if v is None}
    assert retired and not retired & set(_listed(repo))


def test_checkpoints_carry_their_runs_path_set(repo: Repo, tmp_path: Path) -> None:
    """A killed run's checkpoint becomes an incomplete snapshot with the run's path-set id, so it
    is retained with the other snapshots of its paths (an adopting prune, which cannot open the
    body, takes the id from the checkpoint too: test_adopt_by_prune.py)."""
    src = tmp_path / "src"
    _tree(src)
    _kill_after_checkpoint(repo, src)
    doc = repo.backup(src)
    snaps = {r["seq"]: r["id"] for r in _listed(repo).values()}
    incomplete, complete = _env_of(repo, snaps[1]), _env_of(repo, snaps[2])
    assert not incomplete.complete and complete.complete and doc["snapshot"] == snaps[2]
    s = load_put_key(str(repo.put_key)).secrets
    assert incomplete.path_set == complete.path_set == path_set_id(s, [str(src)])
    fdoc = _forget(repo, "--keep-last", "1", "--dry-run")
    assert _actions(fdoc) == {snaps[2]: ["last #1"], snaps[1]: None}
    shutil.rmtree(src)


def test_check_names_an_envelope_whose_path_set_id_lies(repo: Repo, tmp_path: Path) -> None:
    """A client that puts another path set's id into its envelope moves its snapshot into that
    group for put-key retention; `check --read-data` compares the id with the sealed paths."""
    c = _crafted_client(repo, tmp_path)
    t0 = _noon_yesterday()
    honest = c.add(repo, t0 - DAY, t0 - DAY + 5)
    lying = c.add(repo, t0, t0 + 5, path_set=path_set_id(c.put.secrets, ["/somewhere/else"]))
    doc = js(repo.run("check", "--read-data", "--json"))
    found = {p["object"]: p["problem"] for p in doc["problems"]}
    assert f"snapshots/{lying}" in found and f"snapshots/{honest}" not in found
    assert "is not the one of the paths sealed in its body" in found[f"snapshots/{lying}"]
    # the master key groups by the sealed paths, whatever the envelope says
    fdoc = _forget(repo, "--client", "crafted", "--keep-last", "1", "--dry-run", "--master-key", repo.master_key)
    assert _actions(fdoc) == {lying: ["last #1"], honest: None}


@pytest.mark.parametrize("value", ["", "ABCDEF0123456789abcdef0123456789", "00" * 15, 7])
def test_envelope_path_set_field_is_checked(repo: Repo, tmp_path: Path, value: Any) -> None:
    """The field is optional (absent or "" in older envelopes); anything else that is not 32
    lowercase hex digits makes the envelope malformed."""
    c = _crafted_client(repo, tmp_path)
    name = c.add(repo, _noon_yesterday(), _noon_yesterday() + 5, path_set=value)
    data = (repo.path / "snapshots" / name).read_bytes()
    if value == "":
        assert parse_snapshot(data).env.path_set == ""
        return
    with pytest.raises(FormatError, match="path-set id"):
        parse_snapshot(data)
    assert os.path.exists(repo.path / "snapshots" / name)
