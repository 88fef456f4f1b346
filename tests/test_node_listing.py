"""Listing requests (docs/hierarchy.md, "Listing requests"): a replacement machine at another
site, reaching the repository only through its own node, asks that node for what the lost
machine wrote. The node requests the listing from its upstream (at once from a direct upstream;
over a carried link in the next bundles), then lists the snapshots and restores them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from helpers import compare_trees, expect_rc, js, make_tree, restored_path, run_bunker
from test_node import office_with_top
from test_node_links import build


def _replacement(env: dict[str, str], where: Path) -> dict[str, str]:
    """The environment of a new machine with the same keys: no state, no cache of its own."""
    (where / "data").mkdir(parents=True)
    (where / "cache").mkdir()
    return {**env, "XDG_DATA_HOME": str(where / "data"), "XDG_CACHE_HOME": str(where / "cache")}


def _bunker(env: dict[str, str], *args: Any, rc: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = js(expect_rc(run_bunker(*args, "--json", env=env), rc))
    return doc


def _ids(env: dict[str, str], node: Path) -> list[str]:
    return [r["id"] for r in _bunker(env, "snapshots", "--repo", node)["snapshots"]]


def test_a_listing_from_a_direct_upstream_arrives_at_once(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    snap = js(top.ok("backup", src, "--json"))["snapshot"]  # the lost machine, at the top directly
    env = _replacement(top.env, tmp_path / "new")
    assert _ids(env, office) == []
    doc = _bunker(env, "requests", "--listing", top.client, "--repo", office)
    (row,) = [r for r in doc["requests"] if r.get("listing") == top.client]
    assert row["state"] == "fetched" and row["snapshots"] == 1 and row["route"] == ["top"], row
    assert _ids(env, office) == [snap]
    target = tmp_path / "t"
    _bunker(env, "restore", snap, "--target", target, "--repo", office)  # its packs: requested at once
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)
    office_check = run_bunker("check", "--keyless", "--repo", office, env=env)
    assert office_check.returncode in (0, 1), office_check.stderr  # listed packs are upstream, not missing
    assert "missing" not in office_check.stdout.lower() or "0 missing" in office_check.stdout.lower()


def test_a_listing_travels_up_a_carried_link_and_a_restore_follows(tmp_path: Path) -> None:
    """The lost machine backed up through hq; the replacement at office (a carried folder below
    hq) asks for its listing: one trip up and down brings it, a second the data."""
    h = build(tmp_path)
    top = h.top
    src = tmp_path / "src"
    make_tree(src)
    snap = js(expect_rc(run_bunker("backup", src, "--json", "--repo", h.hq, env=top.env), 0))["snapshot"]
    h.node("forward", h.hq)  # up to the top

    env = _replacement(top.env, tmp_path / "new")
    assert _ids(env, h.office) == []
    doc = _bunker(env, "requests", "--listing", top.client, "--repo", h.office, rc=ExitCode.REQUESTED)
    (row,) = [r for r in doc["requests"] if r.get("listing") == top.client]
    assert row["state"] == "pending" and row["route"] == ["hq"], row

    def trip() -> dict[str, Any]:
        h.node("forward", h.office, rc=(0, 1))
        h.carry_up()
        up = h.node("import", h.hq, rc=(0, 1))
        h.node("forward", h.hq, rc=(0, 1))
        h.carry_down()
        h.node("import", h.office, rc=(0, 1))
        return up

    up = trip()
    (imp,) = up["imports"]
    assert imp["restore_requests"] and imp["restore_requests"][0]["listings"] == 1, imp
    doc = _bunker(env, "requests", "--listing", top.client, "--repo", h.office)
    (row,) = [r for r in doc["requests"] if r.get("listing") == top.client]
    assert row["state"] == "fetched" and row["snapshots"] == 1, row
    assert _ids(env, h.office) == [snap]
    listed = js(run_bunker("node", "requests", h.office, "--json", env=env))
    assert any(r.get("listing") == top.client for r in listed["requests"])

    target = tmp_path / "t"
    restore = run_bunker("restore", snap, "--target", target, "--json", "--repo", h.office, env=env)
    assert restore.returncode == ExitCode.REQUESTED, restore.stderr  # the data comes on the next trip
    assert "requested it from 'hq'" in js(restore)["error"]
    shutil.rmtree(target, ignore_errors=True)
    trip()
    _bunker(env, "restore", snap, "--target", target, "--repo", h.office)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)
