"""Signals (issue 11, points 13, 19 and 20), with real processes and real signals.

A backup told to stop by SIGINT (Ctrl-C reaches the whole process group) or SIGTERM (systemd, a
plain `kill`) keeps what it finished as an incomplete snapshot, releases its lease, says so and
exits 130/143; its rerun reads again only what was in flight. A SIGTERM'd prune leaves no lease
that would hold back the next one. Restore and check stop with their own message. No process
outlives its command, not even after kill -9. Without a terminal a long backup prints a line
every so often (BUNKER_PROGRESS_INTERVAL shortens the 30 s for tests).

To interrupt a run at a known point, the test waits for what it can see in the repository or
the process tree (a pack stored, a lease, a worker pool started), stops the process group with
SIGSTOP, checks that the run is still at that point, and only then sends the signal and SIGCONT:
the signal lands where the test looked, however fast the machine is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from helpers import BUNKER, Repo, _descendants, init_repo, js, make_tree, restored_path
from test_checkpoint import _checkpointed
from test_prune import _age_sessions, _killed_backup, _pruner

SMALL_FILES = 1500  # more than the 1000 small files after which the worker processes start
BIG_FILES = 60
BIG_SIZE = 4 << 20


def _source(root: Path) -> int:
    """Small files first (the worker pool starts), then large ones; returns the bytes of data."""
    small, big = root / "a-small", root / "b-big"
    small.mkdir(parents=True)
    big.mkdir()
    for i in range(SMALL_FILES):
        (small / f"s{i:04}").write_bytes(os.urandom(2048))
    for i in range(BIG_FILES):
        (big / f"f{i:02}.bin").write_bytes(os.urandom(BIG_SIZE))
    return SMALL_FILES * 2048 + BIG_FILES * BIG_SIZE


def _start(repo: Repo, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [BUNKER, *(str(a) for a in args), "--repo", str(repo.path)],
        env=env or repo.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )


def _freeze_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    """SIGSTOP the process group as soon as ``ready()``; fail if the process ends first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (exit {proc.returncode}) before the test could stop it:\n{err.decode()}")
        if ready():
            os.killpg(proc.pid, signal.SIGSTOP)
            return
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the command never reached the point to interrupt it at")


def _deliver(proc: subprocess.Popen[bytes], sig: int, group: bool) -> tuple[int, str, str]:
    """Send ``sig`` to the stopped command (the whole group, as a terminal or systemd does, or
    the main process only, as `kill PID` does), let it go on, and wait for its end."""
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.decode(), err.decode()


def _running(pid: int) -> bool:
    """True while ``pid`` is a process that has not ended (a zombie nobody reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _assert_all_gone(pids: list[int]) -> None:
    """Every process of ``pids`` ends (orphans are reparented, so they are looked up by pid)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if _running(p)]
    assert not left, f"processes outlived their command: {[_cmdline(p) for p in left]}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _pool_started(proc: subprocess.Popen[bytes]) -> bool:
    return any("forkserver" in _cmdline(p) for p in _descendants(proc.pid))


def _workers_started(proc: subprocess.Popen[bytes]) -> bool:
    """Worker processes run (forked by the forkserver, they share its command line): a restore
    of a snapshot of more than 1,000 chunks starts its forkserver once the master key is derived
    and the snapshot's index read, before it writes anything."""
    return sum("forkserver" in _cmdline(p) for p in _descendants(proc.pid)) >= 2


