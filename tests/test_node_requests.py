"""Restore requests (docs/hierarchy.md, "Restore requests"): a client restores through a node
that evicted the packs it needs. The node requests them from its direct upstream at once and
the restore completes; when the upstream cannot be reached, the request is kept, the restore
stops with its own exit code and says to rerun, and the node's next forward fetches the data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from helpers import BUNKER, compare_trees, expect_rc, js, kill_run_when, restored_path, run_bunker
from test_node import backup_into, node_cmd, office_with_top
from test_node_daemon import _fake_ssh, _upstream_over_ssh
from test_node_links import build


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
    _bound(office, 16 << 20)  # room to fetch it all back in one go (batches: the test below)
    return top, office, src, snap


def _bound(office: Path, size: int) -> None:
    conf = office / "node.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "max_size": size}))


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
    assert js(top.ok("requests", "--json"))["node"] is None  # the repository itself requests nothing
    # the restore completed and ended its lease: what was fetched for it is released, and the
    # node's eviction takes it again (a bound below the metadata alone: with 64 KiB, a small pack of
    # tree blobs fetched last could stay because the store was already under the bound without it)
    leases = json.loads(next(office.glob("state/*/leases.json")).read_text())
    assert leases == {} and all(
        r.get("released") for r in json.loads(next(office.glob("state/*/requests.json")).read_text()).values()
    )
    _bound(office, 1)
    js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert not fetched & _packs_held(office)


def test_an_unreachable_upstream_keeps_the_request_and_the_rerun_completes(tmp_path: Path) -> None:
    top, office, src, snap = _bounded_node_holding_a_backup(tmp_path)
    away = top.path.with_name("away")
    top.path.rename(away)  # the repository of record cannot be reached
    target = tmp_path / "t"
    doc = _restore(top, office, snap, target, ExitCode.REQUESTED)
    # every evicted pack of the snapshot is requested before anything is written
    assert "could not be fetched at once: requested" in doc["error"] and "nothing was restored" in doc["error"], doc
    assert "is not held by node 'office' (evicted" in doc["error"] and "requested it from 'top'" in doc["error"], doc
    assert "run this restore again once they have arrived" in doc["hint"], doc
    assert not target.exists() or not any(target.iterdir())
    reqs = js(node_cmd(top, "requests", office, "--json"))
    assert reqs["pending"] >= 1 and all(r["state"] == "pending" for r in reqs["requests"]), reqs
    assert all("cannot be read" in r["why"] for r in reqs["requests"]), reqs
    # the client sees them too, through the node
    seen = js(run_bunker("requests", "--json", "--repo", office, env=top.env))
    assert seen["node"] == "office" and [r["object"] for r in seen["requests"]] == [
        r["object"] for r in reqs["requests"]
    ], seen
    assert all(r["state"] == "pending" and r["route"] == ["top"] for r in seen["requests"]), seen
    status = js(node_cmd(top, "status", office, "--json", rc=(0, 1)))["repositories"][0]["requests"]
    assert status["pending"] == reqs["pending"] and status["oldest"] > 0, status
    shutil.rmtree(target, ignore_errors=True)

    away.rename(top.path)
    fwd = js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    (got,) = fwd["requests"].values()
    assert got["pending"] == 0 and got["fetched"] == reqs["pending"], fwd
    doc = _restore(top, office, snap, target, 0)  # the rerun finds everything on the node
    assert doc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_a_request_travels_up_a_carried_link_and_the_answer_comes_down(tmp_path: Path) -> None:
    """office -> a carried folder -> hq -> the top, both nodes bounded so that both evict: the
    restore through office is requested; the request goes up in office's next bundle, hq fetches
    the packs from the top, its next down bundle carries them, and the rerun completes."""
    h = build(tmp_path)
    for n in (h.office, h.hq):
        conf = n / "node.json"
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "max_size": 64 << 10}))
    top = h.top
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(700_000))
    snap = backup_into(top, h.office, src)["snapshot"]

    def up() -> None:  # (exit 1: a store over its bound until the top has recorded what it holds)
        h.node("forward", h.office, rc=(0, 1))
        h.carry_up()
        h.node("import", h.hq, rc=(0, 1))
        h.node("forward", h.hq, rc=(0, 1))

    def down() -> dict[str, Any]:
        h.carry_down()
        return h.node("import", h.office, rc=(0, 1))

    for _ in range(2):  # up to the top, hq evicts what the top read back; office evicts under hq's receipt
        up()
        down()
    packs = {p.name for p in (top.path / "packs").iterdir()}
    held = {p.name for n in (h.office, h.hq) for p in n.glob("store/*/packs/*")}
    assert packs - held, "packs evicted at both levels"
    _bound(h.office, 16 << 20)  # room to take them all back in one go

    target = tmp_path / "t"
    doc = _restore(top, h.office, snap, target, ExitCode.REQUESTED)
    assert "requested it from 'hq'" in doc["error"], doc
    shutil.rmtree(target, ignore_errors=True)
    pending = js(node_cmd(top, "requests", h.office, "--json"))
    assert pending["pending"] >= 1 and all(r["route"] == ["hq"] for r in pending["requests"]), pending

    up()  # the request rides office's next bundle; hq fetches from the top and answers
    at_hq = js(node_cmd(top, "requests", h.hq, "--json"))
    assert {r["state"] for r in at_hq["requests"]} == {"fetched"}, at_hq
    assert all(r["for"] == ["office"] for r in at_hq["requests"]), at_hq
    got = down()
    (imported,) = [r for r in got["imports"] if r["requested_objects_received"]]
    assert imported["requested_objects_received"] == pending["pending"], got
    assert js(node_cmd(top, "requests", h.office, "--json"))["pending"] == 0

    doc = _restore(top, h.office, snap, target, 0)
    assert doc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_a_request_for_data_pruned_at_the_top_ends_with_the_signed_record(tmp_path: Path) -> None:
    """The snapshot is forgotten and pruned at the top after the node evicted its packs: the
    condemnation record (signed, come down to the node) ends the request, and the restore says
    the data is gone for good instead of waiting for it."""
    top, office, src, snap = _bounded_node_holding_a_backup(tmp_path)
    pruner = tmp_path / "pruner.put"
    top.ok("key", "new-client", "pruner", "--prune", "--out", pruner)
    (src / "other.bin").write_bytes(os.urandom(5000))
    for f in src.glob("f*.bin"):
        f.unlink()
    backup_into(top, office, src)  # a newer snapshot that shares none of the old packs
    js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    top.ok("forget", snap[:12], "--master-key", top.master_key)
    deleted = 0
    for _ in range(3):  # condemn; the record goes down and the node's acknowledgement up; delete
        deleted += js(top.ok("prune", "--put-key", pruner, "--grace", "0s", "--json"))["deleted"]
        js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert deleted >= 1
    target = tmp_path / "t"
    doc = _restore(top, office, snap, target, ExitCode.INTEGRITY)
    assert "gone for good" in doc["error"] and "condemned it" in doc["error"], doc
    assert "restore another snapshot" in doc["hint"], doc
    reqs = js(node_cmd(top, "requests", office, "--json"))
    assert reqs["pending"] == 0 and {r["state"] for r in reqs["requests"]} == {"gone"}, reqs


def test_a_request_survives_kill_9_of_the_restore_and_the_node(tmp_path: Path) -> None:
    """The upstream hangs (an ssh that never answers) while the node fetches for a restore; the
    restore, the node's server and the ssh below it are killed with SIGKILL: the request was
    journaled before the fetch began, so the node's next forward fetches it, and the rerun of
    the restore completes."""
    top, office, src, snap = _bounded_node_holding_a_backup(tmp_path)
    conf = office / "node.json"
    good = conf.read_text()
    _upstream_over_ssh(office)
    extra, pid_file = _fake_ssh(tmp_path)
    target = tmp_path / "t"
    ended, err = kill_run_when(
        "restore", snap, "--target", target, "--repo", office, env={**top.env, **extra}, reached=pid_file.exists
    )
    assert ended is None, err  # killed while the node waited for the upstream
    reqs = js(node_cmd(top, "requests", office, "--json"))
    assert reqs["pending"] >= 1 and all(r["route"] == ["top"] for r in reqs["requests"]), reqs
    shutil.rmtree(target, ignore_errors=True)

    conf.write_text(good)  # the upstream answers again
    fwd = js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    (got,) = fwd["requests"].values()
    assert got == {"fetched": reqs["pending"], "pending": 0}, fwd
    doc = _restore(top, office, snap, target, 0)
    assert doc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_restore_wait_waits_until_the_requested_data_arrives(tmp_path: Path) -> None:
    top, office, src, snap = _bounded_node_holding_a_backup(tmp_path)
    away = top.path.with_name("away")
    top.path.rename(away)
    target = tmp_path / "t"
    args = [BUNKER, "restore", snap, "--target", str(target), "--wait", "5m", "--json", "--repo", str(office)]
    proc = subprocess.Popen(args, env=top.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not js(node_cmd(top, "requests", office, "--json"))["pending"]:
            assert time.monotonic() < deadline and proc.poll() is None, "the restore did not request anything"
            time.sleep(0.2)
        away.rename(top.path)  # the repository of record is back: the next ask fetches at once
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "waiting for" in err and "requested pack(s) to arrive" in err, err
    assert json.loads(out)["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def _large_packs(office: Path) -> set[str]:
    return {p.name for p in office.glob("store/*/packs/*") if p.stat().st_size > 500_000}


def test_a_restore_larger_than_the_node_store_runs_in_batches_and_resumes(tmp_path: Path) -> None:
    """Three files of 700 kB, each backed up in its own pack, restored through a node whose store
    can fetch back one such pack at a time: the restore runs in batches, releasing each. A batch
    whose pack the upstream cannot give stops the restore (exit 6); the rerun continues with that
    batch and does not ask again for the one it restored."""
    top, office = office_with_top(tmp_path)
    conf = office / "node.json"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "small.txt").write_text("held by every batch")
    packs: list[set[str]] = []
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(700_000))
        if i == 1:
            os.link(src / "f1.bin", src / "sub" / "f1-link.bin")  # a second name waits with the first
        before = _large_packs(office)
        snap = backup_into(top, office, src)["snapshot"]
        packs.append(_large_packs(office) - before)
    assert all(len(p) == 1 for p in packs), packs
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "max_size": 64 << 10}))
    js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert not _large_packs(office), "all evicted"
    store = next(office.glob("store/*"))
    meta = sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and f.parts[-2] != "sessions")
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "max_size": meta + 800_000}))  # one pack's room

    (second,) = packs[1]
    hidden = top.path / "packs" / f"{second}.away"
    (top.path / "packs" / second).rename(hidden)  # the upstream cannot give batch 2's pack for now
    target = tmp_path / "t"
    doc = _restore(top, office, snap, target, ExitCode.REQUESTED)
    assert "batch 2 of the restore" in doc["error"] and "2 file(s) restored so far, 3 left" in doc["error"], doc
    assert "it continues with this batch" in doc["hint"], doc
    assert (target / restored_path(target, src).relative_to(target) / "f0.bin").exists()
    (first,) = packs[0]
    reqs = {r["object"]: r for r in js(node_cmd(top, "requests", office, "--json"))["requests"]}
    assert reqs[f"packs/{first}"]["state"] == "fetched" and reqs[f"packs/{first}"]["tries"] == 1, reqs
    assert json.loads(next(office.glob("state/*/leases.json")).read_text()) == {}, "the lease ended"

    hidden.rename(top.path / "packs" / second)
    cmd = run_bunker("restore", snap, "--target", target, "--json", "--repo", office, env=top.env)
    doc = js(expect_rc(cmd, 0))
    assert "restoring in batches" in cmd.stderr and "batch 1:" in cmd.stderr, cmd.stderr
    assert doc["stats"]["kept"] == 2 and doc["stats"]["failed"] == 0, doc
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)
    reqs = {r["object"]: r for r in js(node_cmd(top, "requests", office, "--json"))["requests"]}
    assert reqs[f"packs/{first}"]["tries"] == 1, "the rerun did not ask again for what it restored"
    assert all(reqs[f"packs/{p}"]["state"] == "fetched" for s in packs for p in s), reqs
    # the restore ended: its lease is gone and nothing it fetched is pinned any more
    assert json.loads(next(office.glob("state/*/leases.json")).read_text()) == {}
    # each batch's pack was evicted once it was restored: the store kept its bound throughout
    assert len(_large_packs(office)) <= 1
    used = sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and f.parts[-2] != "sessions")
    assert used <= meta + 800_000
