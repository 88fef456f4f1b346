"""Garbage collection across the hierarchy (docs/hierarchy.md): a prune at the repository of record
never deletes what a session running on a node below uses. The top knows nothing of office's
sessions (their leases live in office's store): it waits for every node's session
acknowledgement to cover the condemnation, and the acknowledgements travel up behind the data."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from helpers import BUNKER, compare_trees, js, kill_run_when, restored_path, run_bunker
from test_checkpoint import tree_with_tail
from test_node_links import build


def _wait_for(pred, what: str, seconds: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_prune_at_the_top_waits_for_a_session_running_on_a_node(tmp_path: Path) -> None:
    h = build(tmp_path)
    top = h.top
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept").write_bytes(random.Random(7).randbytes(1_500_000))

    first = js(run_bunker("backup", src, "--json", "--repo", h.office, env=top.env))
    h.round_trip()
    packs_of_first = {p.name for p in (top.path / "packs").iterdir()}

    # a second session starts on office and is held mid-run: its lease is in office's store only
    (src / "more").write_bytes(random.Random(8).randbytes(30_000_000))
    env = dict(top.env, BUNKER_PROGRESS="never")
    second = subprocess.Popen(
        [BUNKER, "backup", str(src), "--json", "--repo", str(h.office)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    leases = h.office / "store" / top.id / "sessions"
    _wait_for(lambda: any(not p.name.startswith(".") for p in leases.iterdir()), "the second backup's lease")
    os.killpg(second.pid, signal.SIGSTOP)
    try:
        # at the top the first snapshot is forgotten: its packs become garbage, condemned, due at once
        pruner = tmp_path / "pruner.put"
        top.ok("key", "new-client", "pruner", "--prune", "--out", pruner)
        top.ok("forget", first["snapshot"].split("/")[-1][:12], "--master-key", top.master_key)
        top.ok("prune", "--put-key", pruner, "--grace", "0s")
        doc = js(top.ok("prune", "--put-key", pruner, "--grace", "0s", "--json"))
        waiting = " ".join(w["reason"] for w in doc["waiting"])
        assert "node 'office'" in waiting or "node 'hq'" in waiting, doc
        assert doc["deleted"] == 0
        assert packs_of_first <= {p.name for p in (top.path / "packs").iterdir()}
    finally:
        os.killpg(second.pid, signal.SIGCONT)
    out, err = second.communicate(timeout=300)
    assert second.returncode in (0, 1), err.decode()
    second_snap = js(subprocess.CompletedProcess([], 0, out.decode(), ""))["snapshot"]

    # the second snapshot goes up; the acknowledgements that follow it release the wait, and the
    # packs it shares with the forgotten snapshot are kept (rescued), the rest goes
    h.round_trip()
    h.round_trip()
    doc = js(top.ok("prune", "--put-key", pruner, "--grace", "0s", "--json"))
    assert doc["waiting"] == [], doc["waiting"]
    top.ok("check", "--read-data")
    target = tmp_path / "restored"
    top.ok("restore", second_snap.split("/")[-1][:12], "--target", target, "--master-key", top.master_key)
    compare_trees(src, restored_path(target, src))
    shutil.rmtree(target)


def test_a_dead_sessions_checkpoint_on_a_node_is_a_root_at_the_top(tmp_path: Path) -> None:
    """A backup killed on office leaves a checkpoint there; its packs reach the top, where no
    snapshot names them yet: office sends a checkpoint root up, so a prune at the top keeps them
    until the client's next run (through office) adopts the checkpoint."""
    from bunker.crypto.keyfile import load_put_key
    from bunker.encoding import FormatError
    from bunker.repo.pack import decrypt_trailer, parse_footer
    from bunker.repo.records import parse_lease
    from bunker.repo.refs import read_set

    h = build(tmp_path)
    top = h.top
    src = tmp_path / "src"
    tree_with_tail(src)
    leases = h.office / "store" / top.id / "sessions"

    store = h.office / "store" / top.id
    secrets = load_put_key(str(top.put_key)).secrets

    def holds_a_dead_blob() -> bool:
        """The newest checkpoint's packs hold a blob its chunk set does not name (of a file read
        in part when it was written): what makes a prune at the top repack one of them. A
        checkpoint written between two files holds none, and the run goes on to the next."""
        newest: tuple[int, dict[str, Any]] | None = None
        for p in leases.iterdir() if leases.is_dir() else ():
            try:
                cp = None if p.name.startswith(".") else parse_lease(p.read_bytes())[0].get("checkpoint")
            except (OSError, FormatError):
                continue
            if cp and (newest is None or int(p.name.rsplit(".", 1)[1]) > newest[0]):
                newest = (int(p.name.rsplit(".", 1)[1]), cp)
        if newest is None:
            return False
        cp = newest[1]

        def read(n: str) -> bytes:
            return (store / n).read_bytes()

        try:  # (the run is held still while this looks)
            chunks = set(read_set(cp["chunkset"], read, secrets))
            for name in read_set(cp["packset"], read):
                data = read(f"packs/{name}")
                if any(b.chunk_id not in chunks for b in decrypt_trailer(parse_footer(data, len(data)), secrets).blobs):
                    return True
        except (OSError, FormatError):
            return False
        return False

    ended, stderr = kill_run_when(
        "backup",
        src,
        "--repo",
        h.office,
        "--no-progress",
        "--checkpoint-interval",
        "0.2s",
        env=top.env,
        reached=holds_a_dead_blob,
        paced=True,
    )
    assert holds_a_dead_blob(), f"the backup ended (exit {ended}) before a checkpoint held a file in part: {stderr}"
    past = time.time() - 7200  # the storage's clock says the lease expired long ago
    for p in leases.iterdir():
        os.utime(p, (past, past))

    h.up()
    # the newest refresh: the one office's checkpoint root names
    lease = max(
        (p for p in leases.iterdir() if parse_lease(p.read_bytes())[0].get("checkpoint")),
        key=lambda p: int(p.name.rsplit(".", 1)[1]),
    )
    packset = parse_lease(lease.read_bytes())[0]["checkpoint"]["packset"]
    named = {f"packs/{p}" for p in read_set(packset, lambda n: (top.path / n).read_bytes())}
    assert named and all((top.path / n).exists() for n in named), "the checkpoint's packs went up"
    pruner = tmp_path / "pruner.put"
    top.ok("key", "new-client", "pruner", "--prune", "--out", pruner)
    # condemns what nothing names; a checkpoint pack with any dead blob is repacked (its blobs
    # move to a new pack), which the incomplete snapshot the next run makes must survive
    top.ok("prune", "--put-key", pruner, "--grace", "0s", "--repack-threshold", "1.0")
    for _ in range(2):  # every node acknowledges past the condemnation: deletions are due
        h.down()
        h.up()
    doc = js(top.ok("prune", "--put-key", pruner, "--grace", "0s", "--json"))
    assert doc["waiting"] == [], doc["waiting"]
    # kept, or repacked (a small pack's blobs moved into a new pack, under a move record)
    from bunker.repo.moves import PackMoves
    from bunker.repo.repository import Repository
    from bunker.storage.local import LocalBackend

    moves = PackMoves.load(Repository.open(LocalBackend(str(top.path))))
    existing = {p.name for p in (top.path / "packs").iterdir()}
    assert all((top.path / n).exists() or moves.covered(n.split("/", 1)[1], existing) for n in named), (
        "a prune at the top deleted the checkpoint's packs"
    )
    # what this test is for: the snapshot that adopts the checkpoint names a pack the top moved
    assert any(not (top.path / n).exists() for n in named), "no pack of the checkpoint was repacked"

    # the client's next run through office adopts the checkpoint; once that is at the top, the
    # root is spent and a prune removes it
    again = js(run_bunker("backup", src, "--json", "--repo", h.office, env=top.env))
    assert any(e["code"] == "incomplete-snapshot" for e in again["events"]), again["events"]
    h.down()
    h.up()
    top.ok("prune", "--put-key", pruner, "--grace", "0s")
    from bunker.repo.objects import MAGIC_CKROOT

    roots = [p for p in (top.path / "gc").iterdir() if p.read_bytes()[:4] == MAGIC_CKROOT]
    assert roots == []
    top.ok("check", "--read-data")
