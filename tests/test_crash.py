"""Crash test (issue 5): backups, prunes and forwards killed with SIGKILL at random moments, for
as many iterations as a fixed time budget allows (BUNKER_CRASH_SECONDS, default 120; the random
choices follow BUNKER_CRASH_SEED, default 1). Then: the repository checks clean with --read-data,
every complete snapshot restores byte-identical to the tree it was taken of, every incomplete one
(a killed run's checkpoint, made a snapshot by a later run or adopted by a prune) holds only files
identical to what that killed run read, and nothing left behind (leases, temp files, condemnation
records) blocks the next runs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bunker.repo.moves import parse_move_record
from bunker.repo.objects import MAGIC_MOVED
from helpers import BUNKER, Repo, expect_rc, init_repo, js, make_env, make_tree, restored_path, snapshot_tree

BUDGET = float(os.environ.get("BUNKER_CRASH_SECONDS", "120"))
Tree = dict[bytes, tuple[object, ...]]


@dataclass
class BackupRun:
    start: float  # time.time() before the process started
    end: float  # ... and after it exited or was killed
    state: Tree = field(repr=False)  # the source tree it read (unchanged while a backup runs)
    killed: bool
    how: str  # "backup" (may be killed), "offline" (spooled, never killed), "final"

    def covers(self, t: float) -> bool:
        return self.start <= t <= self.end


class Lab:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.repo: Repo = init_repo(tmp_path / "owner")
        self.src = tmp_path / "src"
        make_tree(self.src, seed=7)
        self.rng = random.Random(int(os.environ.get("BUNKER_CRASH_SEED", "1")))
        self.prune_key = tmp_path / "pruner.put"
        self.repo.ok("key", "new-client", "pruner", "--prune", "--out", self.prune_key)
        # the pruner is another machine: its own state (the chain of checkpoints it adopts) is not here
        self.prune_env = make_env(tmp_path / "pruner-home")
        # Every backup run, in order (they never overlap): when it ran, the tree it read, whether it
        # was killed. A snapshot's signed time is when its run committed it, or wrote the checkpoint
        # it was made from, so it names that run exactly, whoever turned the checkpoint into a
        # snapshot and when: the next run, a later one (an offline run in between cannot see the
        # lease; a run killed before it adopted anything leaves it too), or a prune. Guessing the
        # run from sequence numbers mapped such snapshots to the wrong tree.
        self.backups: list[BackupRun] = []
        self.kills = {"backup": 0, "prune": 0, "forward": 0}
        self.runs = {"backup": 0, "prune": 0, "forward": 0}

    # ------------------------------------------------------------------ helpers
    def head_seq(self) -> int:
        root = Path(self.repo.env["XDG_DATA_HOME"]) / "bunker" / "state"
        seqs = [json.loads(p.read_text())["seq"] for p in root.rglob("chain.json")]
        return max(seqs, default=0)

    def mutate(self) -> None:
        r = self.rng
        (self.src / f"f-{r.randrange(1 << 30)}.bin").write_bytes(r.randbytes(r.randrange(1, 200_000)))
        if r.random() < 0.4:  # a big file that changes now and then: runs long enough to be killed
            (self.src / "big.bin").write_bytes(r.randbytes(r.choice((8, 64, 160)) << 20))
        files = [p for p in self.src.iterdir() if p.name.startswith("f-")]
        if len(files) > 6:
            r.choice(files).unlink()

    def start(self, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        assert BUNKER, "the bunker console script is not installed (pip install -e .)"
        return subprocess.Popen(
            [BUNKER, *(os.fspath(a) for a in args)],
            env=env or self.repo.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the kill takes its worker processes too
        )

    def run_or_kill(self, kind: str, proc: subprocess.Popen[bytes], within: float, earliest: float = 0.0) -> bool:
        """Let the process run for a random time, then kill it (with its workers); True if killed."""
        self.runs[kind] += 1
        try:
            proc.wait(self.rng.uniform(earliest, within))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.kills[kind] += 1
            return True
        return False

    def age_leases(self) -> None:
        """Time passes: every lease (all sessions are dead between steps) looks an hour old."""
        t = time.time() - 3600
        for p in (self.repo.path / "sessions").iterdir():
            os.utime(p, (t, t))

    # ------------------------------------------------------------------ steps
    def backup(self) -> None:
        self.mutate()
        state = snapshot_tree(self.src, dir_mtimes=False)
        args = ("backup", "--repo", self.repo.path, "--no-progress", "--checkpoint-interval", "0.1s", self.src)
        t0 = time.time()
        killed = self.run_or_kill("backup", self.start(*args), 1.2, earliest=0.3)
        self.backups.append(BackupRun(t0, time.time(), state, killed, "backup"))

    def run_of(self, snap: dict[str, Any]) -> BackupRun:
        """The backup run a snapshot (or the checkpoint it was made from) was written by."""
        runs = [r for r in self.backups if r.covers(snap["time"])]
        assert len(runs) == 1, (snap, runs)
        return runs[0]

    def prune(self) -> None:
        proc = self.start(
            "prune", "--repo", self.repo.path, "--put-key", self.prune_key, "--grace", "0s", env=self.prune_env
        )
        self.run_or_kill("prune", proc, 0.8)

    def offline_then_forward(self) -> None:
        self.mutate()
        state = snapshot_tree(self.src, dir_mtimes=False)
        away = self.tmp / "away"
        self.repo.path.rename(away)
        try:
            t0 = time.time()
            doc = self.repo.backup(self.src, args=("--no-progress",))
            self.backups.append(BackupRun(t0, time.time(), state, False, "offline"))
            assert doc["spooled"], doc
        finally:
            away.rename(self.repo.path)
        self.run_or_kill("forward", self.start("forward", "--repo", self.repo.path), 2.0)


@pytest.mark.slow
def test_kill_backups_prunes_and_forwards_at_random(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    repo = lab.repo
    deadline = time.monotonic() + BUDGET
    steps = 0
    while time.monotonic() < deadline:
        x = lab.rng.random()
        if x < 0.5:
            lab.backup()
        elif x < 0.8:
            lab.prune()
        elif lab.head_seq() > 0:  # offline needs a run that reached the repository (it seeds the spool)
            lab.offline_then_forward()
        else:
            lab.backup()
        if lab.rng.random() < 0.15:
            lab.age_leases()
        steps += 1

    # afterwards: what waits in the spool arrives, a backup runs, garbage goes
    fwd = js(repo.ok("forward", "--json", rc=(0, 3)))
    assert fwd["left"] == 0 and fwd["held"] == [], fwd
    lab.backup()  # may itself be killed: one more unkilled run below
    state = snapshot_tree(lab.src, dir_mtimes=False)
    t0 = time.time()
    repo.backup(lab.src)
    lab.backups.append(BackupRun(t0, time.time(), state, False, "final"))
    lab.age_leases()
    # (without new repacks: these two finish what the loop's prunes condemned and repacked)
    for _ in range(2):
        args = ("prune", "--put-key", lab.prune_key, "--grace", "0s", "--repack-threshold", "0", "--json")
        doc = js(repo.ok(*args, env=lab.prune_env))
        assert doc["waiting"] == [], doc
    # nothing left that blocks anything: no lease, no condemnation record, no pack waiting for
    # deletion; move records of repacks stay while snapshots name the packs they replaced (they
    # only say where those packs' blobs went); temp files of killed writes are invisible to
    # readers and swept by the next command once an hour old
    objects = [p for d in ("gc", "sessions") for p in (repo.path / d).iterdir() if not p.name.startswith(".")]
    moved = [p for p in objects if p.read_bytes()[:4] == MAGIC_MOVED]
    assert [p for p in objects if p not in moved] == []
    for p in moved:
        assert not any((repo.path / "packs" / old).exists() for old in parse_move_record(p.read_bytes()))
    temps = [p for p in repo.path.rglob(".tmp-*")]
    for p in temps:
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    repo.ok("snapshots")
    assert list(repo.path.rglob(".tmp-*")) == []

    check = js(repo.ok("check", "--read-data", "--json"))
    assert check["ok"] is True, check
    snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
    restored = 0
    partial = 0
    adopted = 0
    committed: set[int] = set()  # the runs that committed a complete snapshot
    for s in snaps:
        run = lab.run_of(s)
        target = tmp_path / "restore" / s["id"]
        doc = js(expect_rc(repo.run("restore", s["id"], "--target", target, "--json"), 0))
        assert doc["stats"]["failed"] == 0, (s, doc)
        got = snapshot_tree(restored_path(target, lab.src), dir_mtimes=False) if target.exists() else {}
        shutil.rmtree(target, ignore_errors=True)  # compared: each restore is the whole tree (17 GB in all)
        if s["complete"]:
            assert not s.get("adopted") and id(run) not in committed, (s, run)
            committed.add(id(run))
            assert got == run.state, s
            restored += 1
            continue
        # made from a killed run's checkpoint (by the client's next run, or adopted by a prune
        # into the pruner's chain): every file it holds is the file that killed run read
        assert run.killed, (s, run)
        differ = {k: (run.state.get(k), v) for k, v in got.items() if k and v[0] == "f" and run.state.get(k) != v}
        assert not differ, (s, f"path: (read by the killed run, restored): {differ}")
        if s.get("adopted"):
            assert s["client"] == repo.client, s
            adopted += 1
        else:
            partial += 1
    print(
        f"crash test: {steps} steps in {BUDGET:.0f} s; runs {lab.runs}; killed {lab.kills}; "
        f"{len(snaps)} snapshots ({sum(not s['complete'] for s in snaps)} incomplete), {restored} complete ones "
        f"restored byte-identical, {partial} incomplete ones (from killed runs' checkpoints) restored what they cover, "
        f"{adopted} adopted by prune restored what they cover"
    )
    assert sum(lab.kills.values()) >= 10 and restored >= 3
