"""The owner's policy (docs/hierarchy.md, "Policy"; docs/format.md section 26): `bunker policy
set` stores a versioned policy signed with the master key; backups apply it and report the
version in their status records; `bunker forget --policy` applies each client's retention
rules; it flows down through nodes and links; a forged, forked or rolled-back policy is named."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bunker.crypto.keyfile import load_master_key
from bunker.crypto.sign import SigningKey
from bunker.repo.policy import make_policy
from helpers import PASSPHRASE, expect_rc, init_repo, js, make_env, make_tree, run_bunker
from test_node_links import build


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _put(repo_path: Path, data: bytes) -> str:
    from helpers import b3

    name = b3(data)
    (repo_path / "policy").mkdir(exist_ok=True)
    (repo_path / "policy" / name).write_bytes(data)
    return name


def test_policy_set_applies_to_backups_status_and_forget(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    assert js(repo.ok("policy", "show", "--json"))["policy"] is None
    bad = _write(tmp_path / "bad.toml", "[defaults]\nkeep-dayly = 7\n")
    refused = repo.run("policy", "set", bad)
    assert refused.returncode == 2 and "unknown setting 'keep-dayly'" in refused.stderr, refused.stderr
    assert not (repo.path / "policy").exists() or not list((repo.path / "policy").iterdir())

    text = (
        'fixed = ["checkpoint-interval"]\n'
        '[defaults]\nkeep-last = 5\ncheckpoint-interval = "5m"\nsilent-after = "1h"\n'
        f"[clients.{repo.client}]\nkeep-last = 2\n"
        "[clients.elsewhere]\nkeep-daily = 3\n"
    )
    doc = js(repo.ok("policy", "set", _write(tmp_path / "p1.toml", text), "--json"))
    assert doc["version"] == 1 and doc["unknown_clients"] == ["elsewhere"], doc
    shown = js(repo.ok("policy", "show", "--client", repo.client, "--json"))
    assert shown["settings"] == {"keep-last": 2, "checkpoint-interval": 300.0, "silent-after": 3600.0}

    # the policy fixes the checkpoint interval: the command line's is overridden, with a warning
    first = js(repo.ok("backup", src, "--checkpoint-interval", "1s", "--json", rc=1))
    assert first["policy"] == 1 and first["level"] == "warn", first
    (ev,) = [e for e in first["events"] if e["code"] == "policy-fixed"]
    assert "fixes checkpoint-interval at 300s" in ev["message"], ev
    for i in range(3):
        (src / f"more-{i}").write_bytes(b"x" * (1000 + i))
        assert repo.backup(src)["policy"] == 1
    row = next(r for r in js(repo.ok("status", "--json"))["clients"] if r["client"] == repo.client)
    assert row["policy"] == 1 and row["silent_after"] == 3600.0, row

    # each client's retention: this client keeps its 2 newest
    plan = js(repo.ok("forget", "--policy", "--master-key", repo.master_key, "--json"))
    assert plan["policy"]["version"] == 1 and plan["policy"]["clients"] == {repo.client: "--keep-last 2"}, plan
    assert (plan["kept"], plan["forgotten"]) == (2, 2), plan
    assert len(js(repo.ok("snapshots", "--json"))["snapshots"]) == 2
    mixed = repo.run("forget", "--policy", "--keep-last", "1")
    assert mixed.returncode == 2 and "--policy takes neither" in mixed.stderr

    # version 2 replaces it; a policy not signed by the master key is refused by check and ignored
    v2 = js(repo.ok("policy", "set", _write(tmp_path / "p2.toml", "[defaults]\nkeep-last = 9\n"), "--json"))
    assert v2["version"] == 2 and v2["replaces"].startswith("policy/")
    forged = make_policy(SigningKey(os.urandom(32)), repo.id, 7, v2["policy"], {"keep-last": 1}, {})
    forged_name = _put(repo.path, forged)
    check = js(repo.ok("check", "--json", rc=(3, 14)))
    (p,) = [p for p in check["problems"] if p["object"] == f"policy/{forged_name}"]
    assert p["severity"] == "err" and "not signed by this repository's master key" in p["problem"], p
    (repo.path / "policy" / forged_name).unlink()
    assert js(repo.ok("policy", "show", "--json"))["policy"]["version"] == 2

    # rolled back: version 2 deleted from the storage; this machine applied it and keeps it
    v2_path = repo.path / v2["policy"]
    kept = v2_path.read_bytes()
    v2_path.unlink()
    shown = js(repo.ok("policy", "show", "--json"))
    assert shown["policy"]["version"] == 2 and [e["code"] for e in shown["events"]] == ["policy-rollback"]
    back = js(repo.ok("backup", src, "--json", rc=1))
    assert back["policy"] == 2 and any(e["code"] == "policy-rollback" for e in back["events"])
    v2_path.write_bytes(kept)

    # a fork: two version-3 policies signed with the master key; version 2 stays in force
    master = load_master_key(str(repo.master_key), PASSPHRASE)
    for keep in (1, 2):
        _put(repo.path, make_policy(master.signing, repo.id, 3, v2["policy"], {"keep-last": keep}, {}))
    shown = js(repo.ok("policy", "show", "--json"))
    assert shown["policy"]["version"] == 2 and [e["code"] for e in shown["events"]] == ["policy-forked"]
    check = js(repo.ok("check", "--json", rc=(3, 14)))
    assert sum("two policies claim version 3" in p["problem"] for p in check["problems"]) == 2
    v4 = js(repo.ok("policy", "set", _write(tmp_path / "p4.toml", "[defaults]\nkeep-last = 4\n"), "--json"))
    assert v4["version"] == 4
    assert js(repo.ok("policy", "show", "--json"))["policy"]["version"] == 4


def test_a_policy_set_at_the_top_reaches_a_client_two_levels_down(tmp_path: Path) -> None:
    """top -> hq (direct) -> a carried folder -> office -> the client: the policy travels down
    with the other records; the client applies it and says so in its status record; the top's
    forget applies that client's retention."""
    h = build(tmp_path)
    top = h.top
    # the client is a machine of its own (its own data directory: no copy of what the top applied)
    key = tmp_path / "laptop.put"
    top.ok("key", "new-client", "laptop", "--out", key)
    laptop = make_env(tmp_path / "laptop-home", BUNKER_PUT_KEY=str(key), BUNKER_PROGRESS="never")

    def client(*args: str | Path, rc: int = 0) -> dict[str, Any]:
        doc: dict[str, Any] = js(expect_rc(run_bunker(*args, "--json", "--repo", h.office, env=laptop), rc))
        return doc

    src = tmp_path / "src"
    make_tree(src)
    for i in range(3):
        (src / f"run-{i}").write_bytes(b"y" * (2000 + i))
        assert "policy" not in client("backup", src)
    h.round_trip()

    v1 = _write(tmp_path / "p1.toml", '[defaults]\nkeep-last = 3\nsilent-after = "2d"\n')
    top.ok("policy", "set", v1)
    h.round_trip()
    office = h.node("status", h.office, rc=(0, 1))["repositories"][0]
    assert office["policy"]["version"] == 1, office
    assert client("policy", "show")["policy"]["version"] == 1

    v2 = _write(tmp_path / "p2.toml", "[defaults]\nkeep-last = 3\n[clients.laptop]\nkeep-last = 1\n")
    top.ok("policy", "set", v2)
    h.round_trip()
    assert client("policy", "show", "--client", "laptop")["settings"] == {"keep-last": 1}
    doc = client("backup", src)
    assert doc["policy"] == 2
    h.round_trip()
    rows = js(top.ok("status", "--json", rc=1))["clients"]  # (exit 1: testclient never ran, it is silent)
    row = next(r for r in rows if r["client"] == "laptop")
    assert row["policy"] == 2 and row["snapshot_seq"] == 4, row

    plan = js(top.ok("forget", "--policy", "--master-key", top.master_key, "--json"))
    assert plan["policy"]["clients"] == {"laptop": "--keep-last 1"}, plan
    assert (plan["kept"], plan["forgotten"]) == (1, 3), plan
    assert js(top.ok("check", "--json"))["ok"] is True


