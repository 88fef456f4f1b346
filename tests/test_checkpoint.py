"""Checkpoints (issue 5, docs/format.md section 17, docs/reliability.md): a backup killed with
SIGKILL after a checkpoint leaves an incomplete snapshot, made by the next run from the
checkpoint, that restores what it covers; the next run redoes only what was not finished."""

from __future__ import annotations

import os
from pathlib import Path

from bunker.encoding import FormatError
from bunker.repo.records import parse_lease
from helpers import Repo, b3, js, kill_run_when, restored_path


def _tree(root: Path, dirs: int = 6, files: int = 10, size: int = 4 << 20) -> None:
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub / f"f{f}.bin").write_bytes(os.urandom(size))


def add_tail(root: Path, files: int = 8) -> None:
    """A tail of ``files`` files of 16 MiB read last (``root/z``): a backup reads up to 96 MiB
    ahead of the files it has finished (backup/archiver.py), so without it a checkpoint covering
    files could come only near the end of a run, and a loaded machine may finish the run first."""
    tail = root / "z"
    tail.mkdir(parents=True)
    for i in range(files):
        (tail / f"tail{i}.img").write_bytes(os.urandom(16 << 20))


def tree_with_tail(root: Path) -> None:
    """``_tree`` (60 files of 2 MiB), then ``add_tail``."""
    _tree(root, files=10, size=2 << 20)
    add_tail(root)


def _checkpointed(repo: Repo) -> int:
    """How many files the newest checkpoint in the repository covers (-1: none yet)."""
    return checkpointed_in(repo.path)


def checkpointed_in(store: Path) -> int:
    """How many files the newest checkpoint in the repository directory ``store`` (a node's
    store too) covers (-1: none yet)."""
    best = -1
    sessions = store / "sessions"
    for p in sessions.iterdir() if sessions.is_dir() else ():
        if p.name.startswith("."):
            continue  # a lease being written (the local backend's temp file)
        try:
            body, _ = parse_lease(p.read_bytes())
        except (OSError, FormatError):
            continue  # replaced while read
        cp = body.get("checkpoint")
        if cp:
            best = max(best, int(cp["stats"].get("files", 0)))
    return best


def unindexed_checkpoint_chunks(store: Path, put_key: Path) -> int:
    """How many chunks the checkpoints in ``store`` (a repository or a node's store) name that no
    index object there locates: a checkpoint adopted after a kill must name none (a pack that
    lands after the checkpoint's flush wrote its index object is indexed before the lease)."""
    from bunker.crypto.keyfile import load_put_key
    from bunker.repo.index import decrypt_index, parse_index_frame
    from bunker.repo.refs import read_set

    put = load_put_key(str(put_key))
    secrets = put.secrets
    indexed: set[bytes] = set()
    for p in (store / "index").iterdir():
        obj = parse_index_frame(p.read_bytes())
        if obj.body["domain"] == secrets.domain_id:  # other dedup domains' indexes are not ours to read
            indexed.update(c for c, _ in decrypt_index(obj, secrets))
    lost = 0
    for p in (store / "sessions").iterdir():
        lease = parse_lease(p.read_bytes()) if not p.name.startswith(".") else None
        cp = lease[0].get("checkpoint") if lease is not None else None
        if cp and lease is not None and lease[1] == f"clients/{b3(put.certificate)}":
            chunks = read_set(cp["chunkset"], lambda n: (store / n).read_bytes(), secrets)
            lost += sum(1 for c in chunks if c not in indexed)
    return lost


