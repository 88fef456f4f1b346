"""Kills at named points of the node code that kills at random moments rarely hit
(tests/test_node_faults.py is the random schedule): the real CLI kills itself with SIGKILL when a
named function is called (tests/tools/bunker_killed_at.py), then the next runs must repair or
ignore what it left, on the three-level setup of tests/test_node_links.py with office bounded."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import js, run_bunker
from test_node_faults import NODE_OK, STEP_TIMEOUT, held_bytes, pieces_written
from test_node_links import Hierarchy, build

KILLED_AT = [sys.executable, str(Path(__file__).resolve().parent / "tools" / "bunker_killed_at.py")]


def killed_at(h: Hierarchy, where: str, *args: str | Path, nth: int = 1, when: str = "before") -> None:
    """`bunker node ARGS`, killed by SIGKILL at ``where`` (tests/tools/bunker_killed_at.py); the
    run must really get there."""
    env = dict(h.top.env, BUNKER_TEST_KILL_AT=where, BUNKER_TEST_KILL_NTH=str(nth), BUNKER_TEST_KILL_WHEN=when)
    cp = subprocess.run(
        [*KILLED_AT, "node", *map(str, args), "--json"], env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT
    )
    assert cp.returncode == -signal.SIGKILL, f"node {args} did not reach {where}: rc {cp.returncode} {cp.stderr}"


def node_json(h: Hierarchy, *args: str | Path) -> dict[str, Any]:
    """A `bunker node` command that must end ok, note or warn (never err)."""
    cp = run_bunker("node", *args, "--json", env=h.top.env)
    assert cp.returncode in NODE_OK, f"node {args}: rc {cp.returncode}: {cp.stderr}"
    doc: dict[str, Any] = js(cp)
    return doc


def small_hierarchy(tmp_path: Path) -> tuple[Hierarchy, Path]:
    """The three levels, office bounded at 1 MiB, and one backup of 2.5 MB into office."""
    h = build(tmp_path, max_size="1M")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(7).randbytes(2_500_000))
    cp = run_bunker("backup", src, "--json", "--repo", h.office, env=h.top.env)
    assert cp.returncode == 0, cp.stderr
    return h, src


def up_to_hq(h: Hierarchy) -> None:
    """The client's spool (a backup made while office was full) into office, then up to hq."""
    cp = run_bunker("forward", "--repo", h.office, env=h.top.env)
    assert cp.returncode in (0, 1), cp.stderr  # 1: office is still full, the spool waits
    node_json(h, "forward", h.office)
    h.carry_up()
    node_json(h, "import", h.hq)


def down_to_office(h: Hierarchy) -> dict[str, Any]:
    node_json(h, "forward", h.hq)
    h.carry_down()
    return node_json(h, "import", h.office)


def assert_settled(h: Hierarchy) -> None:
    """Everything office holds is at the top under a record receipt office accepted; office is
    within its bound; both copies check clean."""
    store = h.office / "store" / h.top.id
    state = h.office / "state" / h.top.id
    recorded = json.loads((state / "up" / "hq" / "recorded.json").read_text())
    evicted = json.loads((state / "evicted.json").read_text()) if (state / "evicted.json").exists() else {}
    packs = {f"packs/{p.name}" for p in (store / "packs").iterdir() if not p.name.startswith(".")}
    assert packs | set(evicted) <= set(recorded), "office holds packs no record receipt covers: it cannot evict them"
    assert all((h.top.path / n).is_file() for n in recorded)
    snaps = {p.name for p in (store / "snapshots").iterdir() if not p.name.startswith(".")}
    assert snaps <= {p.name for p in (h.top.path / "snapshots").iterdir()}
    held = held_bytes(store)
    assert held <= 1 << 20, f"office holds {held} bytes, over its bound"
    h.top.ok("check", "--read-data")
    cp = run_bunker("check", "--repo", h.office, env=h.top.env)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_killed_between_mailbox_put_and_sent_log_resends(tmp_path: Path) -> None:
    """office killed after its piece is in the mailbox, before its sent log says so: the next
    forward sends the objects again; at hq the second copy changes nothing."""
    h, _ = small_hierarchy(tmp_path)
    killed_at(h, "bunker.node.relay_link:SentLog.save", "forward", h.office)
    first = sorted(p.name for p in h.disk_office.iterdir())
    assert first, "the piece reached the mailbox before the kill"
    again = node_json(h, "forward", h.office)
    assert pieces_written(again) >= 1 and again["deliveries"][0]["objects"] >= 1
    h.carry_up()
    imp = node_json(h, "import", h.hq)["imports"][0]
    assert imp["pieces"] == len(first) + pieces_written(again) and len(imp["published"]) == 1
    assert imp["quarantined"] == [] and imp["refused"] == []
    down_to_office(h)
    assert_settled(h)


