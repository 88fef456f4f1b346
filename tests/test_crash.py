"""Crash test (issues 5 and 11): backups, prunes and forwards killed with SIGKILL or SIGTERM at
random moments, for as many steps as a fixed time budget allows (BUNKER_CRASH_SECONDS, default
80; the random choices follow BUNKER_CRASH_SEED, default 1). Besides single runs, a step may run
two backups of the client at once (from this machine, or from a second data directory with the
same put key, as a second machine would), deliver the spool with two forwards at once or with a
forward beside a backup, or delete this machine's state directory or roll it back to an old copy
between runs.

With the repository on a small disk of its own (root only), a step may fill that disk, run a
backup (now and then a prune) against it and free it again.

After every step: no process of the step is left; the client's chain has no fork (one snapshot
per sequence number, each linking to the one before); no run that ended by itself (not killed,
or stopped by a signal it handles) left a lease or claim; `check` is clean.
At the end: the repository checks clean with --read-data, every complete snapshot restores
byte-identical to the tree it was taken of, every incomplete one (a killed run's checkpoint, made
a snapshot by a later run or adopted by a prune, or written by a run stopped with SIGTERM) holds
only files identical to what that killed run read, and nothing left behind (leases, claims, temp
files, condemnation records) blocks the next runs."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from bunker.repo.moves import parse_move_record
from bunker.repo.objects import MAGIC_MOVED
from bunker.repo.snapshot import parse_snapshot
from helpers import BUNKER, Repo, describe, init_repo, js, loop_ext4, make_env, make_tree, restored_path, snapshot_tree

BUDGET = float(os.environ.get("BUNKER_CRASH_SECONDS", "80"))
# the disk of the full-disk variant: room for what the repository grows to (snapshots are never
# forgotten here) until the test fills it
DISK_SIZE = (4 << 30) + int(BUDGET / 2) * (40 << 20)
STOP_WAIT = 120.0  # for a run to end after SIGTERM (generous: never a measure of speed)
LEFTOVER_WAIT = 30.0  # for the processes of a killed run to go (generous: never a measure of speed)
CHECK_EVERY = 1  # steps between checks of the whole repository while the test runs (about 0.5 s each)
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
    def __init__(self, tmp_path: Path, disk: Path | None = None) -> None:
        self.tmp = tmp_path
        self.disk = disk  # a filesystem of its own that holds the repository, filled now and then
        if disk is None:
            self.repo: Repo = init_repo(tmp_path / "owner")
        else:
            self.repo = dataclasses.replace(
                init_repo(tmp_path / "owner", url=str(disk / "repo")), path=disk / "repo", url=""
            )
        self.src = tmp_path / "src"
        make_tree(self.src, seed=7)
        self.rng = random.Random(int(os.environ.get("BUNKER_CRASH_SEED", "1")))
        self.prune_key = tmp_path / "pruner.put"
        self.repo.ok("key", "new-client", "pruner", "--prune", "--out", self.prune_key)
        # the pruner is another machine: its own state (the chain of checkpoints it adopts) is not here
        self.prune_env = make_env(tmp_path / "pruner-home")
        # a second machine backing up with the same put key: its own state, cache and lock
        self.twin_env = make_env(tmp_path / "twin-home", BUNKER_PUT_KEY=str(self.repo.put_key))
        # Every backup run, in order: when it ran, the tree it read, whether it was killed. A
        # snapshot's signed time is when its run committed it, or wrote the checkpoint it was
        # made from, so it names that run, whoever turned the checkpoint into a snapshot and
        # when: the next run, a later one, or a prune. Runs that overlap read the same tree.
        self.backups: list[BackupRun] = []
        self.kills = {"backup": 0, "prune": 0, "forward": 0}
        self.terms = 0  # of the kills, how many were SIGTERM
        self.runs = {"backup": 0, "prune": 0, "forward": 0, "overlapping": 0, "side-by-side": 0}
        self.state_events = {"deleted": 0, "rolled back": 0}
        self.died = 0  # runs ended by a signal they did not handle (they may leave a lease behind)
        self.full = Counter[str]()  # how the runs on a full repository disk ended
        self.saved_state: Path | None = None
        self.variant = ""  # how the last offline backup was delivered
        self.started = 0  # processes started (their logs are numbered)

    # ------------------------------------------------------------------ helpers
    @property
    def state_root(self) -> Path:
        return Path(self.repo.env["XDG_DATA_HOME"]) / "bunker" / "state"

    def state_files(self) -> dict[str, str]:
        """This machine's state files (chain heads, status numbers) by path: named when a check fails."""
        return {
            str(p.relative_to(self.state_root)): p.read_text(errors="replace")
            for p in sorted(self.state_root.rglob("*.json"))
        }

    def seeded(self) -> bool:
        """A run reached the repository from this machine: its spool can take an offline backup."""
        spool = Path(self.repo.env["XDG_DATA_HOME"]) / "bunker" / "spool"
        return any(d.is_dir() and any((d / "config").glob("[0-9a-f]*")) for d in spool.glob("*"))

    def spooled(self) -> bool:
        """Backups of this machine wait in its spool."""
        spool = Path(self.repo.env["XDG_DATA_HOME"]) / "bunker" / "spool"
        return any(any((d / "snapshots").glob("[0-9a-f]*")) for d in spool.glob("*") if d.is_dir())

    def mutate(self) -> None:
        r = self.rng
        (self.src / f"f-{r.randrange(1 << 30)}.bin").write_bytes(r.randbytes(r.randrange(1, 200_000)))
        if r.random() < 0.4:  # a big file that changes now and then: runs long enough to be killed
            (self.src / "big.bin").write_bytes(r.randbytes(r.choice((8, 64, 160)) << 20))
        files = [p for p in self.src.iterdir() if p.name.startswith("f-")]
        if len(files) > 6:
            r.choice(files).unlink()

    def start(
        self, *args: str | os.PathLike[str], env: dict[str, str] | None = None, stderr: IO[bytes] | None = None
    ) -> subprocess.Popen[bytes]:
        assert BUNKER, "the bunker console script is not installed (pip install -e .)"
        # each run's messages in a file of its own: what led to a failure can be read afterwards
        # (a failing test's directory stays)
        self.started += 1
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{self.started:04d}-{os.fspath(args[0])}.txt", "wb") as log:
            log.write(" ".join(os.fspath(a) for a in args).encode() + b"\n")
            log.flush()
            return subprocess.Popen(
                [BUNKER, *(os.fspath(a) for a in args)],
                env=env or self.repo.env,
                stdout=log,
                stderr=stderr or log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: what is left of it can be found
            )

    def keep_repository(self) -> Path:
        """A copy of the repository in the test's directory (which a failing test leaves), when
        it lives on the full-disk variant's own disk (unmounted at the end)."""
        if self.disk is None:
            return self.repo.path
        copy = self.tmp / "repo-at-failure"
        shutil.copytree(self.repo.path, copy, symlinks=True, dirs_exist_ok=True)
        return copy

    def run_or_kill(
        self, kind: str, procs: list[subprocess.Popen[bytes]], within: float, earliest: float = 0.0
    ) -> list[bool]:
        """Let the processes run, each for its own random time, then kill those still running:
        SIGKILL to the whole process group (kill -9, power loss), or SIGTERM to the process
        (`kill PID`, a service stopped). Returns which were killed."""
        self.runs[kind] += len(procs)
        deadlines = [time.monotonic() + self.rng.uniform(earliest, within) for _ in procs]
        return self._stop(procs, [kind] * len(procs), deadlines)

    def _stop(self, procs: list[subprocess.Popen[bytes]], kinds: list[str], deadlines: list[float]) -> list[bool]:
        """Wait for each process until its deadline, then kill it; returns which were killed."""
        how = [signal.SIGTERM if self.rng.random() < 0.35 else signal.SIGKILL for _ in procs]
        killed = [False] * len(procs)
        for i in sorted(range(len(procs)), key=lambda i: deadlines[i]):
            try:
                procs[i].wait(max(0.0, deadlines[i] - time.monotonic()))
                continue
            except subprocess.TimeoutExpired:
                pass
            if how[i] == signal.SIGKILL:
                os.killpg(procs[i].pid, signal.SIGKILL)
            else:
                os.kill(procs[i].pid, signal.SIGTERM)
                self.terms += 1
            killed[i] = True
            self.kills[kinds[i]] += 1
        for p in procs:
            try:
                p.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                raise AssertionError(f"{p.args} did not end within {STOP_WAIT:.0f} s of its SIGTERM") from None
        for p in procs:
            self.nothing_left(p)
        # (a run that handles SIGTERM and exits 143 ends as it should: it leaves no lease)
        self.died += sum(p.returncode < 0 for p in procs)
        return killed

    def nothing_left(self, proc: subprocess.Popen[bytes]) -> None:
        """No process of ``proc``'s group outlives it (a worker pool, a forkserver)."""
        deadline = time.monotonic() + LEFTOVER_WAIT
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                left = subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)], capture_output=True, text=True)
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"processes of {proc.args} outlived it:\n{left.stdout}")
            time.sleep(0.1)

    def leases(self) -> set[str]:
        """The leases and claims in the repository."""
        return {p.name for p in (self.repo.path / "sessions").iterdir() if not p.name.startswith(".")}

    def age_leases(self) -> None:
        """Time passes: every lease and claim (all sessions are dead between steps) looks an hour old."""
        t = time.time() - 3600
        for p in (self.repo.path / "sessions").iterdir():
            os.utime(p, (t, t))

    def chain_is_whole(self) -> None:
        """One snapshot per sequence number of each client, each linking to the one before."""
        chains: dict[str, dict[int, tuple[str, str]]] = {}
        for p in self.repo.objects("snapshots"):
            env = parse_snapshot(p.read_bytes()).env
            chain = chains.setdefault(env.cert, {})
            assert env.seq not in chain, f"fork: two snapshots #{env.seq}: {chain[env.seq][0]} and {p.name}"
            chain[env.seq] = (f"snapshots/{p.name}", env.prev)
        for cert, chain in chains.items():
            assert sorted(chain) == list(range(1, len(chain) + 1)), (cert, sorted(chain))
            for seq, (_name, prev) in chain.items():
                assert prev == (chain[seq - 1][0] if seq > 1 else ""), (cert, seq)

    # ------------------------------------------------------------------ steps
    def backup_args(self) -> tuple[str | os.PathLike[str], ...]:
        return ("backup", "--repo", self.repo.path, "--no-progress", "--checkpoint-interval", "0.1s", self.src)

    def backup(self) -> None:
        self.mutate()
        state = snapshot_tree(self.src, dir_mtimes=False)
        t0 = time.time()
        (killed,) = self.run_or_kill("backup", [self.start(*self.backup_args())], 1.2, earliest=0.3)
        self.backups.append(BackupRun(t0, time.time(), state, killed, "backup"))

    def overlapping_backups(self) -> None:
        """Two backups of the client at once: a cron run beside a manual one, or two machines."""
        self.mutate()
        state = snapshot_tree(self.src, dir_mtimes=False)
        envs = [self.repo.env, self.twin_env if self.rng.random() < 0.5 else self.repo.env]
        t0 = time.time()
        procs = [self.start(*self.backup_args(), env=e) for e in envs]
        self.runs["overlapping"] += 1
        killed = self.run_or_kill("backup", procs, 2.5, earliest=0.3)
        t1 = time.time()
        self.backups += [BackupRun(t0, t1, state, k, "backup") for k in killed]

    def prune(self) -> None:
        proc = self.start(
            "prune", "--repo", self.repo.path, "--put-key", self.prune_key, "--grace", "0s", env=self.prune_env
        )
        self.run_or_kill("prune", [proc], 0.8)

    def offline_then_deliver(self) -> None:
        """A backup while the repository is away, then its delivery: a forward alone, two
        forwards at once, or a forward beside a backup (which forwards first too)."""
        self.mutate()
        state = snapshot_tree(self.src, dir_mtimes=False)
        away = self.repo.path.parent / "away"  # (on the repository's own disk)
        self.repo.path.rename(away)
        try:
            t0 = time.time()
            doc = self.repo.backup(self.src, args=("--no-progress",))
            self.backups.append(BackupRun(t0, time.time(), state, False, "offline"))
            assert doc["spooled"], doc
        finally:
            away.rename(self.repo.path)
        forward = ("forward", "--repo", self.repo.path)
        x = self.rng.random()
        self.variant = "alone" if x < 0.5 else "two forwards" if x < 0.75 else "beside a backup"
        if x < 0.5:
            self.run_or_kill("forward", [self.start(*forward)], 2.0)
        elif x < 0.75:
            self.runs["side-by-side"] += 1
            self.run_or_kill("forward", [self.start(*forward), self.start(*forward)], 3.0)
        else:
            self.runs["side-by-side"] += 1
            self.mutate()  # the backup beside the forward reads a tree of its own
            state = snapshot_tree(self.src, dir_mtimes=False)
            t0 = time.time()
            procs = [self.start(*forward), self.start(*self.backup_args())]
            self.runs["forward"] += 1
            self.runs["backup"] += 1
            end = time.monotonic() + self.rng.uniform(0.5, 4.0)
            killed = self._stop(procs, ["forward", "backup"], [end, end])
            self.backups.append(BackupRun(t0, time.time(), state, killed[1], "backup"))

    def state_chaos(self) -> None:
        """This machine's state directory: deleted (the guide says it may be), or put back from
        an old copy (a restored home directory); now and then a copy is kept for that."""
        fresh = False
        if self.state_root.exists() and (self.saved_state is None or self.rng.random() < 0.25):
            self.saved_state = self.tmp / "saved-state"
            shutil.rmtree(self.saved_state, ignore_errors=True)
            shutil.copytree(self.state_root, self.saved_state)
            fresh = True
        shutil.rmtree(self.state_root, ignore_errors=True)
        if self.saved_state is not None and not fresh and self.rng.random() < 0.6:
            shutil.copytree(self.saved_state, self.state_root)
            self.state_events["rolled back"] += 1
        else:
            self.state_events["deleted"] += 1

    def full_disk(self) -> None:
        """The repository's disk fills up (another program's file takes all but a little of
        it): a backup runs against it, now and then a prune too; then the file is deleted."""
        assert self.disk is not None
        filler = self.disk / "filler"
        leave = self.rng.choice((0, 256 << 10, 2 << 20, 8 << 20))
        with open(filler, "wb") as f:
            for step in (64 << 20, 1 << 20, 4096):  # finer and finer: the extents take room too
                while shutil.disk_usage(self.disk).free - step >= leave:
                    try:
                        os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, step)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        try:
            self.mutate()
            state = snapshot_tree(self.src, dir_mtimes=False)
            with tempfile.TemporaryFile() as err:
                t0 = time.time()
                proc = self.start(*self.backup_args(), stderr=err)
                (killed,) = self.run_or_kill("backup", [proc], 3.0, earliest=0.5)
                self.full_ended("backup", proc, killed, err)
            # a run that stopped on the full disk read the tree too: a checkpoint of it may
            # become an incomplete snapshot
            self.backups.append(BackupRun(t0, time.time(), state, killed or proc.returncode != 0, "backup"))
            if self.rng.random() < 0.3:
                args = ("prune", "--repo", self.repo.path, "--put-key", self.prune_key, "--grace", "0s")
                with tempfile.TemporaryFile() as err:
                    proc = self.start(*args, env=self.prune_env, stderr=err)
                    (killed,) = self.run_or_kill("prune", [proc], 2.0)
                    self.full_ended("prune", proc, killed, err)
        finally:
            filler.unlink()

    def full_ended(self, kind: str, proc: subprocess.Popen[bytes], killed: bool, err: IO[bytes]) -> None:
        """A run on the full disk that was not killed ended with a message and an exit code
        (ok if it fitted, fatal if not), never a traceback."""
        if killed:
            self.full[f"{kind} killed"] += 1
            return
        err.seek(0)
        text = err.read().decode(errors="replace")
        assert "Traceback" not in text and proc.returncode in (0, 1, 3, 4), (kind, proc.returncode, text)
        self.full[f"{kind} exit {proc.returncode}"] += 1

    def runs_of(self, snap: dict[str, Any]) -> list[BackupRun]:
        """The backup runs a snapshot (or the checkpoint it was made from) may come from: one,
        or runs that overlapped and read the same tree."""
        runs = [r for r in self.backups if r.covers(snap["time"])]
        assert runs, snap
        assert all(r.state == runs[0].state for r in runs), (snap, runs)
        return runs


