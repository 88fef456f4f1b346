"""A client without a chain head behind a node (docs/hierarchy.md, "A client without a chain
head"): its state directory is lost, and it backs up through a node that holds none of its
snapshots. The node knows the newest snapshot of every client at the repository of record (read
at its direct upstream, or from a record receipt that came down a link) and gives it as a signed
witness statement; the client continues its chain from there instead of numbering a snapshot
into a place the top already holds (a fork the node would keep back for ever)."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import Repo, init_repo, js, make_env, make_tree, run_bunker
from test_node import backup_into, make_node, node_cmd
from test_node_links import build


def _lose_state(client: Repo | dict[str, str]) -> None:
    """Delete the client's state directory (its remembered chain heads), as a new machine with
    the old put key has none."""
    env = client.env if isinstance(client, Repo) else client
    shutil.rmtree(Path(env["XDG_DATA_HOME"]) / "bunker" / "state")


def _chain(top: Repo, client: str, rc: int | tuple[int, ...] = 0) -> list[tuple[int, str]]:
    rows = js(top.ok("snapshots", "--json", "--client", client, rc=rc))["snapshots"]
    return sorted((s["seq"], s["id"]) for s in rows)


def test_a_client_without_state_takes_its_head_from_a_direct_node(tmp_path: Path) -> None:
    top = init_repo(tmp_path / "top")
    src = tmp_path / "src"
    make_tree(src)
    top.backup(src)  # #1 and #2 straight into the repository of record
    (src / "more").write_bytes(b"x" * 5000)
    top.backup(src)
    # a node the client never used; its forward reads the top's heads
    branch = make_node(top, tmp_path / "branch", "branch")
    node_cmd(top, "upstream", "add", branch, "top", "--direct", top.path)
    js(node_cmd(top, "forward", branch, "--json"))
    witnessed = js(node_cmd(top, "status", branch, "--json"))["repositories"][0]["witnessed"]
    assert [(w["seq"], w["via"]) for w in witnessed] == [(2, "direct")], witnessed

    _lose_state(top)
    doc = backup_into(top, branch, src)
    (ev,) = [e for e in doc["events"] if e["code"] == "chain-head-from-node"]
    assert ev["level"] == "note" and doc["level"] == "note", doc["events"]
    assert "node 'branch' holds none of client" in ev["message"], ev
    assert "it saw the repository of record hold snapshot #2 (read at its direct upstream 'top'" in ev["message"], ev
    assert doc["seq"] == 3

    fwd = js(node_cmd(top, "forward", branch, "--json"))["deliveries"][0]
    assert fwd["forks"] == [] and len(fwd["snapshots"]) == 1, fwd
    assert [seq for seq, _ in _chain(top, top.client)] == [1, 2, 3]
    assert js(top.ok("check", "--json"))["ok"] is True
    # the next run remembers its head again: no note
    again = backup_into(top, branch, src)
    assert again["seq"] == 4 and not any(e["code"] == "chain-head-from-node" for e in again["events"])


def test_a_client_that_moved_takes_its_head_from_a_record_receipt(tmp_path: Path) -> None:
    """office learns the heads of clients it never served from hq's record receipts."""
    h = build(tmp_path)
    top = h.top
    src = tmp_path / "src"
    make_tree(src)
    top.backup(src)  # the laptop's #1, straight into the repository of record (another site)

    # another client keeps office busy: its data goes up, and hq's record receipt comes down
    desk_key = tmp_path / "desk.put"
    top.ok("key", "new-client", "desk", "--out", desk_key)
    desk = make_env(tmp_path / "desk-home", BUNKER_PUT_KEY=str(desk_key), BUNKER_PROGRESS="never")
    other = tmp_path / "desk-src"
    make_tree(other, seed=2)
    assert js(run_bunker("backup", other, "--json", "--repo", h.office, env=desk))["seq"] == 1
    h.round_trip()
    witnessed = js(node_cmd(top, "status", h.office, "--json"))["repositories"][0]["witnessed"]
    laptop = [w for w in witnessed if w["seq"] == 1 and w["via"] == "record"]
    assert len(laptop) == 2, witnessed  # the laptop's head and desk's, both from hq's receipt

    # the laptop moves to office with a new disk: no state, and office holds none of its snapshots
    _lose_state(top)
    doc = backup_into(top, h.office, src)
    (ev,) = [e for e in doc["events"] if e["code"] == "chain-head-from-node"]
    assert "record receipt #" in ev["message"] and "from node 'hq'" in ev["message"], ev
    assert doc["seq"] == 2
    h.round_trip()
    assert [seq for seq, _ in _chain(top, top.client)] == [1, 2]
    assert js(top.ok("check", "--json"))["ok"] is True


def test_snapshots_numbered_without_the_head_are_a_fork_the_next_run_leaves(tmp_path: Path) -> None:
    """Before the node ever heard from the top, a client without state wrote #1 and #2 there:
    both take places the top holds otherwise (the second only links to the first). The node keeps
    both back; the client's next run learns the top's head from the node and continues from it."""
    top = init_repo(tmp_path / "top")
    src = tmp_path / "src"
    make_tree(src)
    top.backup(src)  # #1 at the top
    branch = make_node(top, tmp_path / "branch", "branch")
    node_cmd(top, "upstream", "add", branch, "top", "--direct", top.path)
    _lose_state(top)
    fork1 = backup_into(top, branch, src)
    (src / "more").write_bytes(b"y" * 7000)
    fork2 = backup_into(top, branch, src)
    assert (fork1["seq"], fork2["seq"]) == (1, 2)

    fwd = js(node_cmd(top, "forward", branch, "--json", rc=3))
    forks = {f"snapshots/{d['snapshot']}" for d in (fork1, fork2)}
    assert set(fwd["deliveries"][0]["forks"]) == forks, fwd  # #2 would link the top to a snapshot it lacks
    assert {p["code"] for p in fwd["problems"]} == {"fork"}
    # (this machine remembers the fork's #2, which the top lacks: `snapshots` says so, exit 14)
    assert [seq for seq, _ in _chain(top, top.client, rc=14)] == [1]

    doc = backup_into(top, branch, src, rc=1)
    (ev,) = [e for e in doc["events"] if e["code"] == "chain-fork-avoided"]
    assert ev["level"] == "warn" and f"snapshots/{fork1['snapshot']}" in ev["message"], ev
    assert doc["seq"] == 2
    fwd = js(node_cmd(top, "forward", branch, "--json", rc=3))["deliveries"][0]
    assert fwd["snapshots"] == [f"snapshots/{doc['snapshot']}"] and set(fwd["forks"]) == forks, fwd
    chain = _chain(top, top.client)
    assert [seq for seq, _ in chain] == [1, 2] and chain[1][1] == doc["snapshot"]
    assert js(top.ok("check", "--json"))["ok"] is True
