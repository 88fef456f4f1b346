"""Links between nodes (docs/hierarchy.md): office sends bundles through a folder standing for a
USB disk (carried by moving its files), hq imports them (staged: a snapshot is published only
with all its packs), forwards to the repository of record, and record receipts come back down;
office evicts to its bound only what they cover. Tampered, foreign, replayed and cut pieces are
named and import nothing; a record receipt from a node without the record capability frees
nothing."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from helpers import Repo, compare_trees, flip_bit, init_repo, js, make_tree, restored_path, run_bunker
from test_node import backup_into, node_cmd


@dataclass
class Hierarchy:
    top: Repo
    office: Path
    hq: Path
    disk_office: Path  # the mailbox folder as office mounts it
    disk_hq: Path  # the same disk as hq mounts it

    def carry_up(self) -> int:
        return _move(self.disk_office, self.disk_hq)

    def carry_down(self) -> int:
        return _move(self.disk_hq, self.disk_office)

    def node(self, *args: str | Path, rc: int | tuple[int, ...] = 0) -> dict[str, Any]:
        doc: dict[str, Any] = js(node_cmd(self.top, *args, "--json", rc=rc))
        return doc

    def up(self) -> None:
        """office -> disk -> hq -> top."""
        self.node("forward", self.office, rc=(0, 1))
        self.carry_up()
        self.node("import", self.hq)
        self.node("forward", self.hq)

    def down(self) -> dict[str, Any]:
        """hq's receipts and records -> disk -> office; office's import."""
        self.carry_down()
        return self.node("import", self.office)

    def round_trip(self) -> dict[str, Any]:
        """Up to the top and the receipts back down to office; office's import."""
        self.up()
        return self.down()


def _move(src: Path, dst: Path) -> int:
    n = 0
    for p in sorted(src.iterdir()):
        shutil.move(str(p), str(dst / p.name))
        n += 1
    return n


def build(
    tmp_path: Path,
    office_caps: str = "relay",
    hq_caps: str = "relay,record",
    hq_seeded_first: bool = False,
    **office_opts: str,
) -> Hierarchy:
    """office -> a folder carried by hand -> hq -> the repository of record. ``hq_seeded_first``:
    hq is seeded before office is certified (its store does not know office yet)."""
    top = init_repo(tmp_path / "top")
    env = top.env
    office, hq = tmp_path / "office", tmp_path / "hq"
    extra = [x for k, v in office_opts.items() for x in (f"--{k.replace('_', '-')}", v)]
    node_cmd(top, "init", office, "--name", "office", *extra)
    node_cmd(top, "init", hq, "--name", "hq")
    order = ((hq, hq_caps), (office, office_caps)) if hq_seeded_first else ((office, office_caps), (hq, hq_caps))
    seed = tmp_path / "top.seed"
    for n, caps in order:
        node_cmd(top, "card", n, "--out", tmp_path / f"{n.name}.card")
        top.ok("key", "new-node", tmp_path / f"{n.name}.card", "--caps", caps)
        if hq_seeded_first:  # each seeded as soon as it is certified
            top.ok("node", "export-seed", seed)
            node_cmd(top, "seed", n, seed)
    if not hq_seeded_first:
        top.ok("node", "export-seed", seed)
        for n in (office, hq):
            node_cmd(top, "seed", n, seed)
    disk_office, disk_hq = tmp_path / "usb-at-office", tmp_path / "usb-at-hq"
    disk_office.mkdir()
    disk_hq.mkdir()
    node_cmd(top, "upstream", "add", hq, "top", "--direct", top.path)
    node_cmd(top, "upstream", "add", office, "hq", "--link", disk_office, "--card", tmp_path / "hq.card")
    node_cmd(top, "downstream", "add", hq, "office", "--link", disk_hq, "--card", tmp_path / "office.card")
    assert run_bunker("node", "status", office, env=env).returncode == 0
    return Hierarchy(top, office, hq, disk_office, disk_hq)


