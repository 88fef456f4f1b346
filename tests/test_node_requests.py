"""Restore requests (docs/hierarchy.md, "Restore requests"): a client restores through a node
that evicted the packs it needs. The node requests them from its direct upstream at once and
the restore completes; when the upstream cannot be reached, the request is kept, the restore
stops with its own exit code and says to rerun, and the node's next forward fetches the data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from helpers import compare_trees, expect_rc, js, restored_path, run_bunker
from test_node import backup_into, node_cmd, office_with_top


def _bounded_node_holding_a_backup(tmp_path: Path) -> tuple[Any, Path, Path, str]:
    top, office = office_with_top(tmp_path)
    conf = office / "node.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "max_size": 64 << 10}))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(700_000))
    snap = backup_into(top, office, src)["snapshot"]
    fwd = js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert fwd["evicted"] and fwd["evicted"][0]["evicted"] >= 1, fwd
    return top, office, src, snap


def _restore(top: Any, office: Path, snap: str, target: Path, rc: int) -> dict[str, Any]:
    doc: dict[str, Any] = js(
        expect_rc(run_bunker("restore", snap, "--target", target, "--json", "--repo", office, env=top.env), rc)
    )
    return doc


def _packs_held(office: Path) -> set[str]:
    return {p.name for p in office.glob("store/*/packs/*")}


def test_a_restore_through_a_node_fetches_evicted_packs_from_the_direct_upstream(tmp_path: Path) -> None:
    top, office, src, snap = _bounded_node_holding_a_backup(tmp_path)
    before = _packs_held(office)
    target = tmp_path / "t"
    doc = _restore(top, office, snap, target, 0)
    assert doc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)
    reqs = js(node_cmd(top, "requests", office, "--json"))
    assert reqs["pending"] == 0 and reqs["requests"], reqs
    assert {r["state"] for r in reqs["requests"]} == {"fetched"}
    assert all(r["route"] == ["top"] for r in reqs["requests"])
    fetched = {r["object"].split("/", 1)[1] for r in reqs["requests"]}
    assert fetched <= _packs_held(office) and not fetched & before
    # pinned: the next forward's eviction leaves them for the restore's reruns
    js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert fetched <= _packs_held(office)


def test_an_unreachable_upstream_keeps_the_request_and_the_rerun_completes(tmp_path: Path) -> None:
    top, office, src, snap = _bounded_node_holding_a_backup(tmp_path)
    away = top.path.with_name("away")
    top.path.rename(away)  # the repository of record cannot be reached
    target = tmp_path / "t"
    doc = _restore(top, office, snap, target, ExitCode.REQUESTED)
    assert doc["stats"]["requested"] >= 1, doc
    (ev, *_) = [e for e in doc["events"] if e["code"] == "restore-requested"]
    assert "was evicted by node 'office'" in ev["message"] and "requested it from 'top'" in ev["message"], ev
    reqs = js(node_cmd(top, "requests", office, "--json"))
    assert reqs["pending"] >= 1 and all(r["state"] == "pending" for r in reqs["requests"]), reqs
    assert all("cannot be read" in r["why"] for r in reqs["requests"]), reqs
    shutil.rmtree(target)

    away.rename(top.path)
    fwd = js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    (got,) = fwd["requests"].values()
    assert got["pending"] == 0 and got["fetched"] == reqs["pending"], fwd
    doc = _restore(top, office, snap, target, 0)  # the rerun finds everything on the node
    assert doc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)
