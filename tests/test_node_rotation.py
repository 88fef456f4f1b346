"""Rotating a node's key (docs/hierarchy.md, "Rotating a node's key"): office rotates in the
middle of the three-level setup of test_node_links.py. Its links go on with the old key until hq
holds a master-signed certificate of the new one and took up the successor record; pieces
written before the rotation still import at hq, pieces after it too (under the new key only),
and receipts keep coming down. A successor record not signed by office's current key is refused."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.errors import ExitCode
from helpers import compare_trees, make_tree, restored_path
from test_node import backup_into
from test_node_links import build


def _downstream_conf(hq: Path) -> dict[str, str]:
    (down,) = json.loads((hq / "node.json").read_text())["downstreams"]
    return dict(down)


def test_rotated_key_carries_on_over_the_link(tmp_path: Path) -> None:
    h = build(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    backup_into(h.top, h.office, src)
    before = h.node("forward", h.office)["deliveries"][0]["pieces"]
    held = tmp_path / "disk-still-at-office"  # written before the rotation, carried later
    held.mkdir()
    for p in before:
        shutil.move(str(h.disk_office / p), str(held / p))

    card = tmp_path / "office-new.card"
    rot = h.node("rotate-key", h.office, "--out", card)
    old_id, new_id = rot["previous_id"], rot["id"]
    assert rot["waiting_links"] == ["hq"] and old_id != new_id
    assert (h.office / "node.key.previous").exists()
    assert h.node("status", h.office)["key_rotation"]["waiting_links"] == ["hq"]

    (src / "more").write_bytes(random.Random(7).randbytes(300_000))
    backup_into(h.top, h.office, src)
    h.node("forward", h.office)
    h.carry_up()
    # the master has not certified the new key yet: hq imports (old key) and keeps the record
    doc = h.node("import", h.hq)
    assert doc["imports"][0]["pieces"] >= 1 and doc["imports"][0]["peer_rotated_to"] is None
    assert any(p["code"] == "successor-waiting" for p in doc["problems"])
    assert _downstream_conf(h.hq)["peer"] == old_id

    # the master certifies the new card; the certificate reaches hq with its next forward, and
    # hq takes the rotation up at its next import
    h.top.ok("key", "new-node", card, "--caps", "relay")
    h.node("forward", h.hq)
    doc = h.node("import", h.hq)
    assert doc["imports"][0]["peer_rotated_to"] == new_id
    conf = _downstream_conf(h.hq)
    assert conf["peer"] == new_id and conf["previous_card"]

    # the pieces written before the rotation still import at hq
    for p in held.iterdir():
        shutil.move(str(p), str(h.disk_hq / p.name))
    imp = h.node("import", h.hq)["imports"][0]
    assert imp["pieces"] == len(before) and imp["quarantined"] == [] and imp["waiting"] == {}
    assert len(h.node("forward", h.hq)["deliveries"][0]["snapshots"]) == 2

    # down: hq now seals to office's new key; office sees it, so its link moves to the new key
    h.carry_down()
    back = h.node("import", h.office)["imports"][0]
    assert set(back["receipts_accepted"]) == {"hop", "record"} and back["receipts_refused"] == []
    assert back["quarantined"] == [] and back["foreign"] == 0
    assert h.node("status", h.office)["key_rotation"]["waiting_links"] == []

    # after the rotation office writes with its new key only: the old key's link keys do not
    # even recognise the piece
    (src / "later").write_bytes(random.Random(8).randbytes(200_000))
    backup_into(h.top, h.office, src)
    (after,) = h.node("forward", h.office)["deliveries"][0]["pieces"]
    from bunker.node.bundle import LinkKeys, identify
    from bunker.node.node_dir import NodeDir

    hq_keys = NodeDir(str(h.hq)).keys
    old_public = NodeDir(str(h.office)).previous_keys
    assert old_public is not None
    old_link = LinkKeys.between(hq_keys, old_public.public(), h.top.id)
    assert identify(str(h.disk_office / after), [old_link]) is None
    h.carry_up()
    imp = h.node("import", h.hq)["imports"][0]
    assert imp["pieces"] == 1 and len(imp["published"]) == 1
    h.node("forward", h.hq)
    h.carry_down()
    back = h.node("import", h.office)["imports"][0]
    assert set(back["receipts_accepted"]) == {"hop", "record"} and back["receipts_refused"] == []
    assert h.node("status", h.office)["repositories"][0]["upstreams"][0]["owed_objects"] == 0

    h.top.ok("check", "--read-data")
    target = tmp_path / "restored"
    h.top.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)
    # one generation is kept: a second rotation is allowed once every link took up the first
    assert h.node("rotate-key", h.office, "--out", tmp_path / "third.card")["waiting_links"] == ["hq"]


def _forge(signer: NodeKeys, claimed_old: str, new: NodeKeys) -> bytes:
    """A successor record naming ``claimed_old`` as the old key, signed by ``signer`` instead."""
    from bunker.node.successor import DOMAIN, MAGIC_SUCCESSOR

    body = encoding.pack({"v": 1, "node": "office", "old": claimed_old, "new": new.public().to_bytes(), "time": 1.0})
    sigs = {"body": body, "old_sig": signer.sign(DOMAIN, body), "new_sig": new.sign(DOMAIN, body)}
    return MAGIC_SUCCESSOR + encoding.pack(sigs)


def test_successor_not_signed_by_the_current_key_is_refused(tmp_path: Path) -> None:
    from bunker.node.node_dir import NodeDir

    h = build(tmp_path)
    card = tmp_path / "office-new.card"
    rot = h.node("rotate-key", h.office, "--out", card)
    h.top.ok("key", "new-node", card, "--caps", "relay")
    h.node("forward", h.hq)  # hq holds the new key's certificate: only the record's signature stands between
    stranger = NodeKeys.from_seed(bytes(range(32)))
    office_new = NodeDir(str(h.office)).keys
    state = h.office / "state" / "rotation.json"
    genuine = json.loads(state.read_text())["record"]

    for forged, why in (
        (_forge(stranger, stranger.node_id, office_new), "not by the far node's current key"),
        (_forge(stranger, rot["previous_id"], office_new), "does not verify with the far node's current key"),
    ):
        doc = json.loads(state.read_text())
        doc["record"], doc["pending"] = forged.hex(), {"hq": 0}
        state.write_text(json.dumps(doc))
        h.node("forward", h.office)  # nothing else to send: the record goes on its own
        h.carry_up()
        got = h.node("import", h.hq, rc=ExitCode.ERR)
        (imp,) = got["imports"]
        assert imp["pieces"] == 1 and imp["peer_rotated_to"] is None
        assert any(why in r["why"] for r in imp["refused"]), imp["refused"]
        assert _downstream_conf(h.hq)["peer"] == rot["previous_id"]
        for p in list(h.disk_hq.iterdir()):
            p.unlink()  # hq's hop receipt: not carried back here

    # the genuine record, sent again, is taken up
    doc = json.loads(state.read_text())
    doc["record"], doc["pending"] = genuine, {"hq": 0}
    state.write_text(json.dumps(doc))
    h.node("forward", h.office)
    h.carry_up()
    assert h.node("import", h.hq)["imports"][0]["peer_rotated_to"] == rot["id"]
    assert _downstream_conf(h.hq)["peer"] == rot["id"]