def _pack_bytes(repo: Repo) -> int:
    total = 0
    for p in repo.objects("packs"):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigterm-group", "sigterm-main"],
)
def test_interrupted_backup_keeps_an_incomplete_snapshot(repo: Repo, tmp_path: Path, sig: int, group: bool) -> None:
    src = tmp_path / "src"
    total = _source(src)
    # checkpoints every 10 min: what is kept is the checkpoint written on the signal
    proc = _start(repo, "backup", "--checkpoint-interval", "10m", "--json", src)
    _freeze_when(proc, lambda: _pack_bytes(repo) >= total * 0.6)  # at 60 %, as a user stops a long run
    assert repo.objects("snapshots") == [], "the backup finished before it could be interrupted"
    children = _descendants(proc.pid)
    assert any("forkserver" in _cmdline(p) for p in children), "the small-file workers did not start"
    stored_before = _pack_bytes(repo)

    t0 = time.monotonic()
    rc, out, err = _deliver(proc, sig, group)
    stopped_in = time.monotonic() - t0
    assert rc == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"interrupted by {name}: what the run had finished is incomplete snapshot" in err, err
    assert "Traceback" not in err and "no snapshot was written" not in err
    doc = js(subprocess.CompletedProcess([], rc, out, err))
    assert doc["complete"] is False and doc["interrupted"] == name and doc["exit_code"] == 128 + sig
    assert any(e["code"] == "interrupted" for e in doc["events"])
    assert repo.objects("sessions") == [], "the interrupted run left its lease"
    _assert_all_gone(children)

    (snap,) = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert snap["complete"] is False and snap["id"] == doc["snapshot"]
    target = tmp_path / "t"
    js(repo.ok("restore", snap["id"], "--target", target, "--json"))
    restored = restored_path(target, src)
    got = [p for p in restored.rglob("*") if p.is_file()]
    assert 0 < len(got) < SMALL_FILES + BIG_FILES
    for p in got:
        assert p.read_bytes() == (src / p.relative_to(restored)).read_bytes(), p
    shutil.rmtree(target)

    # the rerun reads again only what was in flight, and uploads nothing twice
    kept = _pack_bytes(repo)
    again = repo.backup(src)
    stats = again["stats"]
    assert again["seq"] == 2 and stats["files_unchanged"] == len(got)
    twice = kept + stats["stored_new"] - total
    print(
        f"\n{name}: interrupted after {stored_before >> 20} of {total >> 20} MiB stored, ended {stopped_in:.2f} s "
        f"later; its snapshot holds "
        f"{len(got)} of "
        f"{SMALL_FILES + BIG_FILES} files; the repository then held {kept / 2**20:.1f} MiB; the rerun found "
        f"{stats['files_unchanged']} files unchanged and stored {stats['stored_new'] / 2**20:.1f} MiB of the "
        f"remaining {(total - kept) / 2**20:.1f} MiB: {max(twice, 0) / 2**20:.1f} MiB "
        f"({max(twice, 0) / kept:.1%} of what the interrupted run had stored) uploaded twice (pack overhead included)"
    )
    assert twice < kept * 0.05
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True