def _kill_after_checkpoint(
    repo: Repo,
    src: Path,
    min_files: int = 1,
    env: dict[str, str] | None = None,
    snapshots: int = 0,
    paced: bool | None = None,
) -> None:
    """Run a backup (as ``env``, default the repository's client) with checkpoints every 0.2 s
    and SIGKILL it once a checkpoint covers ``min_files`` files (a checkpoint rides on a lease
    refresh). ``snapshots``: how many the repository holds before. ``paced``: see
    helpers.kill_run_when; by default a run waited for its first checkpoint (``min_files`` 0
    or 1) is paced (unpaced, a fast machine finished the small runs of these tests before any:
    CI of `7be1b4e`, test_replay), one that must go on until a checkpoint covers more is not: a
    paced checkpoint spans the run's holds, and the run spaces the next one by four times what
    the last took (backup/checkpoint.py), so few more came before it ended (CI of `ca625ec`)."""
    if paced is None:
        paced = min_files <= 1
    ended, stderr = kill_run_when(
        "backup",
        "--repo",
        repo.path,
        "--no-progress",
        "--checkpoint-interval",
        "0.2s",
        src,
        env=env or repo.env,
        reached=lambda: _checkpointed(repo) >= min_files,
        paced=paced,
    )
    assert len(repo.objects("snapshots")) == snapshots, (
        f"the backup finished (exit {ended}) before it could be killed: {stderr}"
    )
    assert _checkpointed(repo) >= min_files
    key = Path(env["BUNKER_PUT_KEY"]) if env and "BUNKER_PUT_KEY" in env else repo.put_key
    assert unindexed_checkpoint_chunks(repo.path, key) == 0


def test_killed_backup_becomes_an_incomplete_snapshot(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    _kill_after_checkpoint(repo, src)

    doc = repo.backup(src)
    (ev,) = [e for e in doc["events"] if e["code"] == "incomplete-snapshot"]
    assert "incomplete snapshot #1" in ev["message"]
    assert doc["seq"] == 2 and doc["level"] == "note"
    # what the killed run finished is not read again
    assert doc["stats"]["files_unchanged"] > 0
    assert repo.objects("sessions") == []

    snaps = {s["seq"]: s for s in js(repo.ok("snapshots", "--json"))["snapshots"]}
    assert snaps[1]["complete"] is False and snaps[2]["complete"] is True
    target = tmp_path / "t"
    rdoc = js(repo.ok("restore", snaps[1]["id"], "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    restored = restored_path(target, src)
    got = [p for p in restored.rglob("*.bin")]
    assert 0 < len(got) < 60
    for p in got:
        assert p.read_bytes() == (src / p.relative_to(restored)).read_bytes(), p
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True
    target2 = tmp_path / "t2"
    js(repo.ok("restore", "latest", "--target", target2, "--json"))
    assert len(list(restored_path(target2, src).rglob("*.bin"))) == 60


def test_checkpoints_can_be_turned_off(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, dirs=1, files=2, size=1 << 20)
    doc = repo.backup(src, args=("--checkpoint-interval", "0"))
    assert doc["level"] in ("ok", "note")


def test_large_file_resumes_from_its_stored_chunks(repo: Repo, tmp_path: Path) -> None:
    """A run killed in the middle of a large file: the next run does not read the stored part
    again (bytes_resumed), and the file restores byte-identical."""
    src = tmp_path / "src"
    src.mkdir()
    big = src / "disk.img"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(8 << 20))  # 384 MiB
    _kill_after_checkpoint(repo, src, min_files=0)
    doc = repo.backup(src)
    assert doc["stats"]["bytes_resumed"] > 0
    assert doc["stats"]["bytes_resumed"] < big.stat().st_size
    target = tmp_path / "t"
    js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert (restored_path(target, src) / "disk.img").read_bytes() == big.read_bytes()
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_checkpoints_go_on_while_a_long_file_holds_the_walk(repo: Repo, tmp_path: Path) -> None:
    """A huge file first, more files after it: the walk waits for room while the huge file is
    read, and must still refresh its lease and write checkpoints meanwhile (before, it sat
    blocked until the file was done: a file that takes an hour let the lease expire)."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a-huge.img", "wb") as f:
        for _ in range(48):
            f.write(os.urandom(8 << 20))  # 384 MiB: more than the bytes allowed in flight
    for i in range(5):
        (src / f"b{i}.bin").write_bytes(os.urandom(1 << 20))
    _kill_after_checkpoint(repo, src, min_files=0)
    doc = repo.backup(src)
    assert any(e["code"] == "incomplete-snapshot" for e in doc["events"])
    assert doc["stats"]["bytes_resumed"] > 0