def test_killed_between_import_and_mailbox_delete_reimports_as_duplicate(tmp_path: Path) -> None:
    """hq killed after importing a piece, before removing it from the mailbox: the piece is a
    duplicate next time (a no-op), and what it carried is still receipted down to office, which
    may then evict it."""
    h, _ = small_hierarchy(tmp_path)
    node_json(h, "forward", h.office)
    h.carry_up()
    killed_at(h, "bunker.storage.mailbox_local:LocalMailbox._delete", "import", h.hq)
    assert list(h.disk_hq.iterdir()), "the piece is still in the mailbox"
    imp = node_json(h, "import", h.hq)["imports"][0]
    assert imp["duplicates"] == 1 and imp["pieces"] == 0 and len(imp["published"]) == 1
    back = down_to_office(h)
    assert "record" in back["imports"][0]["receipts_accepted"]
    assert_settled(h)


def test_killed_between_eviction_record_and_delete(tmp_path: Path) -> None:
    """office killed after writing that it evicted a pack, before deleting it: it lists a pack
    it still holds (harmless), checks clean, and the next run deletes it."""
    h, src = small_hierarchy(tmp_path)
    up_to_hq(h)
    node_json(h, "forward", h.hq)
    h.carry_down()
    killed_at(h, "bunker.node.eviction:write_json", "import", h.office, when="after")
    state = h.office / "state" / h.top.id
    evicted = json.loads((state / "evicted.json").read_text())
    (name,) = evicted
    store = h.office / "store" / h.top.id
    assert (store / name).is_file(), "the pack is still there"
    cp = run_bunker("check", "--repo", h.office, env=h.top.env)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    node_json(h, "import", h.office)
    assert not (store / name).exists()
    # a client backs up through office, deduplicating against what it evicted
    shutil.copy(src / "a", src / "b")
    doc = js(run_bunker("backup", src, "--json", "--repo", h.office, env=h.top.env))
    assert doc["stats"]["stored_new"] < 100_000 and not doc["spooled"]
    up_to_hq(h)
    down_to_office(h)
    assert_settled(h)


def test_killed_between_receipt_accepted_and_applied(tmp_path: Path) -> None:
    """office killed while it takes in a record receipt, after it noted the receipt in the
    issuer's chain and before it marked what it covers as recorded: the receipt is imported
    again and applied, and office evicts."""
    h, _ = small_hierarchy(tmp_path)
    up_to_hq(h)
    h.carry_down()
    node_json(h, "import", h.office)  # the hop receipt
    node_json(h, "forward", h.hq)  # the record receipt
    h.carry_down()
    killed_at(h, "bunker.node.holdings:UpstreamState.save", "import", h.office)
    back = node_json(h, "import", h.office)
    assert back["evicted"], "office evicts under the record receipt"
    assert_settled(h)


@pytest.mark.parametrize("kind", ["record", "hop"])
def test_killed_between_receipt_queued_and_chain_advanced(tmp_path: Path, kind: str) -> None:
    """hq killed after queueing a receipt, before its receipt chain says it issued that number:
    the next receipt must not take the same number (office would refuse it as a rollback)."""
    h, src = small_hierarchy(tmp_path)
    node_json(h, "forward", h.office)
    h.carry_up()
    if kind == "record":
        node_json(h, "import", h.hq)
        killed_at(h, "bunker.node.receipts:IssuedChain.advance", "forward", h.hq)
    else:
        killed_at(h, "bunker.node.receipts:IssuedChain.advance", "import", h.hq)
    # more comes up, and receipts go down for it as usual
    (src / "b").write_bytes(random.Random(8).randbytes(300_000))
    cp = run_bunker("backup", src, "--json", "--repo", h.office, env=h.top.env)
    assert cp.returncode in (0, 1), cp.stderr
    for _ in range(3):
        up_to_hq(h)
        back = down_to_office(h)
        assert back["imports"][0]["receipts_refused"] == [], back["problems"]
    assert_settled(h)
