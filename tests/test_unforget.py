"""`bunker forget ID...` and `bunker unforget ID...` (issue 11, point 14).

forget retires the snapshots named by id prefix (refusing ambiguous ones); unforget withdraws a
retirement with a signed unretire record (docs/format.md section 15) while the data is still
stored, so listings show the snapshot again, prune keeps its data and policy runs keep it; once
prune has deleted the data, unforget says so and changes nothing. A record deleted from the
storage (which would un-forget or re-forget a snapshot) is reported by `check` and put back by
the machine that signed it. Real backups, real prunes, the real CLI."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import blake3

from bunker.crypto.keyfile import load_master_key, load_put_key
from bunker.errors import ExitCode
from bunker.repo.objects import MAGIC_RETIRED, MAGIC_UNRETIRED, name_for, parse_signed
from bunker.repo.records import make_unretirement, parse_unretirement
from bunker.repo.snapshot import BodyBinding, make_snapshot, open_body, seal_body
from helpers import PASSPHRASE, Repo, js, restored_path
from test_forget import _actions, _crafted_client, _env, _forget, _listed


def _pruner(repo: Repo, tmp_path: Path) -> Path:
    key = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", key)
    return key


def _unforget(repo: Repo, *args: str | os.PathLike[str], rc: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = js(repo.ok("unforget", "--json", *args, rc=rc, env=_env(repo)))
    return doc


def _records(repo: Repo) -> dict[str, bytes]:
    """retired/<hash> -> bytes of every record in the repository."""
    return {f"retired/{p.name}": p.read_bytes() for p in repo.objects("retired")}


def _two_backups(repo: Repo, tmp_path: Path) -> tuple[Path, str, str]:
    """A backup holding a file only it has, then one without it: (src, old, new)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept").write_bytes(b"in every snapshot\n")
    (src / "only-old").write_bytes(os.urandom(400_000))
    old = repo.backup(src)["snapshot"]
    (src / "only-old").unlink()
    new = repo.backup(src)["snapshot"]
    return src, old, new


