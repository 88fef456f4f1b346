"""Nodes (docs/hierarchy.md): a node directory with its key and card, certified by the master key,
seeded from the top; clients back up into it exactly as into a repository (forked: the client
names the node directory; on demand: a unix socket), append-only, with forget/prune refused and
explained; `node forward` delivers to the repository of record (direct upstream), snapshots only
once their packs are there, and brings the top's records down."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from bunker.node.node_serve import accepts_certificate
from helpers import BUNKER, Repo, compare_trees, expect_rc, init_repo, js, make_tree, restored_path, run_bunker


def node_cmd(repo: Repo, *args: str | Path, rc: int | tuple[int, ...] = 0) -> subprocess.CompletedProcess[str]:
    codes = (rc,) if isinstance(rc, int) else rc
    return expect_rc(run_bunker("node", *args, env=repo.env), *codes)


def backup_into(repo: Repo, url: str | Path, *paths: Path, rc: int | tuple[int, ...] = 0) -> dict[str, Any]:
    """`bunker backup` into ``url`` (a node directory or a node's socket) with ``repo``'s keys."""
    codes = (rc,) if isinstance(rc, int) else rc
    doc: dict[str, Any] = js(expect_rc(run_bunker("backup", *paths, "--json", "--repo", url, env=repo.env), *codes))
    return doc


def make_node(repo: Repo, where: Path, name: str, caps: str = "relay", **opts: str) -> Path:
    """`node init`, its card certified at the top, seeded from the top's seed file."""
    extra = [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", v)]
    node_cmd(repo, "init", where, "--name", name, *extra)
    card = where.parent / f"{name}.card"
    node_cmd(repo, "card", where, "--out", card)
    seed = where.parent / f"{name}.seed"
    repo.ok("key", "new-node", card, "--caps", caps, "--seed-out", seed)
    node_cmd(repo, "seed", where, seed)
    return where


def office_with_top(tmp_path: Path) -> tuple[Repo, Path]:
    """A repository of record and node ``office`` delivering to it directly."""
    top = init_repo(tmp_path / "top")
    office = make_node(top, tmp_path / "office", "office")
    node_cmd(top, "upstream", "add", office, "top", "--direct", top.path)
    return top, office


def test_node_relays_backups_to_the_repository_of_record(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    # the client names the node directory: its server is started for the run (forked mode)
    doc = backup_into(top, office, src)
    assert doc["level"] in ("ok", "note") and not doc.get("spooled")
    assert top.objects("snapshots") == []  # nothing at the top before the node forwards
    status = js(node_cmd(top, "status", office, "--json"))
    (repo_status,) = status["repositories"]
    assert repo_status["repository"] == top.id and repo_status["upstreams"][0]["owed_objects"] > 0

    fwd = js(node_cmd(top, "forward", office, "--json"))
    (delivery,) = fwd["deliveries"]
    assert len(delivery["snapshots"]) == 1 and delivery["sent"] > 1 and fwd["problems"] == []
    assert len(top.objects("snapshots")) == 1
    # again: nothing left to send
    again = js(node_cmd(top, "forward", office, "--json"))["deliveries"][0]
    assert again["sent"] == 0 and again["snapshots"] == []
    assert js(node_cmd(top, "status", office, "--json"))["repositories"][0]["upstreams"][0]["owed_objects"] == 0

    # the top holds a whole, authentic copy: check passes there and a restore is identical
    top.ok("check", "--read-data")
    target = tmp_path / "restored"
    top.ok("restore", "latest", "--target", target)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_node_is_append_only_and_says_where_forget_runs(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    backup_into(top, office, src)
    for command in (("forget", "--keep-last", "1"), ("prune",), ("unforget", "0000")):
        cp = run_bunker(*command, "--master-key", top.master_key, "--repo", office, env=top.env)
        assert cp.returncode == ExitCode.USAGE, (command, cp.stderr)
        assert "node 'office'" in cp.stderr and "repository of record" in cp.stderr, cp.stderr
    for command in (("key", "new-client", "x", "--out", tmp_path / "x.put"), ("key", "revoke", top.client)):
        cp = run_bunker(*command, "--repo", office, env=top.env)
        assert cp.returncode == ExitCode.USAGE and "repository of record" in cp.stderr, (command, cp.stderr)
    assert not (tmp_path / "x.put").exists()
    cp = run_bunker("init", "--repo", office, env=top.env)
    assert cp.returncode != 0 and "does not create repositories" in cp.stderr, cp.stderr
    # the node's store is untouched: the snapshot is still there and goes up
    assert len(js(node_cmd(top, "forward", office, "--json"))["deliveries"][0]["snapshots"]) == 1


def test_records_come_down_and_revocation_reaches_the_node(tmp_path: Path) -> None:
    top = init_repo(tmp_path / "top")
    office = make_node(top, tmp_path / "office", "office", caps="relay,record")
    node_cmd(top, "upstream", "add", office, "top", "--direct", top.path)
    listed = js(top.ok("node", "list", "--json"))["nodes"]
    assert [(n["node"], n["revoked"], sorted(n["capabilities"])) for n in listed] == [
        ("office", False, ["record", "relay"])
    ]
    # a second client certified at the top after the node was seeded reaches the node by forward
    put2 = tmp_path / "second.put"
    top.ok("key", "new-client", "second", "--out", put2)
    before = {p.name for p in (office / "store" / top.id / "clients").iterdir()}
    fwd = js(node_cmd(top, "forward", office, "--json"))["deliveries"][0]
    after = {p.name for p in (office / "store" / top.id / "clients").iterdir()}
    assert fwd["records_down"] >= 1 and len(after) == len(before) + 1
    # a node revocation made at the top reaches the node's store in the next forward
    top.ok("key", "revoke-node", "office")
    assert js(top.ok("node", "list", "--json"))["nodes"][0]["revoked"] is True
    node_cmd(top, "forward", office)
    configs = [json.loads(run_bunker("key", "info", "--json", "--repo", office, env=top.env).stdout)]
    assert configs[0]["config_version"] >= 2


def test_a_client_certified_after_the_node_was_seeded_backs_up_into_it(tmp_path: Path) -> None:
    """Its put key carries its certificate: the node takes that (the master key signed it for
    this repository) before any down bundle brings it; another repository's is refused, named."""
    top, office = office_with_top(tmp_path)
    put2 = tmp_path / "second.put"
    before = {p.name for p in top.objects("clients")}
    top.ok("key", "new-client", "second", "--out", put2)
    (new_cert,) = [p for p in top.objects("clients") if p.name not in before]
    # taken away at the top: what the node took from the client must reach the top by itself
    # (a certificate written through a node by a bunker that did not refuse key changes there)
    cert_bytes = new_cert.read_bytes()
    new_cert.unlink()
    env = {k: v for k, v in top.env.items() if k != "BUNKER_PASSPHRASE"}
    src = tmp_path / "src"
    make_tree(src)
    doc = js(
        expect_rc(run_bunker("backup", src, "--json", "--repo", office, env={**env, "BUNKER_PUT_KEY": str(put2)}), 0)
    )
    assert doc["level"] in ("ok", "note") and not doc.get("spooled")
    node_cmd(top, "forward", office)
    assert new_cert.read_bytes() == cert_bytes
    (snap,) = js(top.ok("snapshots", "--json"))["snapshots"]
    assert snap["client"] == "second"
    top.ok("check", "--keyless")

    # what the node's server asks of a certificate from below: the master key's signature for
    # this very repository (another repository's certificate, or one byte altered, is refused)
    store = office / "store" / top.id
    mine = (
        store
        / "clients"
        / next(p.name for p in (top.path / "clients").iterdir() if (store / "clients" / p.name).exists())
    )
    good = mine.read_bytes()
    assert accepts_certificate(str(store), good)
    assert not accepts_certificate(str(store), good[:-1] + bytes([good[-1] ^ 1]))
    other = init_repo(tmp_path / "other")
    (foreign,) = (other.path / "clients").iterdir()
    assert not accepts_certificate(str(store), foreign.read_bytes())


def test_node_serves_on_a_socket(tmp_path: Path) -> None:
    top = init_repo(tmp_path / "top")
    office = make_node(top, tmp_path / "office", "office")
    sock = tmp_path / "office.sock"
    server = subprocess.Popen(
        [BUNKER, "node", "serve", str(office), "--socket", str(sock)], env=top.env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.stderr else ""
            time.sleep(0.05)
        src = tmp_path / "src"
        make_tree(src)
        doc = backup_into(top, f"unix://{sock}", src)
        assert not doc.get("spooled")
        listed = js(run_bunker("snapshots", "--json", "--repo", f"unix://{sock}", env=top.env))
        assert len(listed["snapshots"]) == 1
    finally:
        server.terminate()
        assert server.wait(20) == 0
    assert not sock.exists()


def test_seed_and_card_damage_is_refused(tmp_path: Path) -> None:
    top = init_repo(tmp_path / "top")
    node_cmd(top, "init", tmp_path / "n", "--name", "n")
    seed = tmp_path / "top.seed"
    top.ok("node", "export-seed", seed)
    data = bytearray(seed.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.seed"
    bad.write_bytes(bytes(data))
    cp = node_cmd(top, "seed", tmp_path / "n", bad, rc=ExitCode.USAGE)
    assert "not a usable seed file" in cp.stderr
    assert not any((tmp_path / "n" / "store").iterdir())  # nothing written
    card = tmp_path / "n.card"
    node_cmd(top, "card", tmp_path / "n", "--out", card)
    doc: dict[str, Any] = json.loads(card.read_text())
    doc["name"] = "other"  # a name is not bound by the id, but a swapped key is:
    doc["id"] = "0" * 64
    card.write_text(json.dumps(doc))
    cp = top.ok("key", "new-node", card, rc=ExitCode.USAGE)
    assert "not a usable node card" in cp.stderr
    assert top.objects("nodes") == []


def test_a_node_that_hears_nothing_from_upstream_warns(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    assert js(node_cmd(top, "forward", office, "--json"))["problems"] == []
    assert js(node_cmd(top, "status", office, "--json"))["problems"] == []
    conf = office / "node.json"
    doc = json.loads(conf.read_text())
    doc["stale_after"] = 0  # heard from a moment ago: already too long
    conf.write_text(json.dumps(doc))
    status = js(node_cmd(top, "status", office, "--json", rc=ExitCode.WARN))
    (problem,) = status["problems"]
    assert problem["code"] == "upstream-stale" and "revocations" in problem["message"]


def test_a_client_of_another_build_backs_up_into_a_node(tmp_path: Path) -> None:
    """RECOVERY.md names the build that wrote it: a client whose text differs (another bunker
    version) neither rewrites a node's copy nor fails over it."""
    top = init_repo(tmp_path / "top")
    office = make_node(top, tmp_path / "office", "office")
    recovery = office / "store" / top.id / "RECOVERY.md"
    recovery.write_text(recovery.read_text() + "\nwritten by another build\n")
    before = recovery.read_bytes()
    src = tmp_path / "src"
    make_tree(src)
    doc = backup_into(top, office, src)
    assert not doc.get("spooled") and doc["level"] in ("ok", "note"), doc["events"]
    assert recovery.read_bytes() == before


def test_a_forward_finds_what_it_sent_before_evicted_by_the_node(tmp_path: Path) -> None:
    """A client's `bunker forward` killed after its puts went through leaves the packs in its
    spool and on the node; the node forwards them and evicts them (the top recorded them). The
    next `bunker forward` counts them as held (listed as upstream) instead of failing on them."""
    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    backup_into(top, office, src)
    node_cmd(top, "forward", office)

    away = tmp_path / "office-away"
    office.rename(away)  # the node cannot be reached: the next backup goes to the client's spool
    (src / "new").write_bytes(b"spooled while the node was away" * 5000)
    doc = backup_into(top, office, src, rc=(0, 1))
    assert doc["spooled"], doc["events"]
    away.rename(office)
    spooled_packs = [p for p in (top.base / "data").rglob("packs/*") if p.is_file() and not p.name.startswith(".")]
    assert spooled_packs
    store_packs = office / "store" / top.id / "packs"
    for p in spooled_packs:  # what a killed forward's puts left on the node
        shutil.copy(p, store_packs / p.name)
    conf = office / "node.json"  # a bound that every recorded pack must leave for
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "max_size": 1024}))
    node_cmd(top, "forward", office, rc=(0, 1))  # up to the top, recorded, then evicted to the bound
    assert not any((store_packs / p.name).exists() for p in spooled_packs)

    fwd = expect_rc(run_bunker("forward", "--json", "--repo", office, env=top.env), 0)
    assert js(fwd)["snapshots"], fwd.stdout
    node_cmd(top, "forward", office, rc=(0, 1))  # (the node's metadata alone is over a 1 KiB bound)
    assert len(top.objects("snapshots")) == 2
    top.ok("check", "--read-data")
