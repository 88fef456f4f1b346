"""A client that moves between nodes (docs/hierarchy.md, "A client that moves between nodes"): it
backs up through office, whose link to hq is a disk not carried yet, then through branch, which
delivers straight to the repository of record. The top holds #1..#2 and #5; #3..#4 wait on the
disk. office's holding record, sent in the first piece ahead of the data, makes that gap a note
("in transit") instead of damage; a forged, altered, uncertified or revoked node's record hides
nothing; once the data arrives the chain is whole and prune removes the records."""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from bunker.repo.objects import MAGIC_HOLDING
from helpers import Repo, b3, flip_bit, js, make_tree, run_bunker
from test_node import backup_into, make_node, node_cmd
from test_node_links import Hierarchy, build


@dataclass
class Moved:
    h: Hierarchy
    branch: Path
    src: Path
    rest: list[str]  # office's pieces still on the disk at office


def holding_records(store: Path) -> list[Path]:
    gc = store / "gc"
    return sorted(p for p in gc.iterdir() if p.read_bytes()[:4] == MAGIC_HOLDING) if gc.is_dir() else []


def records_of(store: Path, node: Path) -> list[Path]:
    """The holding records in ``store`` that the node in directory ``node`` signed."""
    from bunker.node.node_dir import NodeDir
    from bunker.repo.holding_records import parse_holding

    node_id = NodeDir(str(node)).config.node_id
    return [p for p in holding_records(store) if parse_holding(p.name, p.read_bytes())[0].node == node_id]


def check_top(top: Repo, rc: int | tuple[int, ...], **env: str) -> dict[str, Any]:
    """A keyless check of the repository of record: node certificates are all it needs."""
    cp = run_bunker("check", "--keyless", "--expect", top.id, "--json", "--repo", top.path, env={**top.env, **env})
    codes = (rc,) if isinstance(rc, int) else rc
    assert cp.returncode in codes, cp.stdout + cp.stderr
    doc: dict[str, Any] = js(cp)
    return doc


def problems(doc: dict[str, Any], severity: str) -> list[str]:
    return [p["problem"] for p in doc["problems"] if p["severity"] == severity]


def move_client(tmp_path: Path) -> Moved:
    """#1..#2 through office reach the top; #3..#4 through office wait on the disk; the client
    moves to branch, whose #5 reaches the top. Nothing of the disk is carried yet."""
    h = build(tmp_path)
    conf = h.office / "node.json"  # small pieces: the bundle of #3..#4 spans several
    conf.write_text(conf.read_text().replace('"piece_size": 0', f'"piece_size": {4 << 20}'))
    branch = make_node(h.top, tmp_path / "branch", "branch")
    node_cmd(h.top, "upstream", "add", branch, "top", "--direct", h.top.path)
    src = tmp_path / "src"
    make_tree(src)
    for i in (1, 2):
        (src / f"s{i}").write_bytes(random.Random(i).randbytes(20_000))
        backup_into(h.top, h.office, src)
    h.round_trip()
    assert len(h.top.objects("snapshots")) == 2

    for i in (3, 4):
        (src / f"s{i}").write_bytes(random.Random(i).randbytes(3_000_000))
        backup_into(h.top, h.office, src)
    sent = h.node("forward", h.office, rc=(0, 1))["deliveries"][0]
    assert len(sent["pieces"]) >= 2 and len(sent["snapshots"]) == 2, sent
    office_store = h.office / "store" / h.top.id
    (own,) = holding_records(office_store)  # the one of #1..#2 is superseded: dropped
    # nothing changed: the next forward writes no new record (and sends nothing)
    again = h.node("forward", h.office, rc=(0, 1))["deliveries"][0]
    assert again["pieces"] == [] and holding_records(office_store) == [own]

    # the client moves: its repository is now branch (its chain head, #4, stays on this machine)
    (src / "s5").write_bytes(random.Random(5).randbytes(20_000))
    fifth = backup_into(h.top, branch, src, rc=(0, ExitCode.WARN))
    (moved,) = [e for e in fifth["events"] if e["code"] == "chain-rollback"]
    assert "node 'branch' holds this client's snapshots up to #0, but this client wrote #4" in moved["message"]
    assert "If this client backed up through another node before, that is expected" in moved["message"]
    up = js(node_cmd(h.top, "forward", branch, "--json"))["deliveries"][0]
    assert up["snapshots"] and up["held"] == [], up
    assert len(h.top.objects("snapshots")) == 3
    return Moved(h, branch, src, sent["pieces"])


