"""Nodes as witnesses of the newest snapshots (docs/hierarchy.md, "Witnesses"): a node remembers,
per client, the newest snapshot it saw the repository of record hold (its own direct delivery,
or a record receipt); `bunker node witness` signs that, and `bunker check --witness` (a statement
file or the node directory) names a snapshot the top's storage withheld or rolled back, which a
check without the witness cannot see. A statement altered, from a node not certified, revoked,
or for another repository is refused by name; a snapshot forgotten at the top is no loss.

The checks run in an environment of their own (no chain head of the client remembered there),
so only the node witnesses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.errors import ExitCode
from bunker.repo.repository import Repository
from bunker.repo.witnesses import WitnessedHead, make_statement, read_statement
from bunker.storage.local import LocalBackend
from helpers import Repo, init_repo, js, make_env, make_tree, run_bunker
from test_node import backup_into, make_node, node_cmd, office_with_top
from test_node_links import build
from test_unforget import _pruner


def _check(top: Repo, where: Path, *witnesses: str | Path) -> subprocess.CompletedProcess[str]:
    """A keyless check of the top on another machine (``where``: nothing of the client there)."""
    args = [x for w in witnesses for x in ("--witness", str(w))]
    cp = run_bunker("check", "--keyless", "--expect", top.id, "--repo", top.path, *args, env=make_env(where))
    assert "Traceback" not in cp.stderr + cp.stdout, cp.stderr
    return cp


def _check_json(top: Repo, where: Path, *witnesses: str | Path) -> tuple[int, dict[str, Any]]:
    args = [x for w in witnesses for x in ("--witness", str(w))]
    cp = run_bunker("check", "--keyless", "--expect", top.id, "--repo", top.path, *args, "--json", env=make_env(where))
    assert "Traceback" not in cp.stderr + cp.stdout, cp.stderr
    doc: dict[str, Any] = js(cp)
    return cp.returncode, doc


def _about(doc: dict[str, Any], obj: str) -> list[dict[str, str]]:
    return [p for p in doc["problems"] if p["object"] == obj]


def _two_backups_through(top: Repo, node: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    backup_into(top, node, src)
    (src / "second").write_bytes(b"the newest backup has this\n")
    backup_into(top, node, src)


def _direct(tmp_path: Path) -> tuple[Repo, Path, str]:
    """Client -> office -> (direct) top, two snapshots forwarded; returns the newest's name."""
    top, office = office_with_top(tmp_path)
    _two_backups_through(top, office, tmp_path)
    node_cmd(top, "forward", office)
    (repo_status,) = js(node_cmd(top, "status", office, "--json"))["repositories"]
    (head,) = repo_status["witnessed"]
    assert head["seq"] == 2 and head["via"] == "direct" and head["source"] == "top", head
    assert (top.path / head["snapshot"]).is_file()
    return top, office, head["snapshot"]


def test_a_direct_upstream_witnesses_a_withheld_snapshot(tmp_path: Path) -> None:
    top, office, newest = _direct(tmp_path)
    rc, doc = _check_json(top, tmp_path / "auditor", office)
    assert rc == 0 and doc["counts"]["witnessed_heads"] == 1, doc

    (top.path / newest).unlink()  # the top's storage withholds the newest snapshot (or rolled back)
    rc, doc = _check_json(top, tmp_path / "auditor")
    assert rc == 0 and doc["ok"], doc  # nothing inside the storage tells

    rc, doc = _check_json(top, tmp_path / "auditor", office)  # the node directory as the witness
    assert rc == ExitCode.INTEGRITY, doc
    (problem,) = _about(doc, newest)
    text = problem["problem"]
    assert "node 'office' saw the repository hold client 'testclient''s snapshot #2" in text, text
    assert "read at its direct upstream 'top'" in text and "newest is #1" in text and "rolled back" in text, text
    assert f"copy {newest}" in text and "`bunker check` here again" in text, text

    statement = tmp_path / "office.witness"
    made = js(node_cmd(top, "witness", office, "--out", statement, "--json"))
    assert made["repository"] == top.id and [h["snapshot"] for h in made["heads"]] == [newest], made
    cp = _check(top, tmp_path / "auditor", statement)
    assert cp.returncode == ExitCode.INTEGRITY, cp.stdout
    assert f"err: {newest}: node 'office' saw the repository hold" in cp.stdout, cp.stdout