def test_second_signal_stops_at_once_and_names_the_checkpoint(repo: Repo, tmp_path: Path) -> None:
    """A second signal while the first is acted on stops the run at once: the message names the
    checkpoint its lease keeps and the real interval, and the next run makes it an incomplete
    snapshot."""
    src = tmp_path / "src"
    _source(src)
    more = src / "c-more"  # more data: room for the checkpoint after the pause below
    more.mkdir()
    for i in range(BIG_FILES):
        (more / f"g{i:02}.bin").write_bytes(os.urandom(BIG_SIZE))
    proc = _start(repo, "backup", "--checkpoint-interval", "1s", src)
    # held still for longer than the interval once it stores data: its first look at the clock
    # after it goes on is past the interval however fast this machine reads (a run of 480 MiB
    # could end before its first checkpoint)
    _freeze_when(proc, lambda: _pack_bytes(repo) > 0)
    time.sleep(1.2)
    os.killpg(proc.pid, signal.SIGCONT)
    _freeze_when(proc, lambda: _checkpointed(repo) >= 1)
    children = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGINT)  # both are pending when it goes on
    rc, _, err = _deliver(proc, signal.SIGTERM, False)
    # which of the two the interpreter handles first depends on which threads the kernel hands
    # them to when the process goes on: the one handled second stops the run and names itself
    assert rc in (130, 143), err
    name = signal.Signals(rc - 128).name
    assert f"interrupted by {name}: stopped again before its last state was written: its lease keeps the " in err
    assert "(checkpoints every 1 s), no snapshot now" in err, err
    assert "first turns that checkpoint into an incomplete snapshot" in err and "Traceback" not in err
    assert repo.objects("snapshots") == [] and repo.objects("sessions") != []
    _assert_all_gone(children)

    doc = repo.backup(src)
    snaps = js(repo.ok("snapshots", "--json"))["snapshots"]
    assert [(s["seq"], s["complete"]) for s in snaps] == [(1, False), (2, True)] and doc["seq"] == 2
    assert repo.objects("sessions") == []
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_interrupted_backup_without_checkpoints_says_why_nothing_was_kept(repo: Repo, tmp_path: Path) -> None:
    """Standard input can be read only once and --checkpoint-interval 0 keeps no checkpoints:
    stopped, these runs write no snapshot and say why, leave no lease, and what they stored is
    not uploaded again."""
    proc = subprocess.Popen(
        [BUNKER, "backup", "--stdin-name", "db.sql", "--repo", str(repo.path)],
        env=repo.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(os.urandom(40 << 20))  # the input stays open: the run waits for more
    proc.stdin.flush()
    _freeze_when(proc, lambda: _pack_bytes(repo) >= 16 << 20)
    rc, _, err = _deliver(proc, signal.SIGINT, True)
    assert rc == 130, err
    assert "interrupted by SIGINT: no snapshot was written: a backup of standard input keeps no checkpoints" in err
    assert "Traceback" not in err
    assert repo.objects("snapshots") == [] and repo.objects("sessions") == []

    src = tmp_path / "src"
    total = _source(src)
    proc = _start(repo, "backup", "--checkpoint-interval", "0", src)
    _freeze_when(proc, lambda: _pack_bytes(repo) >= (40 << 20) + total * 0.6)
    rc, _, err = _deliver(proc, signal.SIGTERM, False)
    assert rc == 143, err
    assert "interrupted by SIGTERM: no snapshot was written: checkpoints are off (--checkpoint-interval 0)" in err
    assert repo.objects("snapshots") == [] and repo.objects("sessions") == []
    kept = _pack_bytes(repo)
    again = repo.backup(src)
    assert kept + again["stats"]["stored_new"] < (40 << 20) + total * 1.05  # what it stored is used


def test_forward_stops_with_its_own_message(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "r")
    src = tmp_path / "src"
    make_tree(src)
    repo.backup(src)
    away = tmp_path / "unmounted"
    repo.path.rename(away)
    big = src / "big"
    big.mkdir()
    for i in range(12):
        (big / f"f{i}").write_bytes(os.urandom(4 << 20))
    assert repo.backup(src)["spooled"] is True
    away.rename(repo.path)

    proc = _start(repo, "forward")
    _freeze_when(proc, lambda: bool(repo.objects("sessions")))
    rc, _, err = _deliver(proc, signal.SIGINT, True)
    assert rc == 130, err
    assert "interrupted by SIGINT: forward stopped before it finished: the backups not delivered yet stay" in err
    assert "snapshot was written" not in err and "Traceback" not in err
    assert repo.objects("sessions") == [], "the interrupted forward left its lease"
    assert len(js(repo.ok("forward", "--json"))["snapshots"]) == 1
    assert js(repo.ok("check", "--json"))["ok"] is True


def _before_bunker(stderr: str) -> bool:
    """A KeyboardInterrupt raised by Python itself while the console script was still looking
    for the bunker package, before a line of bunker's code ran (nothing bunker can catch): every
    frame is the script's import line or the import machinery's."""
    frames = [line for line in stderr.splitlines() if line.lstrip().startswith('File "')]
    return (
        stderr.rstrip().endswith("KeyboardInterrupt")
        and bool(frames)
        and all(f'File "{BUNKER}"' in f or 'File "<frozen ' in f for f in frames)
    )


def test_interrupt_while_starting_never_gives_a_traceback(repo: Repo, tmp_path: Path) -> None:
    """Signals at every moment of the start-up (imports, option parsing, opening the
    repository): exit 130/143 (or death by the signal, before Python handles signals at all),
    no traceback from the moment bunker's code runs, no lease left."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    outcomes: list[int | str] = []
    for i in range(24):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        proc = _start(repo, "backup", src)
        time.sleep(i * 0.025)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
        text = err.decode()
        if "Fatal Python error: init_import_site" in text or _before_bunker(text):
            # the interpreter's own start, before any of bunker's code: Python prints this
            outcomes.append("python")
            continue
        assert "Traceback" not in text and "Aborted!" not in text, text
        assert proc.returncode in (0, 128 + sig, -sig), text
        assert repo.objects("sessions") == [], text
        outcomes.append(proc.returncode)
    print(f"\nexit codes at 25 ms steps: {outcomes}")
    assert 130 in outcomes and 143 in outcomes


def test_sigterm_prune_leaves_no_lease(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(os.urandom(1 << 20))
    repo.backup(src)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 << 20))
    orphans = _killed_backup(repo, big)
    _age_sessions(repo, 3600)
    key = _pruner(repo, tmp_path)
    first = js(repo.ok("prune", "--put-key", key, "--grace", "0s", "--json"))
    assert first["condemned"] >= len(orphans)

    proc = _start(repo, "prune", "--put-key", key, "--grace", "0s")
    _freeze_when(proc, lambda: bool(repo.objects("sessions")))
    assert repo.objects("sessions"), "the prune's lease was gone before it could be interrupted"
    rc, _, err = _deliver(proc, signal.SIGTERM, False)
    assert rc == 143, err
    assert "interrupted by SIGTERM: prune stopped before it finished" in err, err
    assert "no snapshot" not in err
    assert repo.objects("sessions") == [], "the SIGTERM'd prune left its lease"

    # nothing waits for the interrupted prune: the condemned packs go now
    after = js(repo.ok("prune", "--put-key", key, "--grace", "0s", "--json"))
    assert after["waiting"] == []
    assert not any((repo.path / "packs" / p).exists() for p in orphans)
    assert js(repo.ok("check", "--json"))["ok"] is True


def test_restore_and_check_stop_with_their_own_message(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _source(src)
    repo.backup(src)

    target = tmp_path / "t"
    proc = _start(repo, "restore", "latest", "--target", target)
    _freeze_when(proc, lambda: _workers_started(proc))
    children = _descendants(proc.pid)
    rc, _, err = _deliver(proc, signal.SIGINT, True)
    assert rc == 130, err
    assert "interrupted by SIGINT: the restore stopped before it finished" in err, err
    assert "snapshot was written" not in err and "Traceback" not in err, err
    _assert_all_gone(children)
    shutil.rmtree(target)

    proc = _start(repo, "check", "--read-data")
    _freeze_when(proc, lambda: _pool_started(proc))
    children = _descendants(proc.pid)
    rc, out, err = _deliver(proc, signal.SIGTERM, False)
    assert rc == 143, out + err
    assert "interrupted by SIGTERM: the check stopped before it finished" in err, out + err
    assert "Traceback" not in err
    _assert_all_gone(children)


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_kill_9_leaves_no_worker_process(repo: Repo, tmp_path: Path, command: str) -> None:
    """kill -9 of the command: its worker processes, forkserver and resource tracker end too,
    and release its stdout and stderr (a reader of them sees their end)."""
    src = tmp_path / "src"
    _source(src)
    if command == "backup":
        proc = _start(repo, "backup", src)
    else:
        repo.backup(src)
        proc = _start(repo, "restore", "latest", "--target", tmp_path / "t")
    _freeze_when(proc, lambda: _pool_started(proc))
    children = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGCONT)
    proc.communicate(timeout=60)  # every holder of the pipes is gone
    assert proc.returncode == -signal.SIGKILL
    _assert_all_gone(children)
    shutil.rmtree(tmp_path / "t", ignore_errors=True)


def _progress_run(repo: Repo, *args: str, wait_for_line: bool) -> tuple[int, str, str]:
    """A backup of standard input that the test feeds; with ``wait_for_line`` the input ends
    only once a progress line shows data stored (or after 60 s, so that a run that prints none
    fails instead of waiting forever), else after 1 s (the lines come every 0.05 s)."""
    env = {**repo.env, "BUNKER_PROGRESS_INTERVAL": "0.05"}
    proc = subprocess.Popen(
        [BUNKER, "backup", "--stdin-name", "db.sql", *args, "--repo", str(repo.path)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    err: list[bytes] = []
    shown = threading.Event()

    def read_stderr(f: IO[bytes]) -> None:
        for line in iter(f.readline, b""):
            err.append(line)
            if b"MiB" in line:
                shown.set()

    reader = threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True)
    reader.start()
    with contextlib.suppress(BrokenPipeError):  # a command that refused its options reads nothing
        proc.stdin.write(os.urandom(24 << 20))
        proc.stdin.flush()
    if wait_for_line:
        shown.wait(60)
    else:
        time.sleep(1)
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    out = proc.stdout.read()
    proc.wait(120)
    reader.join(60)
    return proc.returncode, out.decode(), b"".join(err).decode()


def test_progress_lines_without_a_terminal(repo: Repo) -> None:
    rc, _, err = _progress_run(repo, wait_for_line=True)
    assert rc == 0, err
    lines = [x for x in err.splitlines() if x.startswith("bunker: backup running for ")]
    assert lines, f"no progress line without a terminal:\n{err}"
    print(f"\n{lines[-1]}")
    assert "files" in lines[-1] and "MiB" in lines[-1]

    rc, out, err = _progress_run(repo, "--progress", "always", "--json", wait_for_line=True)
    assert rc == 0 and "bunker: backup running for" in err
    assert js(subprocess.CompletedProcess([], rc, out, err))["level"] in ("ok", "note")

    for quiet in (("--no-progress",), ("--progress", "never"), ("--json",)):
        rc, _, err = _progress_run(repo, *quiet, wait_for_line=False)
        assert rc == 0 and "backup running" not in err, (quiet, err)


def test_progress_shows_the_share_done_counted_by_a_process_of_its_own(repo: Repo, tmp_path: Path) -> None:
    """The files and bytes to back up are counted by a process of its own (cli/count_tree.py),
    not a thread competing with the walk; its count reaches the progress line ("% of"), and it
    is gone when the backup ends."""
    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(f * 10))
    (src / "big.bin").write_bytes(os.urandom(96 << 20))  # long enough a run for a few lines
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    from bunker.cli import count_tree

    cp = subprocess.run(
        [sys.executable, "-I", "-S", count_tree.__file__, str(src)], capture_output=True, text=True, timeout=60
    )
    assert cp.stdout.split() == ["2001", str(total)], (cp.stdout, cp.stderr)

    env = {**repo.env, "BUNKER_PROGRESS_INTERVAL": "0.05"}
    # the command is held four fifths of the time (its own process only, not the count): a fast
    # machine finished the whole run before the count's total reached a line (CI of `66b96f9`)
    proc = subprocess.Popen(
        [BUNKER, "backup", str(src), "--repo", str(repo.path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read() if proc.stderr else b""))
    reader.start()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(0.08)
            os.kill(proc.pid, signal.SIGCONT)
    code = proc.wait(timeout=60)
    reader.join()
    err = b"".join(stderr).decode()
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("bunker: backup running for ")]
    from bunker.cli.output import human_bytes

    assert any(f"% of {human_bytes(total)}  ETA" in x for x in lines), lines
    left = []
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"count_tree.py" in cmd and str(src).encode() in cmd:
                left.append(pid)
    assert left == [], "the counting process outlived the backup"


def test_a_short_run_never_starts_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count walks the whole tree once more: a run that ends before its first progress line
    would need the totals (a no-change backup, mostly) never starts it; a longer one does."""
    from bunker.backup.archiver import Progress
    from bunker.cli import progress

    monkeypatch.setattr(progress, "COUNT_AFTER_LINES", 0.3)
    (tmp_path / "f").write_bytes(b"x" * 10)
    for wait, counted in ((0.0, False), (2.0, True)):
        p = Progress()
        display = progress.ProgressDisplay(p, [str(tmp_path)], "always")
        with display:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and p.total_files is None:
                time.sleep(0.05)
        assert (display._counter is not None) == counted, wait
        assert (p.total_files == 1) == counted, wait


def test_the_forkserver_starts_with_sigint_blocked() -> None:
    """A Ctrl-C that reaches the process group while the forkserver imports must not kill it with
    a traceback: it starts with SIGINT blocked. (The resource tracker's start unblocks SIGINT in
    the calling thread whatever the mask was; the forkserver, started after it, once inherited
    that and died with "Fatal Python error" on the command's stderr.)"""
    code = (
        "import multiprocessing\n"
        "from multiprocessing import forkserver\n"
        "from bunker.process_pool import _start_forkserver\n"
        "multiprocessing.get_context('forkserver')\n"
        "_start_forkserver()\n"
        "pid = forkserver._forkserver._forkserver_pid\n"
        "status = open(f'/proc/{pid}/status').read()\n"
        "print(next(line.split()[1] for line in status.splitlines() if line.startswith('SigBlk:')))\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert int(cp.stdout.strip(), 16) & (1 << (signal.SIGINT - 1)), cp.stdout