def test_carried_link_delivers_and_record_receipts_allow_eviction(tmp_path: Path) -> None:
    h = build(tmp_path, max_size="4M")
    src = tmp_path / "src"
    make_tree(src)
    (src / "big1").write_bytes(random.Random(1).randbytes(2_500_000))
    backup_into(h.top, h.office, src)
    (src / "big2").write_bytes(random.Random(2).randbytes(2_500_000))
    backup_into(h.top, h.office, src)

    up = h.node("forward", h.office, rc=ExitCode.WARN)
    (delivery,) = up["deliveries"]
    assert len(delivery["snapshots"]) == 2 and delivery["pieces"]
    # the bound is not reached by eviction yet: nothing is recorded upstream
    assert up["evicted"] == [] and any(p["code"] == "store-full" for p in up["problems"])
    assert h.carry_up() == len(delivery["pieces"])

    got = h.node("import", h.hq)
    (imp,) = got["imports"]
    assert len(imp["published"]) == 2 and imp["waiting"] == {} and imp["quarantined"] == []
    assert list(h.disk_hq.iterdir()), "hq answers with a hop receipt on the disk"
    top_fwd = h.node("forward", h.hq)
    assert len(top_fwd["deliveries"][0]["snapshots"]) == 2
    h.top.ok("check", "--read-data")

    assert h.carry_down() >= 2
    back = h.node("import", h.office)
    (imp,) = back["imports"]
    assert set(imp["receipts_accepted"]) == {"hop", "record"} and imp["receipts_refused"] == []
    # now office may evict what hq recorded at the top, down to its bound
    (ev,) = back["evicted"]
    assert ev["evicted"] > 0 and ev["used_after"] <= 4 << 20
    status = h.node("status", h.office)
    assert status["repositories"][0]["upstreams"][0]["owed_objects"] == 0

    # the repository of record restores everything, byte for byte
    target = tmp_path / "restored"
    h.top.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)

    # office still lists what it evicted: the next backup deduplicates against it, and `check`
    # through the node names the evicted packs as held upstream, not as missing
    shutil.copy(src / "big1", src / "big1-again")  # read and chunked anew: its chunks are upstream only
    third = backup_into(h.top, h.office, src)
    assert third["stats"]["stored_new"] < 100_000, third["stats"]
    cp = run_bunker("check", "--json", "--repo", h.office, env=h.top.env)
    doc = js(cp)
    assert cp.returncode == 0, cp.stderr
    assert doc["counts"]["upstream"] == ev["evicted"]


def test_staged_snapshot_waits_for_a_lost_piece(tmp_path: Path) -> None:
    """A split set whose first piece (packs come first) is lost: what needs it waits at hq, the
    hop receipt names what is missing, office resends it, and everything is published."""
    h = build(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(3).randbytes(3_000_000))
    backup_into(h.top, h.office, src)
    (src / "b").write_bytes(random.Random(5).randbytes(3_000_000))
    backup_into(h.top, h.office, src)
    # small pieces: the bundle splits into several, each importable alone
    conf = h.office / "node.json"
    conf.write_text(conf.read_text().replace('"piece_size": 0', f'"piece_size": {4 << 20}'))
    sent = h.node("forward", h.office)["deliveries"][0]
    assert len(sent["pieces"]) >= 2 and len(sent["snapshots"]) == 2
    lost = sent["pieces"][0]  # the first piece carries packs (write order): this disk is lost
    (h.disk_office / lost).unlink()
    h.carry_up()
    imp = h.node("import", h.hq)["imports"][0]
    assert len(imp["waiting"]) >= 1 and len(imp["published"]) + len(imp["waiting"]) == 2
    h.carry_down()
    back = h.node("import", h.office)["imports"][0]
    assert "hop" in back["receipts_accepted"]
    resent = h.node("forward", h.office)["deliveries"][0]
    assert resent["objects"] >= 1 and resent["snapshots"] == []
    h.carry_up()
    imp2 = h.node("import", h.hq)["imports"][0]
    assert len(imp["published"]) + len(imp2["published"]) == 2 and imp2["waiting"] == {}


