"""Status records (docs/hierarchy.md, "Status of the clients"; docs/format.md section 25): every
backup run, a failed one too, leaves a signed record under status/; `bunker status` reads them
without a key, flags silent clients, refuses altered ones; they travel up through a node with
the data, and `bunker node status` lists the clients below the node."""

from __future__ import annotations

import os
from pathlib import Path

from bunker.repo.status_records import open_text, parse_status
from helpers import PASSPHRASE, init_repo, js, make_tree, rename_to_hash
from test_node import backup_into, node_cmd, office_with_top


def _rows(doc: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {r["client"]: r for r in doc["clients"]}


def test_every_run_leaves_a_status_record_and_status_reads_them_keyless(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    first = repo.backup(src)
    second = repo.backup(src)
    assert first["status"] and second["status"] and first["status"] != second["status"]
    bad_tar = tmp_path / "bad.tar"
    bad_tar.write_bytes(os.urandom(3000))
    failed = repo.run("backup", "--tar", bad_tar, "--json")
    assert failed.returncode == 4

    doc = js(repo.ok("status", "--json", rc=3))  # the newest run failed: err
    row = _rows(doc)[repo.client]
    assert (row["seq"], row["level"], row["exit"], row["snapshot"]) == (3, "fatal", 4, "")
    assert row["codes"] == {"backup-failed": 1} and row["problems"] == [] and row["silent"] is False
    assert doc["untrusted"] == []
    # the readable part holds codes and numbers; the message is sealed to the master key
    names = sorted(p.name for p in (repo.path / "status").iterdir())
    assert len(names) == 3
    raw = {n: (repo.path / "status" / n).read_bytes() for n in names}
    newest = next(n for n, b in raw.items() if parse_status(f"status/{n}", b)[0].seq == 3)
    assert b"tar archive" not in raw[newest] and b"invalid header" not in raw[newest]
    from bunker.crypto.keyfile import load_master_key

    master = load_master_key(str(repo.master_key), PASSPHRASE)
    (event,) = open_text(parse_status(f"status/{newest}", raw[newest])[0], repo.id, master.data_private)
    assert "cannot read the tar archive" in event["message"]

    # a good run again: ok, linked to the failed one
    again = repo.backup(src)
    row = _rows(js(repo.ok("status", "--json")))[repo.client]
    assert (row["seq"], row["snapshot"], row["snapshot_seq"]) == (4, f"snapshots/{again['snapshot']}", 3)
    # silent: nothing newer than the bound
    silent = js(repo.ok("status", "--json", "--silent-after", "0s", rc=1))
    assert _rows(silent)[repo.client]["silent"] is True


def test_an_altered_status_record_is_refused(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    (path,) = (repo.path / "status").iterdir()
    data = bytearray(path.read_bytes())
    i = data.index(b"\xa4exit\x00")  # exit code 0 in the signed body (msgpack) ...
    data[i + 5] = 1  # ... becomes 1: a well-formed record whose signature no longer verifies
    path.write_bytes(bytes(data))
    forged = rename_to_hash(path)
    doc = js(repo.ok("status", "--json", rc=(1, 3)))
    assert any(forged.name in u for u in doc["untrusted"]), doc
    assert _rows(doc)[repo.client].get("seq") is None  # nothing trusted is left of it
    check = js(repo.ok("check", "--json", rc=(1, 3, 14)))
    named = [p for p in check["problems"] if p["object"] == f"status/{forged.name}"]
    assert named and "status record refused" in named[0]["problem"], check["problems"]


def test_a_replayed_or_withheld_status_record_is_named(tmp_path: Path) -> None:
    """Another repository's record stored here is refused; deleting a client's newest failed
    record to pass an older `ok` off as current leaves the next record linking to nothing, which
    is named, and the older `ok` is no newer than it was (silent once its age passes the limit)."""
    a, b = init_repo(tmp_path / "a"), init_repo(tmp_path / "b")
    src = tmp_path / "src"
    make_tree(src)
    a.backup(src)
    b.backup(src)
    (theirs,) = (b.path / "status").iterdir()
    (a.path / "status" / theirs.name).write_bytes(theirs.read_bytes())  # replayed into another repository
    doc = js(a.ok("status", "--json", rc=(1, 3)))
    assert any(theirs.name in u and "another repository" in u for u in doc["untrusted"]), doc

    bad_tar = tmp_path / "bad.tar"
    bad_tar.write_bytes(os.urandom(3000))
    assert a.run("backup", "--tar", bad_tar, "--json").returncode == 4  # record #2: fatal
    a.backup(src)  # record #3 links to #2
    records = {
        parse_status(f"status/{p.name}", p.read_bytes())[0].seq: p
        for p in (a.path / "status").iterdir()
        if p.name != theirs.name
    }
    records[2].unlink()  # the failed run's record withheld
    row = _rows(js(a.ok("status", "--json", rc=(1, 3))))[a.client]
    assert row["seq"] == 3 and any("links to record #2" in p and "which is not here" in p for p in row["problems"]), row
    old = _rows(js(a.ok("status", "--json", "--silent-after", "0s", rc=(1, 3))))[a.client]
    assert old["silent"] is True


def test_status_records_travel_up_through_a_node(tmp_path: Path) -> None:
    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    doc = backup_into(top, office, src)
    assert doc["status"]
    st = js(node_cmd(top, "status", office, "--json"))
    (clients,) = [r["clients"] for r in st["repositories"]]
    (row,) = clients
    assert row["client"] == top.client and row["seq"] == 1 and row["top_head"] is None
    js(node_cmd(top, "forward", office, "--json"))
    assert (top.path / doc["status"]).exists(), "the status record went up with the data"
    row = _rows(js(top.ok("status", "--json")))[top.client]
    assert row["seq"] == 1 and row["snapshot"] == f"snapshots/{doc['snapshot']}"
    st = js(node_cmd(top, "status", office, "--json"))
    assert st["repositories"][0]["clients"][0]["top_head"]["seq"] == 1


def test_a_spooled_runs_status_record_goes_up_with_its_snapshot(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)  # a run that reached the repository seeds this machine's spool
    away = repo.path.parent / "away"
    repo.path.rename(away)
    try:
        doc = repo.backup(src)  # the repository is away: into this machine's spool
        assert doc["spooled"] and doc["status"]
    finally:
        away.rename(repo.path)
    assert not (repo.path / doc["status"]).exists()
    repo.ok("forward")
    assert (repo.path / doc["status"]).exists(), "the status record waited in the spool and went up"
    row = _rows(js(repo.ok("status", "--json")))[repo.client]
    assert row["seq"] == 2 and row["level"] in ("ok", "note", "warn")


def test_a_state_file_that_names_no_snapshot_witnesses_nothing(tmp_path: Path) -> None:
    """A chain head file that does not name a snapshot (damaged, or another state file's content
    in its place) is no witness: check reports no damage from it."""
    import json

    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    doc = repo.backup(src)
    (head_file,) = (Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "state").glob("*/*/chain.json")
    head_file.write_text(json.dumps({"seq": 9, "name": doc["status"]}))
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_a_node_signs_the_record_of_a_client_that_could_not_run(tmp_path: Path) -> None:
    """A backup through a node whose put key is gone cannot sign its own record: the node signs
    a fatal one for it (once per ten minutes), which goes up; the top's status shows the failed
    run, reported by the node, and the client's own next record wins again."""
    from bunker.errors import ExitCode
    from helpers import expect_rc, run_bunker

    top, office = office_with_top(tmp_path)
    src = tmp_path / "src"
    make_tree(src)
    backup_into(top, office, src)
    key = top.put_key
    away = key.with_name("put.away")
    key.rename(away)
    failed = run_bunker("backup", src, "--repo", office, env=top.env)
    assert failed.returncode == ExitCode.KEY_MISSING, failed.stderr
    assert "the node signed a status record of this failed run" in failed.stderr, failed.stderr
    again = run_bunker("backup", src, "--repo", office, env=top.env)  # within ten minutes: the same record
    assert again.returncode == ExitCode.KEY_MISSING
    reports = [p for p in (office / "store" / top.id / "status").iterdir()]
    assert len(reports) == 2, reports  # the first run's own, and one report

    js(node_cmd(top, "forward", office, "--json"))
    doc = js(top.ok("status", "--json", rc=3))
    row = _rows(doc)[top.client]
    assert (row["level"], row["exit"], row["reported_by"]) == ("fatal", ExitCode.KEY_MISSING, "office"), row
    assert row["codes"] == {"put-key-unusable": 1} and doc["untrusted"] == [], doc
    assert "reported by node 'office'" in top.ok("status", rc=3).stdout
    # the message is sealed to the master key, as a client's own
    from bunker.crypto.keyfile import load_master_key

    master = load_master_key(str(top.master_key), PASSPHRASE)
    records = list((top.path / "status").iterdir())
    name = next(p for p in records if parse_status(f"status/{p.name}", p.read_bytes())[0].reporter)
    rec = parse_status(f"status/{name.name}", name.read_bytes())[0]
    (event,) = open_text(rec, top.id, master.data_private)
    assert "no put key" in event["message"], event
    expect_rc(run_bunker("check", "--keyless", "--repo", top.path, env=top.env), 0, 1)

    # altered, the report is refused like any record
    data = bytearray(name.read_bytes())
    data[-5] ^= 1
    name.write_bytes(bytes(data))
    bad = js(top.ok("status", "--json", rc=3))
    assert bad["untrusted"], bad
    name.unlink()

    away.rename(key)  # the key is back: the client's own record is the newest again
    backup_into(top, office, src)
    js(node_cmd(top, "forward", office, "--json"))
    row = _rows(js(top.ok("status", "--json")))[top.client]
    assert "reported_by" not in row and row["level"] in ("ok", "note"), row