def test_a_record_receipt_through_a_link_witnesses_a_withheld_snapshot(tmp_path: Path) -> None:
    h = build(tmp_path)
    _two_backups_through(h.top, h.office, tmp_path)
    assert "record" in h.round_trip()["imports"][0]["receipts_accepted"]
    (head,) = h.node("status", h.office)["repositories"][0]["witnessed"]
    assert (head["seq"], head["via"], head["source"], head["receipt"]) == (2, "record", "hq", 1), head
    newest = head["snapshot"]

    (h.top.path / newest).unlink()
    rc, doc = _check_json(h.top, tmp_path / "auditor", h.office)
    assert rc == ExitCode.INTEGRITY, doc
    (problem,) = _about(doc, newest)
    assert (
        "node 'office' saw the repository hold client 'testclient''s snapshot #2 (record receipt #1 from node 'hq'"
        in (problem["problem"])
    ), problem
    statement = tmp_path / "office.witness"
    node_cmd(h.top, "witness", h.office, "--repo", h.top.id, "--out", statement)
    rc, doc = _check_json(h.top, tmp_path / "auditor", statement)
    assert rc == ExitCode.INTEGRITY and _about(doc, newest), doc


def test_altered_foreign_and_revoked_statements_are_refused(tmp_path: Path) -> None:
    top, office, newest = _direct(tmp_path)
    statement = tmp_path / "office.witness"
    node_cmd(top, "witness", office, "--out", statement)
    good = statement.read_bytes()
    (top.path / newest).unlink()

    def refused(path: Path, why: str) -> None:
        rc, doc = _check_json(top, tmp_path / "auditor", path)
        assert rc == ExitCode.INTEGRITY, doc
        (problem,) = _about(doc, str(path))
        assert problem["problem"].startswith("witness statement refused: ") and why in problem["problem"], problem
        assert problem["cause"] == "witness" and not _about(doc, newest), doc  # what it says is not used

    # one byte of the snapshot's name changed: the node's signature no longer holds
    altered = tmp_path / "altered.witness"
    at = good.index(newest.split("/")[1].encode())
    altered.write_bytes(good[:at] + (b"0" if good[at : at + 1] != b"0" else b"1") + good[at + 1 :])
    refused(altered, "signature does not verify")
    # whatever bit is flipped, the statement is refused with a reason (never trusted, never a crash)
    repo = Repository.open(LocalBackend(str(top.path)), top.id)
    read_statement(repo, good)
    for offset in range(len(good)):
        for bit in (0, 7):
            bad = bytearray(good)
            bad[offset] ^= 1 << bit
            with pytest.raises(encoding.FormatError):
                read_statement(repo, bytes(bad))
    # signed by a node the master key never certified, claiming the same head
    stranger = tmp_path / "stranger.witness"
    witnessed = js(node_cmd(top, "status", office, "--json"))["repositories"][0]["witnessed"]
    heads = [WitnessedHead.from_body(h) for h in witnessed]
    stranger.write_bytes(make_statement(NodeKeys.from_seed(os.urandom(32)), top.id, heads))
    refused(stranger, "no certificate of node")
    # not a statement at all
    junk = tmp_path / "junk.witness"
    junk.write_bytes(os.urandom(300))
    refused(junk, "not a witness statement")
    # a statement of another repository's node
    other = init_repo(tmp_path / "other")
    far = make_node(other, tmp_path / "far", "far")
    foreign = tmp_path / "far.witness"
    node_cmd(other, "witness", far, "--out", foreign)
    refused(foreign, f"made for repository '{other.id}', not this one")

    # the node revoked at the top: neither its statement file nor its directory is believed
    top.ok("key", "revoke-node", "office")
    refused(statement, "node 'office'")
    refused(statement, "is revoked in this repository's config")
    rc, doc = _check_json(top, tmp_path / "auditor", office)
    assert rc == ExitCode.INTEGRITY and not _about(doc, newest), doc
    (problem,) = _about(doc, str(office))
    assert "revoked" in problem["problem"], problem
    human = _check(top, tmp_path / "auditor", statement)
    assert "witness statement(s) refused" in human.stdout, human.stdout


def test_a_snapshot_forgotten_at_the_top_is_not_withheld(tmp_path: Path) -> None:
    top, office, newest = _direct(tmp_path)
    key = _pruner(top, tmp_path)
    top.ok("forget", newest.split("/")[1][:12], "--put-key", key)
    top.ok("prune", "--grace", "0s", "--put-key", key)
    rc, doc = _check_json(top, tmp_path / "auditor", office)
    assert rc == 0 and doc["ok"] and not _about(doc, newest), doc
    # even with the forgotten snapshot's envelope gone (bunker keeps it: someone deleted it), no
    # backup is lost: a warning, not damage
    (top.path / newest).unlink()
    rc, doc = _check_json(top, tmp_path / "auditor", office)
    assert rc == 0 and doc["ok"], doc
    (problem,) = _about(doc, newest)
    assert problem["severity"] == "warn" and "was forgotten" in problem["problem"], problem