def carry_first_piece(m: Moved) -> None:
    """Only the first piece travels (the holding record is in it); hq passes the record on."""
    first = m.rest.pop(0)
    shutil.move(str(m.h.disk_office / first), str(m.h.disk_hq / first))
    imp = m.h.node("import", m.h.hq)["imports"][0]
    assert imp["pieces"] == 1 and imp["published"] == [] and imp["refused"] == [], imp
    m.h.node("forward", m.h.hq)


def test_a_gap_in_transit_is_a_note_until_the_data_arrives(tmp_path: Path) -> None:
    m = move_client(tmp_path)
    h, top = m.h, m.h.top

    # nothing of office's has reached the top: the gap is damage
    doc = check_top(top, ExitCode.INTEGRITY)
    assert any("snapshots #3..#4 are missing (deleted or withheld)" in p for p in problems(doc, "err")), doc

    carry_first_piece(m)
    # office's newest record (#3..#4) is at the top, beside older ones (#1..#2: office's, hq's; #5:
    # branch's) that a prune removes
    (own,) = holding_records(h.office / "store" / top.id)
    record = top.path / "gc" / own.name
    assert record in records_of(top.path, h.office)
    doc = check_top(top, 0)
    (note,) = [p for p in problems(doc, "note") if "in transit" in p]
    assert "client 'testclient': snapshots #3..#4 are in transit: node 'office' holds them since" in note
    assert "(waiting for its upstream 'hq')" in note
    assert problems(doc, "err") == []
    # in transit for longer than BUNKER_RECORD_WARN_DAYS (counted from the client's #5): a warning
    doc = check_top(top, 0, BUNKER_RECORD_WARN_DAYS="0")
    (late,) = [p for p in problems(doc, "warn") if "#3..#4 are still not here" in p]
    assert "node 'office' holds them since" in late and "run `bunker node status` on it" in late

    # the record is what makes the difference
    aside = tmp_path / record.name
    shutil.move(str(record), str(aside))
    doc = check_top(top, ExitCode.INTEGRITY)
    assert any("snapshots #3..#4 are missing" in p for p in problems(doc, "err")), doc
    shutil.move(str(aside), str(record))

    # holding records only go up: branch brings the top's records down without office's
    node_cmd(top, "forward", m.branch)
    assert not (m.branch / "store" / top.id / "gc" / record.name).exists()

    # the rest of the disk travels: #3..#4 arrive, the chain is whole, no note any more
    h.carry_up()
    h.node("import", h.hq)
    h.node("forward", h.hq)
    assert len(top.objects("snapshots")) == 5
    doc = check_top(top, 0)
    assert not [p for p in doc["problems"] if "in transit" in p["problem"] or "missing" in p["problem"]], doc
    assert holding_records(top.path), "hq's and office's records are still there before a prune"
    # hq's own record (it held #3..#4 for the top) never goes down to office
    assert {p.name for p in holding_records(h.hq / "store" / top.id)} - {record.name}
    h.carry_down()
    h.node("import", h.office)
    assert [p.name for p in holding_records(h.office / "store" / top.id)] == [record.name]

    pruner = tmp_path / "pruner.put"
    top.ok("key", "new-client", "pruner", "--prune", "--out", pruner)
    top.ok("prune", "--put-key", pruner, "--grace", "0s", rc=(0, 1))
    assert holding_records(top.path) == []
    top.ok("check")


