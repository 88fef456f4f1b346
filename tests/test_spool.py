"""An unreachable repository is not fatal (docs/user-guide.md, "When the repository cannot be
reached"): the backup completes into the local spool at level note (warn once it has waited too
long), `bunker forward` and every later backup deliver it, and nothing is lost. The repositories
are real: a directory that disappears (a removable disk) and a moto S3 server cut off by a TCP
proxy in the middle of a backup."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bunker.errors import ExitCode
from helpers import (
    AWS_SCRUB,
    S3_REGION,
    Repo,
    S3Server,
    compare_trees,
    init_repo,
    js,
    make_env,
    make_tree,
    restored_path,
)
from netcut import CutProxy


def _spool_objects(repo: Repo) -> list[str]:
    root = Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "spool"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        for prefix in ("packs", "index", "refs", "snapshots", "status"):
            if (d / prefix).is_dir():
                out += [f"{prefix}/{p.name}" for p in (d / prefix).iterdir() if not p.name.startswith(".")]
    return sorted(out)


def _events(doc: dict[str, object], code: str) -> list[dict[str, object]]:
    return [e for e in doc["events"] if e["code"] == code]  # type: ignore[attr-defined, index]


def _restore_and_compare(repo: Repo, src: Path, target: Path, snapshot: str = "latest") -> None:
    rdoc = js(repo.ok("restore", snapshot, "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))


def test_missing_disk_spools_then_forward_delivers(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    first = repo.backup(src)
    assert not first["spooled"] and _spool_objects(repo) == []

    away = tmp_path / "repo-unmounted"
    repo.path.rename(away)  # the disk is not mounted
    (src / "new-while-away.txt").write_bytes(os.urandom(300_000))
    doc = repo.backup(src)
    assert doc["spooled"] is True and doc["level"] == "note"
    (ev,) = _events(doc, "spooled")
    assert "cannot be reached" in ev["message"] and str(repo.path) in ev["message"]  # type: ignore[operator]
    assert "bunker forward" in ev["message"]  # type: ignore[operator]
    # dedup keeps working offline from the cached index: only the new file is stored
    assert doc["stats"]["files_new"] == 1
    assert doc["stats"]["stored_new"] < 400_000
    again = repo.backup(src)  # a second offline run continues the chain in the spool
    assert again["spooled"] and again["seq"] == doc["seq"] + 1 and again["stats"]["stored_new"] < 20_000
    waiting = _spool_objects(repo)
    assert sum(n.startswith("snapshots/") for n in waiting) == 2 and any(n.startswith("packs/") for n in waiting)

    # still unreachable: forward says so, keeps everything, names the next step
    cp = repo.ok("forward", rc=ExitCode.NO_REPOSITORY)
    assert "wait in the local spool" in cp.stderr and "nothing is lost" in cp.stderr
    assert _spool_objects(repo) == waiting

    away.rename(repo.path)  # mounted again
    fwd = js(repo.ok("forward", "--json"))
    assert len(fwd["snapshots"]) == 2 and fwd["held"] == [] and fwd["left"] == 0
    assert fwd["sent"] == len(waiting)
    assert _spool_objects(repo) == []
    assert {f"snapshots/{s}" for s in fwd["snapshots"]} <= {f"snapshots/{p.name}" for p in repo.objects("snapshots")}

    snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert [s["seq"] for s in snaps] == [1, 2, 3] and all(s["complete"] for s in snaps)
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    _restore_and_compare(repo, src, tmp_path / "t")
    assert js(repo.ok("forward", "--json"))["sent"] == 0  # nothing left


def test_next_backup_forwards_first(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    away = tmp_path / "away"
    repo.path.rename(away)
    (src / "offline.bin").write_bytes(os.urandom(50_000))
    offline = repo.backup(src)
    assert offline["spooled"]
    away.rename(repo.path)
    cp = repo.ok("backup", src, "--json")
    doc = js(cp)
    assert not doc["spooled"] and doc["level"] == "note"  # note: the master key is still on this machine
    assert "forwarded" in cp.stderr and "1 snapshots" in cp.stderr
    assert _spool_objects(repo) == []
    assert [s["seq"] for s in js(repo.ok("snapshots", "--json"))["snapshots"]] == [1, 2, 3]
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_spool_escalates_to_warn_with_age(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    repo.path.rename(tmp_path / "away")
    doc = repo.backup(src, args=("--spool-warn-age", "0s"), rc=ExitCode.WARN)
    assert doc["level"] == "warn"
    (ev,) = _events(doc, "spool-old")
    assert "bunker forward" in ev["message"] and "days" in ev["message"]  # type: ignore[operator]
    cp = repo.run("backup", src, "--spool-warn-age", "soon")
    assert cp.returncode == ExitCode.USAGE and "is not an age" in cp.stderr


def test_never_reached_is_fatal_with_a_reason(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    shutil.rmtree(repo.path)
    cp = repo.run("backup", src)
    assert cp.returncode == ExitCode.NO_REPOSITORY
    assert "no backup has reached this repository from this machine yet" in cp.stderr
    assert _spool_objects(repo) == []


def test_s3_cut_off_mid_backup_loses_nothing(s3_server: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    """The S3 server goes away in the middle of the upload of a pack: the backup completes into
    the spool (level note), and after `bunker forward` the snapshot is complete upstream."""
    proxy = CutProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    try:
        url = f"s3://{s3_server.bucket}/{s3_prefix}?endpoint={proxy.endpoint}&region={S3_REGION}"
        env = make_env(tmp_path / "r")
        for k in AWS_SCRUB:
            env.pop(k, None)
        env.update(s3_server.env())
        repo = init_repo(tmp_path / "r", url=url, env_extra=env)
        src = tmp_path / "src"
        make_tree(src)
        (src / "big").mkdir()
        for i in range(5):  # ~40 MiB of incompressible data: three packs of 16 MiB
            (src / "big" / f"f{i}").write_bytes(os.urandom(8 << 20))
        repo.backup(src / "big" / "f0")  # a first backup seeds the spool (the config and this client)
        proxy.restore(cut_after=20 << 20)  # cut when 20 MiB more went towards the server: mid-pack
        doc = repo.backup(src)
        assert proxy.was_cut.is_set()
        assert doc["spooled"] is True and doc["level"] == "note", doc["events"]
        assert _events(doc, "spooled")
        waiting = _spool_objects(repo)
        assert any(n.startswith("packs/") for n in waiting) and any(n.startswith("snapshots/") for n in waiting)

        proxy.restore()
        fwd = js(repo.ok("forward", "--json"))
        assert len(fwd["snapshots"]) == 1 and fwd["held"] == [] and fwd["left"] == 0
        assert _spool_objects(repo) == []
        snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
        assert [s["seq"] for s in snaps] == [1, 2] and all(s["complete"] for s in snaps)
        assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
        _restore_and_compare(repo, src, tmp_path / "t")
    finally:
        proxy.close()


def _vanish_biggest_pack(repo: Repo, src: Path, tmp_path: Path) -> tuple[dict[str, object], Path]:
    """A backup, then one offline (it dedups against the first one's packs), then the first
    one's biggest pack vanishes upstream (as if a prune had removed it meanwhile)."""
    repo.backup(src)
    away = tmp_path / "away"
    repo.path.rename(away)
    offline = repo.backup(src)
    assert offline["spooled"]
    away.rename(repo.path)
    victim = max(repo.objects("packs"), key=lambda p: p.stat().st_size)
    victim.unlink()
    return offline, victim


def test_forward_stores_vanished_chunks_again_from_the_source_files(tmp_path: Path) -> None:
    """An offline run deduplicated against a pack that vanished upstream before forwarding: the
    chunks are stored again from the unchanged source files, and the snapshot (signed again with
    a new pack set) arrives complete."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    offline, victim = _vanish_biggest_pack(repo, src, tmp_path)
    cp = repo.ok("forward", "--json")
    fwd = js(cp)
    (fix,) = fwd["repaired"]
    assert fix["was"] == offline["snapshot"] and fix["complete"] and fix["lost_chunks"] == 0
    assert fix["vanished_packs"] == 1 and fix["recovered_chunks"] > 0
    assert fwd["snapshots"] == [fix["snapshot"]] and fwd["held"] == [] and fwd["left"] == 0
    assert "stored again from the unchanged source files" in cp.stderr
    snaps = {s["id"]: s for s in js(repo.ok("snapshots", "--json"))["snapshots"]}
    new = next(s for k, s in snaps.items() if fix["snapshot"].startswith(k))
    assert new["complete"] and new["seq"] == 2
    _restore_and_compare(repo, src, tmp_path / "t", fix["snapshot"])
    # the first snapshot lost its pack for real: check says so, and only about that snapshot
    check = js(repo.ok("check", "--keyless", "--json", rc=ExitCode.INTEGRITY))
    assert victim.name in json.dumps(check) and fix["snapshot"] not in json.dumps(check["problems"])
    check = js(repo.ok("check", "--json", rc=ExitCode.INTEGRITY))
    assert victim.name in json.dumps(check) and fix["snapshot"] not in json.dumps(check["problems"])


def test_forward_marks_incomplete_and_names_changed_files(tmp_path: Path) -> None:
    """A file changed after the offline run: its old chunks cannot be stored again, so the
    snapshot arrives incomplete (level err) naming the file; the rest restores."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    (src / "journal.txt").write_bytes(os.urandom(100_000))
    offline, _ = _vanish_biggest_pack(repo, src, tmp_path)
    (src / "journal.txt").write_bytes(os.urandom(100_000))  # changed since the offline run
    cp = repo.ok("forward", "--json", rc=ExitCode.ERR)
    fwd = js(cp)
    (fix,) = fwd["repaired"]
    assert not fix["complete"] and fix["lost_chunks"] > 0 and fix["recovered_chunks"] > 0
    assert fix["files"] == [str(src / "journal.txt")]
    assert fwd["snapshots"] == [fix["snapshot"]]
    assert "forwarded incomplete" in cp.stderr and "journal.txt" in cp.stderr
    snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
    new = next(s for s in snaps if fix["snapshot"].startswith(s["id"]))
    assert new["complete"] is False and new["level"] == "err"
    # check knows the declared loss (not damage); it reports only the pack that really vanished
    check = js(repo.ok("check", "--json", rc=ExitCode.INTEGRITY))
    assert fix["snapshot"] not in json.dumps(check["problems"])
    target = tmp_path / "t"
    repo.run("restore", fix["snapshot"], "--target", target, "--json")
    restored = restored_path(target, src)
    for p in src.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != "journal.txt":
            assert (restored / p.relative_to(src)).read_bytes() == p.read_bytes()


def _killed_forward_then_prunes(
    repo: Repo, src: Path, tmp_path: Path, prunes: int, local_copies: bool = True, index_up: bool = False
) -> tuple[list[str], Callable[[], dict[str, Any]]]:
    """A backup, one offline with new data, then a forward killed once its packs were up (its
    index object and snapshot stay in the spool, and so do the packs' local copies, unless
    ``local_copies`` is False: what a forward of an older version left; with ``index_up`` the
    index object went up too), then ``prunes`` prunes at grace 0: the first condemns those
    packs (no snapshot names them upstream), the second deletes them. Returns the names of the
    packs that went up, and the prune (another machine's)."""
    repo.backup(src)
    away = tmp_path / "away"
    repo.path.rename(away)
    (src / "while-away.bin").write_bytes(os.urandom(300_000))
    assert repo.backup(src)["spooled"]
    away.rename(repo.path)
    spool = next((Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "spool").iterdir())
    sent = [p for p in (spool / "packs").iterdir() if not p.name.startswith(".")]
    for p in sent:  # what `forward` does for each pack before the kill
        shutil.copy(p, repo.path / "packs" / p.name)
        if not local_copies:
            p.unlink()
    if index_up:
        for p in (spool / "index").iterdir():
            if not p.name.startswith("."):
                shutil.copy(p, repo.path / "index" / p.name)
                p.unlink()
    pruner = tmp_path / "pruner.put"
    repo.ok("key", "new-client", "pruner", "--prune", "--out", pruner)
    env = make_env(tmp_path / "pruner-home")

    def prune() -> dict[str, Any]:
        return js(repo.ok("prune", "--put-key", pruner, "--grace", "0s", "--json", env=env))

    docs = [prune() for _ in range(prunes)]
    assert docs[0]["condemned"] == len(sent)
    if prunes > 1:
        assert docs[1]["deleted"] == len(sent)
    return [p.name for p in sent], prune


def test_forward_after_its_packs_were_pruned_sends_them_again(tmp_path: Path) -> None:
    """The packs a killed forward sent were deleted by prunes before the next forward (nothing
    upstream named them yet): their local copies stayed in the spool, so the next forward sends
    them again and the snapshot arrives complete, as it was taken."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    sent, _ = _killed_forward_then_prunes(repo, src, tmp_path, prunes=2)
    assert not any((repo.path / "packs" / name).exists() for name in sent)
    fwd = js(repo.ok("forward", "--json"))
    assert fwd["repaired"] == [] and fwd["indexes_trimmed"] == 0 and fwd["left"] == 0
    # (their index object waited in the spool and went up with them: nothing is indexed twice)
    assert fwd["packs_indexed_again"] == 0
    assert all((repo.path / "packs" / name).exists() for name in sent)
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    _restore_and_compare(repo, src, tmp_path / "t")


def test_forward_indexes_again_the_packs_it_sends_again(tmp_path: Path) -> None:
    """The same after the killed forward had sent its index object too: the prune that deleted
    the packs dropped their entries with them, so sending the packs again is not enough (check
    would find the snapshot's chunks unindexed): the next forward indexes them again from their
    trailers, and the snapshot is whole without a repack or an index rebuild."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    sent, _ = _killed_forward_then_prunes(repo, src, tmp_path, prunes=2, index_up=True)
    assert not any((repo.path / "packs" / name).exists() for name in sent)
    fwd = js(repo.ok("forward", "--json"))
    assert fwd["repaired"] == [] and fwd["packs_indexed_again"] == len(sent) and fwd["left"] == 0
    check = js(repo.ok("check", "--read-data", "--json"))
    assert check["ok"] is True, check["problems"]
    _restore_and_compare(repo, src, tmp_path / "t")


def test_forward_without_the_local_copies_names_no_pruned_pack(tmp_path: Path) -> None:
    """The same with the local copies gone (a forward of an older version deleted each once it
    was up): the spooled index object that names the deleted packs is not sent as it is (check
    would call it damaged), and the snapshot is repaired (the new file from its source; its
    directory listings, which only those packs held, are lost and say so)."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    sent, _ = _killed_forward_then_prunes(repo, src, tmp_path, prunes=2, local_copies=False)
    fwd = js(repo.ok("forward", "--json", rc=ExitCode.ERR))
    assert fwd["indexes_trimmed"] == 1 and fwd["left"] == 0
    (fix,) = fwd["repaired"]
    assert fix["vanished_packs"] == len(sent) and fix["recovered_chunks"] > 0 and not fix["complete"]
    check = js(repo.ok("check", "--json"))
    assert check["ok"] is True, check["problems"]
    assert not any(name in json.dumps(check) for name in sent)


def test_forward_copies_what_it_needs_from_condemned_packs(tmp_path: Path) -> None:
    """The packs a killed forward sent were condemned (not yet deleted) before the next forward:
    it treats them as absent like every session (a prune may delete them meanwhile), copies
    the blobs its snapshot needs from them into a pack of its own, and the snapshot arrives
    complete; the next prunes delete the condemned packs and nothing is missing."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    sent, prune = _killed_forward_then_prunes(repo, src, tmp_path, prunes=1)
    fwd = js(repo.ok("forward", "--json"))
    assert fwd["indexes_trimmed"] == 1 and fwd["left"] == 0
    (fix,) = fwd["repaired"]
    assert fix["vanished_packs"] == len(sent) and fix["lost_chunks"] == 0 and fix["complete"]
    snap = json.dumps(js(repo.ok("snapshots", "--json")))
    assert fix["snapshot"][:12] in snap
    for _ in range(2):
        prune()
    assert not any((repo.path / "packs" / name).exists() for name in sent)
    check = js(repo.ok("check", "--read-data", "--json"))
    assert check["ok"] is True, check["problems"]
    _restore_and_compare(repo, src, tmp_path / "t", fix["snapshot"])


def test_state_put_back_from_while_a_snapshot_waited_in_the_spool(tmp_path: Path) -> None:
    """This machine's state directory is put back from a copy taken while its newest snapshot
    waited in the spool; meanwhile the same put key on another machine took that number, so the
    delivery linked the spooled run one number later, signed again. The copy's head names the
    spooled snapshot: `check` and `latest` take the delivered one for it (same run), and once
    that one is deleted upstream, `check` reports the replacement as before."""
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    state = Path(repo.env["XDG_DATA_HOME"]) / "bunker" / "state"
    away = tmp_path / "away"
    repo.path.rename(away)
    (src / "while-away.bin").write_bytes(os.urandom(100_000))
    offline = repo.backup(src, args=("--no-progress",))
    assert offline["spooled"]
    away.rename(repo.path)
    shutil.copytree(state, tmp_path / "old-state")
    twin = make_env(tmp_path / "twin", BUNKER_PUT_KEY=str(repo.put_key))
    repo.ok("backup", src, "--no-progress", env=twin)
    (renumbered,) = js(repo.ok("forward", "--json"))["renumbered"]
    assert renumbered["was"] == offline["snapshot"] and (renumbered["was_seq"], renumbered["seq"]) == (2, 3)
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "old-state", state)
    (head,) = [json.loads(p.read_text()) for p in state.rglob("chain.json")]
    assert head["name"] == f"snapshots/{offline['snapshot']}" and head["spooled"]
    check = js(repo.ok("check", "--json"))
    assert check["ok"] is True and offline["snapshot"] not in json.dumps(check["problems"]), check["problems"]
    listed = js(repo.ok("ls", "latest", "--json"))
    assert listed["snapshot"] == renumbered["snapshot"], listed
    # the delivered copy gone: the remembered head stands for a snapshot the repository lost
    (repo.path / "snapshots" / renumbered["snapshot"]).unlink()
    check = js(repo.ok("check", "--json", rc=ExitCode.INTEGRITY))
    replaced = [p for p in check["problems"] if p["object"] == f"snapshots/{offline['snapshot']}"]
    assert replaced and "was replaced by another object" in replaced[0]["problem"], check["problems"]
