"""What a node's clients see of its bounds and its upstream (docs/hierarchy.md): a per-certificate
quota keeps one writer's undelivered data in its own spool until the node forwarded what it holds,
and a client warns when its snapshot waits on the node unrecorded at the top for N days."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from helpers import expect_rc, js, run_bunker
from test_node import backup_into, node_cmd, office_with_top


def test_quota_keeps_a_writer_in_its_own_spool_until_the_node_forwarded(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    set_quota = js(node_cmd(top, "quota", office, top.client, "4M", "--json"))
    assert set_quota["client"] == top.client and set_quota["quota"] == 4 << 20
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(1).randbytes(3_000_000))
    first = backup_into(top, office, src)
    assert not first["spooled"]

    # 3 MB undelivered on the node: another 3 MB would go over the quota; the backup completes
    # in the client's own spool
    (src / "b").write_bytes(random.Random(2).randbytes(3_000_000))
    second = backup_into(top, office, src, rc=ExitCode.WARN)
    assert second["spooled"] and second["level"] == "warn"
    # named as the node having no room for now, not as a repository that cannot be reached
    (full,) = [e for e in second["events"] if e["code"] == "node-full"]
    assert "quota" in full["message"] and "cannot take this backup now" in full["message"], full
    assert not any("cannot be reached" in e["message"] for e in second["events"]), second["events"]
    assert len(list((office / "store" / top.id / "snapshots").iterdir())) == 1

    # the node forwards what it holds; then the spooled backup goes to the node, and up
    fwd = js(node_cmd(top, "forward", office, "--json"))
    assert len(fwd["deliveries"][0]["snapshots"]) == 1
    expect_rc(run_bunker("forward", "--repo", office, env=top.env), 0)
    assert len(list((office / "store" / top.id / "snapshots").iterdir())) == 2
    fwd = js(node_cmd(top, "forward", office, "--json"))
    assert len(fwd["deliveries"][0]["snapshots"]) == 1
    assert len(top.objects("snapshots")) == 2
    top.ok("check", "--read-data")

    # a client name with no certificate is named, not stored
    bad = node_cmd(top, "quota", office, "nobody", "1G", rc=ExitCode.USAGE)
    assert "nobody" in bad.stderr and "testclient" in bad.stderr
    assert js(node_cmd(top, "quota", office, top.client, "none", "--json"))["quota"] is None


def _backup(top: Any, office: Path, src: Path, days: str | None) -> dict[str, Any]:
    env = dict(top.env)
    if days is not None:
        env["BUNKER_RECORD_WARN_DAYS"] = days
    cp = run_bunker("backup", src, "--json", "--repo", office, env=env)
    doc: dict[str, Any] = js(expect_rc(cp, ExitCode.OK, ExitCode.WARN))
    return doc


def test_client_warns_when_its_snapshot_waits_unrecorded_on_the_node(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"first")
    first = _backup(top, office, src, None)

    # the node forwards nothing: within the default 7 days nothing is said
    (src / "a").write_bytes(b"second")
    doc = _backup(top, office, src, None)
    assert not [e for e in doc["events"] if e["code"] == "not-recorded"] and doc["level"] in ("ok", "note")

    # with N = 0 days, the newest snapshot the node holds unrecorded is a warning that names the
    # node, the snapshot and what to do
    (src / "a").write_bytes(b"third")
    doc = _backup(top, office, src, "0")
    (event,) = [e for e in doc["events"] if e["code"] == "not-recorded"]
    assert event["level"] == "warn" and doc["level"] == "warn"
    assert "office" in event["message"] and "bunker node status" in event["message"]
    assert first["snapshot"][:12] not in event["message"]  # the newest one is named, not the first

    # once the top recorded them, nothing is said
    js(node_cmd(top, "forward", office, "--json"))
    (src / "a").write_bytes(b"fourth")
    doc = _backup(top, office, src, "0")
    assert not [e for e in doc["events"] if e["code"] == "not-recorded"] and doc["level"] in ("ok", "note")
