"""A node's replica path (docs/hierarchy.md, "Replica paths"): a second direct upstream that is a
mirror of the repository of record. The node delivers to each and keeps a record for each; by
default (`evict_after` all) it evicts only what both hold, so a replica that is away keeps the
node from evicting what it lacks; both copies then compare equal in snapshots and check clean."""

from __future__ import annotations

from pathlib import Path

from helpers import compare_trees, init_repo, js, make_tree, restored_path, run_bunker
from test_node import backup_into, make_node, node_cmd


def test_a_replica_path_gets_every_snapshot_and_holds_back_eviction_while_away(tmp_path: Path) -> None:
    top = init_repo(tmp_path / "top")
    office = make_node(top, tmp_path / "office", "office", max_size="64K")
    replica = tmp_path / "replica"
    js(run_bunker("sync", top.path, replica, "--json", env=top.env))  # the mirror, with the node's certificate
    node_cmd(top, "upstream", "add", office, "top", "--direct", top.path)
    node_cmd(top, "upstream", "add", office, "replica", "--direct", replica)
    src = tmp_path / "src"
    make_tree(src)
    (src / "big.bin").write_bytes(bytes(range(256)) * 4000)

    away = replica.with_name("replica-away")
    replica.rename(away)  # the replica's disk is not mounted: the top alone gets the snapshot
    snap = backup_into(top, office, src)["snapshot"]
    fwd = js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert any(p["code"] == "upstream-unreachable" and "replica" in p["message"] for p in fwd["problems"]), fwd
    assert fwd["evicted"] == [], "evicted what the replica does not hold yet"
    packs = {p.name for p in (top.path / "packs").iterdir()}
    assert packs <= {p.name for p in office.glob("store/*/packs/*")}

    away.rename(replica)
    fwd = js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert fwd["evicted"] and fwd["evicted"][0]["evicted"] >= 1, fwd  # both hold it now
    status = js(node_cmd(top, "status", office, "--json", rc=(0, 1)))
    ups = {u["name"]: u for u in status["repositories"][0]["upstreams"]}
    assert ups["top"]["owed_objects"] == ups["replica"]["owed_objects"] == 0, ups
    assert ups["top"]["recorded"] > 0 and ups["replica"]["recorded"] > 0, ups

    cmp = js(run_bunker("compare", top.path, replica, "--json", env=top.env))
    assert cmp["snapshots_only"] == {"a": [], "b": []}, cmp
    for copy in (top.path, replica):
        doc = js(run_bunker("check", "--keyless", "--expect", top.id, "--json", "--repo", copy, env=top.env))
        assert doc["ok"] is True, (copy, doc["problems"])
    target = tmp_path / "t"
    run_bunker("restore", snap, "--target", target, "--repo", replica, env=top.env).check_returncode()
    compare_trees(src, restored_path(target, src))