def _resign(data: bytes, seed: bytes) -> bytes:
    """The record's body as it is, signed by another node key."""
    from bunker import encoding
    from bunker.crypto.node_keys import NodeKeys
    from bunker.repo.holding_records import DOMAIN

    body = encoding.unpack(data[4:])["body"]
    return MAGIC_HOLDING + encoding.pack({"body": body, "sig": NodeKeys.from_seed(seed).sign(DOMAIN, body)})


def _as_own(top: Repo, data: bytes, keys_seed: bytes) -> bytes:
    """The same claims, signed by a node of its own (``keys_seed``) that is not certified."""
    from bunker.crypto.node_keys import NodeKeys
    from bunker.repo.holding_records import make_holding, parse_holding

    record, _, _, _ = parse_holding("", data)
    return make_holding(NodeKeys.from_seed(keys_seed), top.id, record.upstream, record.held)


def test_a_forged_or_revoked_nodes_holding_record_hides_nothing(tmp_path: Path) -> None:
    m = move_client(tmp_path)
    h, top = m.h, m.h.top
    carry_first_piece(m)
    (own,) = holding_records(h.office / "store" / top.id)
    record = top.path / "gc" / own.name
    good = record.read_bytes()
    assert check_top(top, 0)

    def gap_is_damage(why: str) -> None:
        doc = check_top(top, ExitCode.INTEGRITY)
        assert any("snapshots #3..#4 are missing" in p for p in problems(doc, "err")), doc
        assert any(why in p["problem"] for p in doc["problems"]), doc

    # altered in storage: its bytes no longer match its name
    flip_bit(record, len(good) - 80)
    gap_is_damage("its bytes do not match its name")
    record.unlink()

    # another key's signature under office's node id; the same claims from an uncertified node
    forgeries = [_resign(good, os.urandom(32)), _as_own(top, good, os.urandom(32))]
    for forged in forgeries:
        path = top.path / "gc" / b3(forged)
        path.write_bytes(forged)
        gap_is_damage("holding record not authentic")
        path.unlink()

    # office's own key, but #3 does not link to #2: a certified node's word is not believed either
    # when its snapshots do not fit the chain around the gap
    from bunker.node.node_dir import NodeDir
    from bunker.repo.holding_records import Held, make_holding, parse_holding

    claims = parse_holding("", good)[0]
    bent = {
        c: [Held(x.seq, x.name, "snapshots/" + "0" * 64 if x.seq == 3 else x.prev, x.since) for x in hs]
        for c, hs in claims.held.items()
    }
    data = make_holding(NodeDir(str(h.office)).keys, top.id, claims.upstream, bent)
    path = top.path / "gc" / b3(data)
    path.write_bytes(data)
    gap_is_damage("holding records of node 'office' name snapshots there, but they do not cover the gap")
    path.unlink()

    # a node below forwards a forged record: hq refuses it on import, it never reaches the top
    forged = forgeries[1]
    office_gc = h.office / "store" / top.id / "gc"
    (office_gc / b3(forged)).write_bytes(forged)
    out = h.node("forward", h.office, rc=(0, 1))["deliveries"][0]
    assert out["pieces"], out
    for p in out["pieces"]:
        shutil.move(str(h.disk_office / p), str(h.disk_hq / p))
    imp = h.node("import", h.hq, rc=ExitCode.ERR)
    assert any(
        p["code"] == "object-refused" and "not a valid holding record" in p["message"] for p in imp["problems"]
    ), imp["problems"]
    assert not (top.path / "gc" / b3(forged)).exists()

    # office's genuine record again; once office is revoked, its word counts no more
    record.write_bytes(good)
    assert check_top(top, 0)
    top.ok("key", "revoke-node", "office")
    gap_is_damage("holding record not authentic")
    # it hides nothing, so a prune removes it
    pruner = tmp_path / "pruner.put"
    top.ok("key", "new-client", "pruner", "--prune", "--out", pruner)
    top.ok("prune", "--put-key", pruner, "--grace", "0s", rc=(0, 1))
    assert not record.exists()