@pytest.fixture
def disk(request: pytest.FixtureRequest) -> Iterator[Path | None]:
    """For the full-disk variant: a small ext4 filesystem of its own (loop-mounted, no blocks
    reserved for root) to hold the repository; None for the plain one."""
    if not request.param:
        yield None
        return
    with loop_ext4(DISK_SIZE, "bunker-crash-disk-", "a repository disk that fills is tested as root") as mnt:
        yield mnt


@pytest.mark.slow
@pytest.mark.parametrize("disk", [False, True], ids=["plain", "full-disk"], indirect=True)
def test_kill_backups_prunes_and_forwards_at_random(tmp_path: Path, disk: Path | None) -> None:
    """The plain variant for the whole budget; the full-disk variant (the repository on a small
    disk of its own that fills and is freed now and then) for half of it."""
    lab = Lab(tmp_path, disk)
    repo = lab.repo
    budget = BUDGET if disk is None else BUDGET / 2
    deadline = time.monotonic() + budget
    # a run that finishes before its random deadline is not killed: on a busy machine (fewer
    # steps) or with faster runs the budget may see too few kills, so it stretches by half
    # until it has them
    min_kills = 10 if disk is None else 3
    stretched = deadline + budget / 2
    steps = 0
    actions: list[str] = []  # what each step did (named when a check fails)
    while time.monotonic() < deadline or (sum(lab.kills.values()) < min_kills and time.monotonic() < stretched):
        leases, died = lab.leases(), lab.died
        x = lab.rng.random()
        if disk is not None and (x < 0.2 or steps == 3):  # (at least one fill however short the run)
            step = lab.full_disk
        elif x < 0.32:
            step = lab.backup
        elif x < 0.44:
            step = lab.overlapping_backups
        elif x < 0.68:
            step = lab.prune
        elif x < 0.9 and lab.seeded():  # offline needs a run that reached the repository (it seeds the spool)
            step = lab.offline_then_deliver
        elif x >= 0.9:
            step = lab.state_chaos
        else:
            step = lab.backup
        kills = sum(lab.kills.values())
        step()
        variant = f" {lab.variant}" if step == lab.offline_then_deliver else ""
        actions.append(f"{step.__name__}{variant}{' (killed)' if sum(lab.kills.values()) > kills else ''}")
        if lab.died == died:  # every run of the step ended by itself: none left a lease or claim
            assert lab.leases() <= leases, f"step {steps} left {sorted(lab.leases() - leases)}; steps: {actions}"
        if lab.rng.random() < 0.15:
            lab.age_leases()
        steps += 1
        lab.chain_is_whole()
        if steps % CHECK_EVERY == 0 and not lab.spooled():
            # (a backup waiting in the spool is this machine's newest: the repository lacks it
            # until it is forwarded)
            check = js(repo.ok("check", "--json", rc=(0, 14)))
            errors = [p for p in check["problems"] if p["severity"] == "err"]  # (warnings would hide them)
            # a text, not a tuple: pytest shortens a tuple's repr, and the problem's text is the point
            assert check["ok"] is True, "\n".join(
                [
                    f"check after step {steps} found:",
                    *(f"  {p.get('object')}: {p.get('problem')} ({p.get('cause')})" for p in errors),
                    f"steps: {actions}",
                    f"state files: {lab.state_files()}",
                    f"kept: {tmp_path / 'logs'}, {lab.keep_repository()}",
                ]
            )

    # afterwards: time passes (a run killed while it held a claim no longer holds it), what
    # waits in the spool arrives, a backup runs, garbage goes
    lab.age_leases()
    fwd = js(repo.ok("forward", "--json", rc=(0, 3)))
    assert fwd["left"] == 0 and fwd["held"] == [], fwd
    lab.backup()  # may itself be killed: one more unkilled run below
    state = snapshot_tree(lab.src, dir_mtimes=False)
    t0 = time.time()
    repo.backup(lab.src)
    lab.backups.append(BackupRun(t0, time.time(), state, False, "final"))
    lab.chain_is_whole()
    lab.age_leases()
    # (without new repacks: these two finish what the loop's prunes condemned and repacked)
    docs = []
    for _ in range(2):
        args = ("prune", "--put-key", lab.prune_key, "--grace", "0s", "--repack-threshold", "0", "--json")
        doc = js(repo.ok(*args, env=lab.prune_env))
        docs.append(doc)
        assert doc["waiting"] == [], doc
    # nothing left that blocks anything: no lease or claim, no condemnation record, no pack
    # waiting for deletion; move records of repacks stay while snapshots name the packs they
    # replaced (they only say where those packs' blobs went); temp files of killed writes are
    # invisible to readers and swept by the next command once an hour old
    objects = [p for d in ("gc", "sessions") for p in (repo.path / d).iterdir() if not p.name.startswith(".")]
    moved = [p for p in objects if p.read_bytes()[:4] == MAGIC_MOVED]
    assert [p for p in objects if p not in moved] == [], docs
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
    vanished = 0  # offline snapshots that lost chunks to a prune before delivery
    committed: set[int] = set()  # the runs that committed a complete snapshot
    for s in snaps:
        runs = lab.runs_of(s)
        target = tmp_path / "restore" / s["id"]
        cp = repo.run("restore", s["id"], "--target", target, "--json")
        # an offline snapshot whose dedup base a prune deleted before it was delivered, with a
        # source file changed since, says so in its record (chunks_lost, level err): its
        # restore leaves holes in those files and exits 3 (docs/format.md, section 15)
        lost = s["stats"].get("chunks_lost", 0)
        if cp.returncode != 0 and not (lost and cp.returncode == 3):
            # (rare: what the snapshot's record says, the steps that led to it, where the runs'
            # messages and the repository are kept)
            kept = lab.keep_repository()
            raise AssertionError(
                f"{describe(cp)}\n--- snapshot\n{s}\n--- steps\n{actions}\n--- kept\n{tmp_path / 'logs'}, {kept}"
            )
        doc = js(cp)
        root = restored_path(target, lab.src)
        damaged = {
            os.fsencode(os.path.relpath(e["path"], root)) for e in doc["events"] if e.get("code") == "file-damaged"
        }
        assert doc["stats"]["failed"] == len(damaged) and bool(damaged) == bool(lost), (s, doc)
        got = snapshot_tree(root, dir_mtimes=False) if target.exists() else {}
        shutil.rmtree(target, ignore_errors=True)  # compared: each restore is the whole tree (17 GB in all)
        if lost:
            # only a spooled run's snapshot loses chunks; every file but the damaged ones is whole
            assert not s["complete"] and all(r.how == "offline" for r in runs), (s, runs)
            differ = {k for k, v in got.items() if k and v[0] == "f" and runs[0].state.get(k) != v}
            assert differ <= damaged and damaged <= set(runs[0].state), (s, differ, damaged)
            vanished += 1
            continue
        if s["complete"]:
            # one complete snapshot per run (of runs that overlapped, any one of them)
            free = [r for r in runs if id(r) not in committed]
            assert not s.get("adopted") and free, (s, runs)
            committed.add(id(free[0]))
            assert got == runs[0].state, s
            restored += 1
            continue
        # made from a killed run's checkpoint (by the client's next run, adopted by a prune into
        # the pruner's chain, or written by the run itself when stopped): every file it holds is
        # the file that killed run read
        assert any(r.killed for r in runs), (s, runs)
        run = runs[0]
        differ = {k: (run.state.get(k), v) for k, v in got.items() if k and v[0] == "f" and run.state.get(k) != v}
        assert not differ, (s, f"path: (read by the killed run, restored): {differ}")
        if s.get("adopted"):
            assert s["client"] == repo.client, s
            adopted += 1
        else:
            partial += 1
    print(
        f"crash test: {steps} steps in {budget:.0f} s; runs {lab.runs}; killed {lab.kills} ({lab.terms} with SIGTERM); "
        f"state directory {lab.state_events}; full disk {dict(lab.full) if disk else 'not used'}; "
        f"{len(snaps)} snapshots ({sum(not s['complete'] for s in snaps)} "
        f"incomplete), {restored} complete ones restored byte-identical, {partial} incomplete ones (from killed runs' "
        f"checkpoints) restored what they cover, {adopted} adopted by prune restored what they cover, "
        f"{vanished} delivered with chunks lost upstream; steps: {actions}"
    )
    # (the shorter full-disk variant kills fewer runs; it fills the disk at least once)
    assert sum(lab.kills.values()) >= min_kills and restored >= 3
    assert disk is None or lab.full