def test_a_forged_policy_does_not_come_down_a_link(tmp_path: Path) -> None:
    """A policy planted in hq's store (not signed by the master key) goes down in hq's next
    bundle like any record; office's import refuses it and names it, and keeps what it had."""
    h = build(tmp_path)
    top = h.top
    top.ok("policy", "set", _write(tmp_path / "p1.toml", "[defaults]\nkeep-last = 3\n"))
    h.node("forward", h.hq)  # hq copies the records from the top
    (store,) = h.hq.glob("store/*")
    forged = make_policy(SigningKey(os.urandom(32)), top.id, 2, "policy/" + "0" * 64, {"keep-last": 1}, {})
    name = _put(store, forged)
    h.node("forward", h.hq)  # the down bundle to office carries both
    h.carry_down()
    got = h.node("import", h.office, rc=3)  # (err: an object was refused)
    refused = [r for imp in got["imports"] for r in imp["refused"]]
    assert [r["object"] for r in refused] == [f"policy/{name}"], got
    assert "not a policy the master key signed" in refused[0]["why"], refused
    office = h.node("status", h.office, rc=(0, 1))["repositories"][0]
    assert office["policy"]["version"] == 1, office


def test_node_settings_in_the_policy_reach_the_node_and_apply(tmp_path: Path) -> None:
    """`[node-defaults]` and `[nodes.NAME]` in the policy set at the top come down to node office
    (a direct upstream) and override its node.json: a client quota keeps a backup in the
    client's spool, the bound makes the node evict, and a short staleness limit warns."""
    import json
    import random
    import time

    from bunker.errors import ExitCode
    from test_node import backup_into, node_cmd, office_with_top

    top, office = office_with_top(tmp_path)
    bad = _write(tmp_path / "bad.toml", '[nodes.office]\nmax-size = "lots"\n')
    refused = top.run("policy", "set", bad)
    assert refused.returncode == 2 and "max-size = 'lots' is not a size" in refused.stderr, refused.stderr
    text = '[node-defaults]\nstale-after = "1h"\n[nodes.office]\nclient-quota = "4M"\nevict-after = "any"\n'
    assert js(top.ok("policy", "set", _write(tmp_path / "p1.toml", text), "--json"))["version"] == 1
    shown = js(top.ok("policy", "show", "--node", "office", "--json"))
    assert shown["node_settings"] == {"stale-after": 3600.0, "client-quota": 4 << 20, "evict-after": "any"}, shown
    assert "client-quota = 4.0 MiB" in top.ok("policy", "show").stdout
    js(node_cmd(top, "forward", office, "--json"))  # the policy comes down
    status = js(node_cmd(top, "status", office, "--json"))["repositories"][0]
    assert status["settings"]["client_quota"] == 4 << 20 and status["settings"]["policy_version"] == 1, status
    assert status["settings"]["from_policy"] == ["client-quota", "evict-after", "stale-after"], status

    # the policy's client quota: a second 3 MB waits in the client's own spool
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(1).randbytes(3_000_000))
    assert not backup_into(top, office, src)["spooled"]
    (src / "b").write_bytes(random.Random(2).randbytes(3_000_000))
    second = backup_into(top, office, src, rc=ExitCode.WARN)
    assert second["spooled"], second
    (full,) = [e for e in second["events"] if e["code"] == "node-full"]
    assert "over its quota of 4194304 bytes" in full["message"], full

    # version 2: no quota, a bound of 1 MiB (node.json has none) and a staleness limit of 1 s
    text = '[node-defaults]\nstale-after = "1s"\n[nodes.office]\nmax-size = "1M"\n'
    top.ok("policy", "set", _write(tmp_path / "p2.toml", text))
    js(node_cmd(top, "forward", office, "--json"))
    expect_rc(run_bunker("forward", "--repo", office, env=top.env), 0)  # the spooled backup goes up
    fwd = js(node_cmd(top, "forward", office, "--json", rc=(0, 1)))
    assert fwd["evicted"] and fwd["evicted"][0]["bound"] == 1 << 20, fwd
    assert json.loads((office / "node.json").read_text())["max_size"] is None
    time.sleep(1.5)
    status = js(node_cmd(top, "status", office, "--json", rc=(0, 1)))
    assert status["repositories"][0]["settings"]["max_size"] == 1 << 20
    assert any(p["code"] == "upstream-stale" for p in status["problems"]), status["problems"]
    text_status = node_cmd(top, "status", office, rc=(0, 1)).stdout
    assert "bound 1.0 MiB" in text_status
    assert "policy version 2 sets for this node: max-size, stale-after" in text_status
