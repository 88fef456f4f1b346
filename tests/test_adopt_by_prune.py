"""Checkpoints of clients that never return (issue 5): `bunker prune` turns the last checkpoint of a
session dead for at least its grace period into an incomplete snapshot in the pruner's own chain,
listed and retained under the client whose run it was, and removes the session's lease.

Real killed backups (SIGKILL after a checkpoint, as in test_checkpoint.py); lease ages are the
storage's own object times, which the tests set with utime (what the storage would show after
the wait)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

from bunker import encoding
from bunker.crypto.keyfile import load_put_key
from bunker.crypto.sign import SigningKey
from bunker.repo import refs
from bunker.repo.moves import PackMoves
from bunker.repo.objects import name_for
from bunker.repo.repository import Repository
from bunker.repo.snapshot import Adoption, Envelope, make_snapshot, parse_snapshot
from bunker.storage.local import LocalBackend
from helpers import Repo, js, make_env, restored_path
from test_checkpoint import _kill_after_checkpoint, _tree

SESSION = "0123456789abcdef01234567"


def _age_sessions(repo: Repo, seconds: float) -> None:
    t = time.time() - seconds
    for p in repo.objects("sessions"):
        os.utime(p, (t, t))


def _pruner_env(repo: Repo, tmp_path: Path) -> dict[str, str]:
    """Another machine that holds only a prune-capable put key (and its own state directory)."""
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    return make_env(tmp_path / "pruner-home", BUNKER_PUT_KEY=str(key))


def _prune(repo: Repo, env: dict[str, str], *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = js(repo.ok("prune", "--json", *args, env=env))
    return doc


def _files(repo: Repo) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(repo.path)): (p.stat().st_size, p.stat().st_mtime) for p in repo.all_files()}


def _listed(repo: Repo, *args: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in js(repo.ok("snapshots", "--json", *args))["snapshots"]}


def test_prune_adopts_the_checkpoint_of_a_client_that_never_returns(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    _kill_after_checkpoint(repo, src)
    (lease,) = [p.name for p in repo.objects("sessions") if p.name.endswith(".0")]
    session = lease.rsplit(".", 1)[0]
    pruner = _pruner_env(repo, tmp_path)
    _age_sessions(repo, 3600)  # the lease expired 45 min ago (it is valid 15 min)

    # dead for less than the grace period: kept for the client's own next run
    waiting = _prune(repo, pruner, "--grace", "2h")
    assert waiting["checkpoints_adopted"] == 0 and waiting["adopted"] == []
    (kept,) = waiting["checkpoints_not_adopted"]
    assert kept["why"] == "waiting" and kept["client"] == repo.client and kept["session"] == session
    assert "client's next run" in kept["reason"]
    assert any(p.name.startswith(session) for p in repo.objects("sessions"))
    assert repo.objects("snapshots") == []

    # a dry run says what it would adopt and changes nothing
    before = _files(repo)
    dry = _prune(repo, pruner, "--grace", "0s", "--dry-run")
    assert dry["checkpoints_adopted"] == 1 and dry["adopted"][0]["session"] == session
    assert dry["adopted"][0]["snapshot"] == ""
    human = repo.ok("prune", "--grace", "0s", "--dry-run", env=pruner).stdout
    assert "would adopt 1 checkpoint of dead backups" in human
    assert "would adopt the last checkpoint" in human and repr(repo.client) in human
    assert _files(repo) == before

    # dead for longer than the grace period: adopted into the pruner's chain, lease removed
    leases = {p.name: (p.read_bytes(), p.stat().st_mtime) for p in repo.objects("sessions")}
    doc = _prune(repo, pruner, "--grace", "0s")
    assert doc["checkpoints_adopted"] == 1
    (adopted,) = doc["adopted"]
    assert adopted["session"] == session and adopted["client"] == repo.client and adopted["seq"] == 1
    snap_id = adopted["snapshot"].split("/", 1)[1]
    assert repo.objects("sessions") == []
    assert [p.name for p in repo.objects("snapshots")] == [snap_id]

    # a prune killed after writing the snapshot but before removing the lease: the next prune
    # finds the run adopted already and only removes the lease (no second snapshot)
    for name, (data, mtime) in leases.items():
        (repo.path / "sessions" / name).write_bytes(data)
        os.utime(repo.path / "sessions" / name, (mtime, mtime))
    redo = _prune(repo, pruner, "--grace", "0s")
    assert [a["snapshot"] for a in redo["adopted"]] == [adopted["snapshot"]]
    assert repo.objects("sessions") == [] and [p.name for p in repo.objects("snapshots")] == [snap_id]

    env = parse_snapshot((repo.path / "snapshots" / snap_id).read_bytes()).env
    assert env.client == "pruner" and env.seq == 1 and env.complete is False
    assert env.adopted is not None and env.adopted.client == repo.client and env.adopted.session == session

    row = _listed(repo)[snap_id]
    assert row["client"] == repo.client and row["complete"] is False and row["trusted"] is True
    assert row["adopted"]["by"] == "pruner" and row["adopted"]["session"] == session
    assert "problem" not in row["adopted"]
    assert snap_id in _listed(repo, "--client", repo.client)
    assert snap_id not in _listed(repo, "--client", "pruner")
    listing = repo.ok("snapshots").stdout
    assert "INCOMPLETE, adopted by prune client 'pruner'" in listing

    # it restores what the killed run had stored, byte-identical
    target = tmp_path / "t"
    rdoc = js(repo.ok("restore", snap_id, "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    restored = restored_path(target, src)
    got = list(restored.rglob("*.bin"))
    assert 0 < len(got) < 60
    for p in got:
        assert p.read_bytes() == (src / p.relative_to(restored)).read_bytes(), p
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    assert js(repo.ok("check", "--json", env=pruner))["ok"] is True  # the pruner's remembered head agrees

    # later prunes condemn and delete only what nothing needs: the adopted snapshot's packs stay
    r = Repository.open(LocalBackend(str(repo.path)))
    needed = refs.read_set(env.packset, r.get_object)
    assert needed
    for _ in range(2):
        later = _prune(repo, pruner, "--grace", "0s")
        assert later["checkpoints_adopted"] == 0 and later["waiting"] == []
    # (a pack may have been repacked: then a move record says where its blobs went)
    r = Repository.open(LocalBackend(str(repo.path)))
    existing = {p.name for p in repo.objects("packs")}
    moves = PackMoves.load(r)
    assert all(p in existing or moves.covered(p, existing) for p in needed)
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    rdoc = js(repo.ok("restore", snap_id, "--target", tmp_path / "t-later", "--json"))
    assert rdoc["stats"]["failed"] == 0

    # the client comes back: its killed session's lease is gone; it forgets it without a word
    back = repo.backup(src)
    assert back["seq"] == 1  # its own chain: the adopted snapshot is in the pruner's
    assert not [e for e in back["events"] if e["level"] in ("warn", "err", "fatal")], back["events"]
    assert not [e for e in back["events"] if e["code"] in ("incomplete-snapshot", "checkpoint-unusable")]
    assert not list((tmp_path / "r").rglob("session.json")), "the killed session is still remembered"
    again = repo.backup(src)
    assert again["seq"] == 2 and not [e for e in again["events"] if e["level"] in ("warn", "err")]

    # retention groups the adopted snapshot with its client's own snapshots of the same paths: it
    # carries its run's path-set id, taken from the checkpoint (the pruner cannot open the body)
    path_sets = {
        parse_snapshot((repo.path / "snapshots" / n).read_bytes()).env.path_set for n in (snap_id, back["snapshot"])
    }
    assert len(path_sets) == 1 and "" not in path_sets
    fdoc = js(repo.ok("forget", "--keep-last", "1", "--dry-run", "--json"))
    (group,) = fdoc["groups"]
    assert group["client"] == repo.client
    assert {s["id"] for s in group["snapshots"]} == {snap_id, back["snapshot"], again["snapshot"]}
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_checkpoint_of_another_dedup_domain_is_left_alone(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    far_key = tmp_path / "far.put"
    repo.ok("key", "new-client", "far", "--domain", "elsewhere", "--out", far_key)
    _kill_after_checkpoint(repo, src, env=make_env(tmp_path / "far-home", BUNKER_PUT_KEY=str(far_key)))
    leases = {p.name for p in repo.objects("sessions")}
    _age_sessions(repo, 3600)
    doc = _prune(repo, _pruner_env(repo, tmp_path), "--grace", "0s")
    assert doc["checkpoints_adopted"] == 0
    (kept,) = doc["checkpoints_not_adopted"]
    assert kept["why"] == "other-domain" and kept["client"] == "far"
    assert "--domain" in kept["reason"]
    assert {p.name for p in repo.objects("sessions")} == leases and repo.objects("snapshots") == []


# ------------------------------------------------------------------------------ the envelope field
def _envelope(**kw: Any) -> Envelope:
    base = Envelope(
        repo_id="r" * 64,
        client="pruner",
        cert="clients/" + "a" * 64,
        seq=1,
        prev="",
        time=1.0,
        level="note",
        complete=False,
        stats={"files": 1},
        packset="refs/" + "b" * 64,
        chunkset="refs/" + "c" * 64,
        domain="d",
        body_hash=b"",
        sealed_key=b"k",
        session=SESSION,
        counter=3,
    )
    return dataclasses.replace(base, **kw)


def _signed(env: Envelope) -> bytes:
    body = b"sealed body"
    return make_snapshot(dataclasses.replace(env, body_hash=blake3.blake3(body).digest()), body, SigningKey(b"\1" * 32))


def test_adopted_field_round_trips_and_old_envelopes_parse() -> None:
    plain = _envelope()
    assert "adopted" not in plain.to_body()  # older snapshots keep their exact bytes
    assert parse_snapshot(_signed(plain)).env.adopted is None
    a = Adoption("clients/" + "e" * 64, "laptop", SESSION)
    got = parse_snapshot(_signed(_envelope(adopted=a))).env
    assert got.adopted == a and got.owner == "laptop" and got.client == "pruner"


@pytest.mark.parametrize(
    ("adopted", "complete"),
    [
        ("laptop", False),
        ({"cert": "clients/" + "e" * 64, "client": "laptop"}, False),
        ({"cert": "clients/xyz", "client": "laptop", "session": SESSION}, False),
        ({"cert": "clients/" + "e" * 64, "client": "", "session": SESSION}, False),
        ({"cert": "clients/" + "e" * 64, "client": "a\nb", "session": SESSION}, False),
        ({"cert": "clients/" + "e" * 64, "client": "x" * 300, "session": SESSION}, False),
        ({"cert": "clients/" + "e" * 64, "client": "laptop", "session": "../../etc"}, False),
        ({"cert": "clients/" + "e" * 64, "client": 7, "session": SESSION}, False),
        ({"cert": "clients/" + "e" * 64, "client": "laptop", "session": SESSION}, True),
    ],
)
def test_malformed_adopted_field_is_refused(adopted: object, complete: bool) -> None:
    body = _envelope(complete=complete).to_body()
    body["adopted"] = adopted
    body["body_hash"] = blake3.blake3(b"x").digest()
    env_bytes = encoding.pack(body)
    data = b"BKSN" + encoding.pack({"env": env_bytes, "body": b"x", "signer": body["cert"], "sig": b"\0" * 64})
    with pytest.raises(encoding.FormatError):
        parse_snapshot(data)


def test_adoption_claimed_by_a_key_without_prune_is_not_honoured(repo: Repo, tmp_path: Path) -> None:
    """A backup-only client must not add snapshots to another client's listing and retention group."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_bytes(b"x\n")
    genuine = repo.backup(src)["snapshot"]
    key = tmp_path / "mallory.put"
    repo.ok("key", "new-client", "mallory", "--out", key)
    put = load_put_key(str(key))
    template = parse_snapshot((repo.path / "snapshots" / genuine).read_bytes())
    victim_cert = template.env.cert
    env = dataclasses.replace(
        template.env,
        client="mallory",
        cert=name_for("clients", put.certificate),
        seq=1,
        prev="",
        complete=False,
        adopted=Adoption(victim_cert, repo.client, SESSION),
        session=SESSION,
        counter=1,  # an adoption holds a checkpoint of the run
    )
    data = make_snapshot(env, template.body_ct, put.client_key)
    forged = name_for("snapshots", data).split("/", 1)[1]
    (repo.path / "snapshots" / forged).write_bytes(data)
    row = _listed(repo)[forged]
    # the claim makes the snapshot untrusted: never listed under the victim, never restored or retained
    assert row["client"] == "mallory" and row["trusted"] is False
    assert "no prune capability" in row["adopted"]["problem"]
    assert forged not in _listed(repo, "--client", repo.client)
    fdoc = js(repo.ok("forget", "--keep-last", "1", "--dry-run", "--json"))
    groups = {g["client"]: {s["id"] for s in g["snapshots"]} for g in fdoc["groups"]}
    assert groups == {repo.client: {genuine}}