def test_forget_by_id_retires_exactly_the_named_snapshots(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    snaps = []
    for i in range(3):
        (src / "f").write_bytes(f"version {i}\n".encode())
        snaps.append(repo.backup(src)["snapshot"])
    a, b, c = snaps
    key = _pruner(repo, tmp_path)
    before = _records(repo)
    dry = _forget(repo, b[:8], "--dry-run", "--put-key", key)
    assert dry["forgotten"] == 1 and dry["retirement_records"] == [] and _records(repo) == before
    human_dry = repo.ok("forget", b[:8], a, "--dry-run", "--put-key", key, env=_env(repo)).stdout.splitlines()
    human = repo.ok("forget", b[:8], a, "--put-key", key, env=_env(repo)).stdout.splitlines()
    assert human_dry[:-1] == human[:-1] and len(human) == 4  # the same rows, then the summary
    assert "named on the command line" in human[1] and human[-1].startswith("forgot 2 snapshot(s)")
    assert set(_listed(repo)) == {c}
    assert len(_records(repo)) == 2
    # naming them again writes nothing
    again = _forget(repo, b[:8], "--put-key", key)
    assert again["forgotten"] == 0 and again["snapshots"][0]["why"].startswith("already forgotten")
    # the newest snapshot of a path set is forgotten only when named, and the output says what it is
    doc = _forget(repo, c[:10], "--put-key", key)
    assert doc["forgotten"] == 1 and "it is the newest snapshot of its path set" in doc["snapshots"][0]["why"]
    assert _listed(repo) == {}
    # refusals write nothing
    before = _records(repo)
    for args, words in (
        (["ffffffffffff"], "no snapshot id begins with 'ffffffffffff'"),
        ([a[:3]], "is not a snapshot id (give at least 4 hex digits)"),
        (["latest"], "is not a snapshot id"),
        ([a[:8], "--keep-last", "1"], "either snapshot ids or retention rules, not both"),
    ):
        cp = repo.run("forget", *args, "--put-key", key)
        assert cp.returncode == ExitCode.USAGE and words in cp.stderr, (args, cp.stderr)
    assert _records(repo) == before


def _twins(repo: Repo, tmp_path: Path) -> tuple[str, str]:
    """Two snapshots whose ids share their first 4 hex digits (birthday search over signed times)."""
    c = _crafted_client(repo, tmp_path)
    cert = name_for("clients", c.put.certificate)
    body = open_body(c.template, load_master_key(str(repo.master_key), PASSPHRASE).data_private)
    session = secrets.token_hex(12)
    binding = BodyBinding(repo.id, cert, c.put.secrets.domain_id, session, 0)
    sealed, body_ct = seal_body(body, c.put.data_public, binding)
    seen: dict[str, bytes] = {}
    for i in range(100_000):
        env = dataclasses.replace(
            c.template.env,
            client="crafted",
            cert=cert,
            seq=1,
            prev="",
            time=1.7e9 + i,
            session=session,
            sealed_key=sealed,
            body_hash=blake3.blake3(body_ct).digest(),
        )
        data = make_snapshot(env, body_ct, c.put.client_key)
        name = name_for("snapshots", data)
        other = seen.setdefault(name[10:14], data)
        if other is not data:
            for d in (other, data):
                (repo.path / name_for("snapshots", d)).write_bytes(d)
            return name_for("snapshots", other)[10:], name[10:]
    raise AssertionError("no two ids share 4 hex digits")


def test_an_ambiguous_id_prefix_is_refused(repo: Repo, tmp_path: Path) -> None:
    one, two = _twins(repo, tmp_path)
    key = _pruner(repo, tmp_path)
    for command in ("forget", "unforget"):
        cp = repo.run(command, one[:4], "--put-key", key)
        assert cp.returncode == ExitCode.USAGE, cp.stderr
        assert f"'{one[:4]}' is ambiguous: 2 snapshot ids begin with it" in cp.stderr
        assert one[:16] in cp.stderr and two[:16] in cp.stderr and "Nothing was" in cp.stderr
    assert repo.objects("retired") == []
    # enough digits name one
    assert _forget(repo, one[:20], "--put-key", key)["forgotten"] == 1


def test_unforget_brings_a_snapshot_back_before_prune(repo: Repo, tmp_path: Path) -> None:
    _, old, new = _two_backups(repo, tmp_path)
    key = _pruner(repo, tmp_path)
    # a backup-only key may not unforget
    cp = repo.run("unforget", old)
    assert cp.returncode == ExitCode.KEY_MISSING and "prune capability" in cp.stderr
    # nothing to undo yet
    doc = _unforget(repo, old[:8], "--put-key", key)
    assert doc["unforgotten"] == 0 and doc["snapshots"][0]["why"] == "not forgotten: nothing to undo"
    (retirement,) = _forget(repo, old[:8], "--put-key", key)["retirement_records"]
    assert set(_listed(repo)) == {new}

    before = _records(repo)
    dry = _unforget(repo, old[:8], "--dry-run", "--put-key", key)
    assert dry["unforgotten"] == 1 and dry["unretire_records"] == [] and _records(repo) == before
    doc = _unforget(repo, old[:8], "--put-key", key)
    assert doc["unforgotten"] == 1 and doc["snapshots"][0]["why"] == "its data is all stored"
    (withdrawal,) = doc["unretire_records"]
    data = (repo.path / withdrawal).read_bytes()
    assert data[:4] == MAGIC_UNRETIRED and parse_unretirement(data)[:2] == (retirement, f"snapshots/{old}")
    assert parse_signed(data, MAGIC_UNRETIRED).signer == name_for("clients", load_put_key(str(key)).certificate)
    assert (repo.path / retirement).exists()  # withdrawn, never deleted
    assert set(_listed(repo)) == {old, new}
    for args in (["check"], ["check", "--keyless", "--expect", repo.id]):
        assert js(repo.ok(*args, "--json"))["ok"] is True
    # a policy run keeps it whatever its rules say: the user brought it back
    assert _actions(_forget(repo, "--keep-last", "1", "--put-key", key)) == {new: ["last #1"], old: ["unforgotten"]}
    # forget ID retires it again (a new record), and unforget withdraws that one too
    (again,) = _forget(repo, old[:8], "--put-key", key)["retirement_records"]
    assert again != retirement and set(_listed(repo)) == {new}
    assert _unforget(repo, old[:8], "--put-key", key)["unforgotten"] == 1
    assert set(_listed(repo)) == {old, new}
    # the master key may withdraw too
    _forget(repo, old[:8], "--master-key", repo.master_key)
    assert _unforget(repo, old[:8], "--master-key", repo.master_key)["signer"] == "the master key"
    assert set(_listed(repo)) == {old, new}


def test_unforget_after_prune_says_the_data_is_gone(repo: Repo, tmp_path: Path) -> None:
    _, old, new = _two_backups(repo, tmp_path)
    key = _pruner(repo, tmp_path)
    _forget(repo, old[:8], "--put-key", key)
    for _ in range(2):  # condemn, then delete (no grace)
        repo.ok("prune", "--grace", "0s", "--put-key", key)
    before = _records(repo)
    for args in (["--put-key", key], ["--master-key", repo.master_key]):
        cp = repo.run("unforget", old[:8], *args)
        assert cp.returncode == ExitCode.FATAL, cp.stderr
        assert f"the data of 1 forgotten snapshot(s) is gone ({old[:12]}: " in cp.stderr
        assert "were deleted by `bunker prune`" in cp.stderr and "Nothing was unforgotten" in cp.stderr
        assert "They stay forgotten" in cp.stderr and f"without {old[:12]}" in cp.stderr
    assert _records(repo) == before
    assert _listed(repo, "--all")[old]["retired"] is True


def test_prune_keeps_the_data_of_an_unforgotten_snapshot(repo: Repo, tmp_path: Path) -> None:
    """Forget, prune (condemns the packs only the forgotten snapshot needed), unforget, prune:
    the condemned packs are kept again and the snapshot restores byte for byte."""
    src, old, new = _two_backups(repo, tmp_path)
    key = _pruner(repo, tmp_path)
    packs = {p.name for p in repo.objects("packs")}
    _forget(repo, old[:8], "--put-key", key)
    first = js(repo.ok("prune", "--grace", "0s", "--repack-threshold", "0", "--json", "--put-key", key))
    assert first["condemned"] > 0 and first["deleted"] == 0
    _unforget(repo, old[:8], "--put-key", key)
    second = repo.ok("prune", "--grace", "0s", "--repack-threshold", "0", "--put-key", key)
    assert "deleted 0 packs" in second.stdout and f"kept {first['condemned']} condemned packs" in second.stdout
    assert {p.name for p in repo.objects("packs")} == packs
    target = tmp_path / "t"
    repo.ok("restore", old[:12], "--target", target)
    restored = restored_path(target, src)
    assert len((restored / "only-old").read_bytes()) == 400_000
    assert (restored / "kept").read_bytes() == b"in every snapshot\n"
    shutil.rmtree(target)
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_records_deleted_from_the_storage_are_put_back(repo: Repo, tmp_path: Path) -> None:
    """Deleting an unretire record would make the next prune free the data of a snapshot the user
    brought back; deleting a retirement record would bring back one the user forgot. The machine
    that signed them keeps copies: check reports the loss, forget/unforget/prune put them back."""
    _, old, new = _two_backups(repo, tmp_path)
    key = _pruner(repo, tmp_path)
    (retirement,) = _forget(repo, old[:8], "--put-key", key)["retirement_records"]
    (withdrawal,) = _unforget(repo, old[:8], "--put-key", key)["unretire_records"]
    saved = (repo.path / withdrawal).read_bytes()

    (repo.path / withdrawal).unlink()  # the storage operator
    assert set(_listed(repo)) == {new}  # a listing elsewhere cannot tell
    cp = repo.run("check", "--json")
    assert cp.returncode == ExitCode.INTEGRITY
    (problem,) = [p for p in js(cp)["problems"] if p["object"] == withdrawal]
    assert "this machine signed this retention record" in problem["problem"] and "puts it back" in problem["problem"]
    cp = repo.ok("prune", "--grace", "0s", "--put-key", key)
    assert "1 retention record(s) this machine signed are gone from the repository" in cp.stderr
    assert "They were put back" in cp.stderr
    assert (repo.path / withdrawal).read_bytes() == saved
    assert set(_listed(repo)) == {old, new}
    repo.ok("prune", "--grace", "0s", "--put-key", key)
    assert js(repo.ok("check", "--json"))["ok"] is True  # the data was never condemned
    assert js(repo.ok("restore", old[:12], "--target", tmp_path / "t", "--json"))["stats"]["failed"] == 0
    shutil.rmtree(tmp_path / "t")

    # a retirement deleted: this machine still counts it (a dry run says so), a real run puts it back
    (again,) = _forget(repo, old[:8], "--put-key", key)["retirement_records"]
    (repo.path / again).unlink()
    assert set(_listed(repo)) == {old, new}
    cp = repo.ok("forget", "--keep-last", "1", "--dry-run", "--put-key", key, env=_env(repo))
    assert "This dry run counts them as present" in cp.stderr and old[:12] not in cp.stdout
    assert not (repo.path / again).exists()
    repo.ok("forget", "--keep-last", "1", "--put-key", key)
    assert (repo.path / again).exists() and set(_listed(repo)) == {new}
    assert (repo.path / retirement).read_bytes()[:4] == MAGIC_RETIRED


def test_only_a_valid_unretire_record_withdraws_a_retirement(repo: Repo, tmp_path: Path) -> None:
    """A withdrawal signed by a backup-only client, or one whose retirement names another
    snapshot, withdraws nothing (check names the first); a valid one leaves check clean."""
    _, old, new = _two_backups(repo, tmp_path)
    key = _pruner(repo, tmp_path)
    (retirement,) = _forget(repo, old[:8], "--put-key", key)["retirement_records"]
    backup_only = load_put_key(str(repo.put_key))
    forged = make_unretirement(
        retirement, f"snapshots/{old}", "forged", backup_only.client_key, name_for("clients", backup_only.certificate)
    )
    (repo.path / name_for("retired", forged)).write_bytes(forged)
    pruner = load_put_key(str(key))
    other = make_unretirement(
        retirement, f"snapshots/{new}", "wrong snapshot", pruner.client_key, name_for("clients", pruner.certificate)
    )
    (repo.path / name_for("retired", other)).write_bytes(other)
    assert set(_listed(repo)) == {new}  # still forgotten
    doc = js(repo.run("check", "--json"))
    bad = {p["object"]: p for p in doc["problems"]}
    assert "unretire record not valid" in bad[name_for("retired", forged)]["problem"]
    assert "prune" in bad[name_for("retired", forged)]["problem"]
    assert name_for("retired", other) not in bad  # valid, and names no retirement of its snapshot
    keyless = js(repo.run("check", "--keyless", "--expect", repo.id, "--json"))
    errors = {p["object"] for p in doc["problems"] + keyless["problems"] if p["severity"] == "err"}
    assert errors == {name_for("retired", forged)}