def test_tampered_foreign_and_replayed_pieces_import_nothing(tmp_path: Path) -> None:
    h = build(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    backup_into(h.top, h.office, src)
    (piece,) = h.node("forward", h.office)["deliveries"][0]["pieces"]
    good = (h.disk_office / piece).read_bytes()

    # a flipped byte: named, quarantined, nothing imported
    flip_bit(h.disk_office / piece, len(good) // 2)
    h.carry_up()
    doc = h.node("import", h.hq, rc=ExitCode.ERR)
    imp = doc["imports"][0]
    assert imp["pieces"] == 0 and imp["objects"] == 0 and len(imp["quarantined"]) == 1
    assert not list((h.hq / "store" / h.top.id / "snapshots").iterdir())

    # a truncated piece: the same
    (h.disk_hq / piece).write_bytes(good[: len(good) - 5000])
    imp = h.node("import", h.hq, rc=ExitCode.ERR)["imports"][0]
    assert imp["pieces"] == 0 and len(imp["quarantined"]) == 1

    # a piece for another node: left alone, noted
    stranger = tmp_path / "stranger"
    node_cmd(h.top, "init", stranger, "--name", "stranger")
    node_cmd(h.top, "card", stranger, "--out", tmp_path / "stranger.card")
    node_cmd(h.top, "seed", stranger, tmp_path / "top.seed")
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    node_cmd(h.top, "upstream", "add", h.office, "stranger", "--link", other_disk, "--card", tmp_path / "stranger.card")
    h.node("forward", h.office, "stranger", rc=(0, 1))
    (foreign,) = list(other_disk.iterdir())
    shutil.copy(foreign, h.disk_hq / foreign.name)
    imp = h.node("import", h.hq)["imports"][0]
    assert imp["foreign"] == 1 and imp["pieces"] == 0
    (h.disk_hq / foreign.name).unlink()

    # the good piece imports; the same piece again is a duplicate, a no-op
    (h.disk_hq / piece).write_bytes(good)
    imp = h.node("import", h.hq)["imports"][0]
    assert imp["pieces"] == 1 and len(imp["published"]) == 1
    for p in list(h.disk_hq.iterdir()):
        p.unlink()  # the hop receipt: not carried back in this test
    (h.disk_hq / piece).write_bytes(good)
    imp = h.node("import", h.hq)["imports"][0]
    assert imp["duplicates"] == 1 and imp["pieces"] == 0 and not (h.disk_hq / piece).exists()


def test_record_receipt_from_a_node_without_record_frees_nothing(tmp_path: Path) -> None:
    h = build(tmp_path, hq_caps="relay", max_size="1M")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(4).randbytes(2_500_000))
    backup_into(h.top, h.office, src)
    h.node("forward", h.office, rc=(0, 1))
    h.carry_up()
    h.node("import", h.hq)
    # hq has no record capability: it issues no record receipt of its own accord; a forged one
    # (made with hq's key by hand) is refused by office
    from bunker.node.node_dir import NodeDir
    from bunker.node.receipts import make_receipt
    from bunker.node.relay_link import queue_receipt

    hq = NodeDir(str(h.hq))
    office_id = NodeDir(str(h.office)).config.node_id
    covers = [f"packs/{p.name}" for p in (h.office / "store" / h.top.id / "packs").iterdir()]
    forged = make_receipt(hq.keys, kind="record", repo=h.top.id, downstream=office_id, seq=1, covers=covers)
    queue_receipt(hq, h.top.id, "office", forged)
    h.node("forward", h.hq, rc=(0, 1))
    h.carry_down()
    doc = h.node("import", h.office, rc=ExitCode.ERR)
    imp = doc["imports"][0]
    assert any("record capability" in why for why in imp["receipts_refused"])
    assert doc["evicted"] == []
    assert len(list((h.office / "store" / h.top.id / "packs").iterdir())) == len(covers)


def test_an_online_link_through_an_s3_prefix(tmp_path: Path, s3_server: Any, s3_prefix: str) -> None:
    """The same link with its mailbox on an object store: both nodes name one S3 prefix, nothing is
    carried; data goes up and the record receipts come down through it."""
    top = init_repo(tmp_path / "top")
    env = dict(top.env, **s3_server.env())
    top.env.update(env)
    office, hq = tmp_path / "office", tmp_path / "hq"
    for n, caps in ((office, "relay"), (hq, "relay,record")):
        node_cmd(top, "init", n, "--name", n.name)
        node_cmd(top, "card", n, "--out", tmp_path / f"{n.name}.card")
        top.ok("key", "new-node", tmp_path / f"{n.name}.card", "--caps", caps)
    seed = tmp_path / "top.seed"
    top.ok("node", "export-seed", seed)
    mailbox = s3_server.url(s3_prefix + "-mailbox")
    for n in (office, hq):
        node_cmd(top, "seed", n, seed)
    node_cmd(top, "upstream", "add", hq, "top", "--direct", top.path)
    node_cmd(top, "upstream", "add", office, "hq", "--link", mailbox, "--card", tmp_path / "hq.card")
    node_cmd(top, "downstream", "add", hq, "office", "--link", mailbox, "--card", tmp_path / "office.card")
    src = tmp_path / "src"
    make_tree(src)
    backup_into(top, office, src)
    node_cmd(top, "forward", office)
    imp = js(node_cmd(top, "import", hq, "--json"))["imports"][0]
    assert len(imp["published"]) == 1 and imp["foreign"] == 0
    node_cmd(top, "forward", hq)
    back = js(node_cmd(top, "import", office, "--json"))["imports"][0]
    assert "record" in back["receipts_accepted"] and back["foreign"] == 0
    assert len(js(top.ok("snapshots", "--json"))["snapshots"]) == 1
    top.ok("check", "--read-data")


def test_one_node_relays_two_repositories(tmp_path: Path) -> None:
    a = init_repo(tmp_path / "a")
    b = init_repo(tmp_path / "b")
    node = tmp_path / "node"
    node_cmd(a, "init", node, "--name", "shared")
    node_cmd(a, "card", node, "--out", tmp_path / "node.card")
    for repo in (a, b):
        repo.ok("key", "new-node", tmp_path / "node.card", "--seed-out", tmp_path / f"{repo.id}.seed")
        node_cmd(repo, "seed", node, tmp_path / f"{repo.id}.seed")
        node_cmd(repo, "upstream", "add", node, f"top-{repo.id[:8]}", "--direct", repo.path)
    src = tmp_path / "src"
    make_tree(src)
    # naming only the node is ambiguous now: the message says how to name one
    cp = run_bunker("backup", src, "--repo", node, env=a.env)
    assert cp.returncode == ExitCode.USAGE and "relays 2 repositories" in cp.stderr, cp.stderr
    for repo in (a, b):
        backup_into(repo, node / repo.id, src)
    doc = js(node_cmd(a, "forward", node, "--json"))
    assert sorted(len(d["snapshots"]) for d in doc["deliveries"]) == [1, 1]
    for repo in (a, b):
        assert len(js(repo.ok("snapshots", "--json"))["snapshots"]) == 1
        repo.ok("check")


def test_a_piece_from_a_node_certified_after_the_receiver_was_seeded_waits_in_the_mailbox(tmp_path: Path) -> None:
    """hq was seeded before office was certified: office's piece is no damage, so it stays in the
    mailbox (a warning with the next step) and is imported once hq's records came down."""
    h = build(tmp_path, hq_seeded_first=True)
    top, hq = h.top, h.hq
    src = tmp_path / "src"
    make_tree(src)
    backup_into(top, h.office, src)
    node_cmd(top, "forward", h.office)
    h.carry_up()
    disk = h.disk_hq
    pieces = sorted(p.name for p in disk.iterdir())
    assert pieces

    first = js(node_cmd(top, "import", hq, "--json", rc=ExitCode.WARN))
    (waiting,) = {p["code"] for p in first["problems"]} - {"foreign-pieces"}
    assert waiting == "sender-unknown", first["problems"]
    assert "node forward" in first["problems"][0]["message"]
    assert not (hq / "state" / "quarantine").exists() or not any((hq / "state" / "quarantine").iterdir())
    assert set(pieces) <= {p.name for p in disk.iterdir()}  # left where they were

    node_cmd(top, "forward", hq)  # office's certificate comes down from the top
    second = js(node_cmd(top, "import", hq, "--json"))
    assert second["imports"][0]["pieces"] == len(pieces) and len(second["imports"][0]["published"]) == 1
    node_cmd(top, "forward", hq)
    assert len(top.objects("snapshots")) == 1


def test_objects_delivered_but_not_recorded_are_recorded_by_the_next_forward(tmp_path: Path) -> None:
    """A `node forward` killed between writing what it delivered and what is recorded left
    objects at the top that hq never recorded: no record receipt ever named them, and office,
    which may evict only what is recorded, stayed over its bound (test_node_faults, seen in CI).
    The state is now written the other way round, and a forward repairs one left so before."""
    h = build(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(3).randbytes(2_500_000))
    backup_into(h.top, h.office, src)
    h.round_trip()
    # as that kill leaves it: delivered to the top, not recorded by hq, so never receipted down
    (hq_state,) = h.hq.glob("state/*/up/top")
    recorded = json.loads((hq_state / "recorded.json").read_text())
    dropped = sorted(n for n in recorded if n.startswith(("packs/", "refs/", "index/")))
    assert dropped
    (hq_state / "recorded.json").write_text(json.dumps({n: t for n, t in recorded.items() if n not in dropped}))
    (receipted,) = h.hq.glob("state/*/down/office/receipted.json")
    receipted.write_text(json.dumps({n: t for n, t in json.loads(receipted.read_text()).items() if n not in dropped}))
    (office_state,) = h.office.glob("state/*/up/hq")
    was = json.loads((office_state / "recorded.json").read_text())
    (office_state / "recorded.json").write_text(json.dumps({n: t for n, t in was.items() if n not in dropped}))

    h.node("forward", h.office, rc=(0, ExitCode.WARN))
    h.carry_up()
    h.node("import", h.hq)
    fwd = h.node("forward", h.hq)
    assert fwd["deliveries"][0]["present"] >= len(dropped) and fwd["deliveries"][0]["sent"] == 0
    assert set(dropped) <= set(json.loads((hq_state / "recorded.json").read_text()))
    h.down()  # the record receipt naming them reaches office
    assert set(dropped) <= set(json.loads((office_state / "recorded.json").read_text()))


def test_a_killed_forwards_or_imports_piece_files_are_removed_once_stale(tmp_path: Path) -> None:
    """A forward killed before its piece went into the mailbox (or an import killed while it held
    a fetched copy) leaves the file in the node's state: the next forward or import removes it
    once an hour old, and leaves a fresh one alone."""
    h = build(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    backup_into(h.top, h.office, src)
    planted = {}
    for node, folder in ((h.office, "outgoing"), (h.hq, "incoming")):
        where = node / "state" / folder
        where.mkdir(parents=True, exist_ok=True)
        stale, fresh = where / ("a" * 64), where / ("b" * 64)
        stale.write_bytes(b"left by a killed process " * 1000)
        fresh.write_bytes(b"maybe still in use")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        planted[folder] = (stale, fresh)
    h.up()
    for stale, fresh in planted.values():
        assert not stale.exists() and fresh.exists()
    h.top.ok("check", "--read-data")
