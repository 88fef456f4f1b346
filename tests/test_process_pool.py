"""Worker pools and SIGTERM (bunker/process_pool.py): a SIGTERM to the whole process group, as
`systemctl stop` sends, reaches the workers while they send results. A worker that ended in the
middle of one left half a message in the pool's result pipe, and the pool (with the command)
waited for the rest forever. Workers now take no new task after SIGTERM and end once their
result is sent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, signal
from concurrent.futures.process import BrokenProcessPool
from bunker.process_pool import process_pool

def main():
    pool = process_pool(2, "os", int, (0,))
    futs = [pool.submit(os.urandom, 16 << 20) for _ in range(24)]  # results of many writes each
    futs[0].result()
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGTERM)
    done = broken = 0
    for f in futs:
        try:
            f.result(timeout=90)
            done += 1
        except BrokenProcessPool:
            broken += 1
    pool.shutdown(wait=True)
    print(done, broken)

if __name__ == "__main__":
    main()
"""


def test_sigterm_to_the_workers_while_they_send_results_never_hangs_the_pool(tmp_path: Path) -> None:
    script = tmp_path / "pool_term.py"
    script.write_text(SCRIPT)
    for _ in range(5):  # (without the fix about one run in three hung)
        cp = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, check=False)
        assert cp.returncode == 0, cp.stderr[-3000:]
        done, broken = (int(x) for x in cp.stdout.split())
        assert done >= 1 and done + broken == 24, cp.stdout


WIDE_SCRIPT = """
import fcntl
from bunker.process_pool import PIPE_BYTES, process_pool

def main():
    pool = process_pool(1, "os", int, (0,))
    got = [fcntl.fcntl(q._reader.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
           for q in (pool._result_queue, pool._call_queue)]
    print(pool.submit(sum, [1, 2]).result(), got == [PIPE_BYTES] * 2)
    pool.shutdown(wait=True)

if __name__ == "__main__":
    main()
"""


def test_the_pipes_hold_a_whole_batch(tmp_path: Path) -> None:
    """A batch's result (~300 KiB for 256 small files) fits the widened pipe, so the thread that
    reads results does not wait for its turn at the interpreter after every 64 KiB; the same for
    the tasks (a restore's batches)."""
    script = tmp_path / "pool_wide.py"
    script.write_text(WIDE_SCRIPT)
    cp = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["3", "True"], cp.stdout + cp.stderr


LEFT_SCRIPT = """
import os, sys, time
from bunker.process_pool import process_pool

KEPT = []  # the pool stays referenced until the exit (as a command's own objects are)

def main():
    ready = sys.argv[1]
    pool = process_pool(1, "os", os.mkdir, (ready,))  # the worker makes ``ready`` once started
    # what submit does first: a worker is started, the pool's own thread not yet (an interrupt
    # right here leaves the pool with nothing that would stop the worker)
    pool._adjust_process_count()
    KEPT.append(pool)
    while not os.path.isdir(ready):
        time.sleep(0.01)
    time.sleep(0.5)  # ... and waits for a task
    print(*pool._processes, flush=True)

if __name__ == "__main__":
    main()
"""


def test_a_worker_started_by_a_pool_nobody_stopped_does_not_hold_up_the_exit(tmp_path: Path) -> None:
    """multiprocessing waits at exit for the workers the command started, and a worker waits
    for the command to end: without the SIGTERM at exit, both waited for ever (a restore
    interrupted while its pool started its first worker did, under load)."""
    script = tmp_path / "pool_left.py"
    script.write_text(LEFT_SCRIPT)
    cp = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ready")], capture_output=True, text=True, timeout=60
    )
    assert cp.returncode == 0, cp.stderr
    worker = int(cp.stdout.split()[0])
    assert not Path(f"/proc/{worker}").exists() or b"Z" in Path(f"/proc/{worker}/stat").read_bytes().split(b")")[-1][:3]


STALLED_SCRIPT = """
import os, signal, sys, time
from bunker.process_pool import TERM_IDLE, process_pool

def slow_result(n):
    time.sleep(1.0)
    return b"x" * n  # 16 MiB: far more than the result pipe holds

def main():
    pool = process_pool(1, "os", int, (0,))
    fut = pool.submit(slow_result, 16 << 20)
    time.sleep(0.4)  # the worker is in its task
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGTERM)
    # no thread of this process reads the result pipe for a while: the worker's send waits
    # there well past TERM_IDLE after its task ended
    sys.setswitchinterval(100)
    end = time.monotonic() + 1.0 + 2.5 * TERM_IDLE
    while time.monotonic() < end:
        pass
    sys.setswitchinterval(0.005)
    print(len(fut.result(timeout=30)), flush=True)
    pool.shutdown(wait=True)

if __name__ == "__main__":
    main()
"""


def test_a_worker_told_to_end_finishes_sending_a_result_nobody_reads_yet(tmp_path: Path) -> None:
    """SIGTERM lets a worker end once it has been idle for TERM_IDLE; the result of its last
    task is sent after the task, so sending counts as busy: a worker that ended while the
    command did not read (its threads held up longer than TERM_IDLE) left half a message in
    the pipe, and the pool waited for the rest for ever."""
    script = tmp_path / "pool_stalled.py"
    script.write_text(STALLED_SCRIPT)
    cp = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert cp.stdout.split() == [str(16 << 20)], cp.stdout + cp.stderr[-3000:]


BROKEN_SCRIPT = """
import os, signal
from concurrent.futures.process import BrokenProcessPool
import bunker.process_pool
from bunker.process_pool import process_pool

def never_give_up_a_send():
    bunker.process_pool.TERM_SEND = 3600.0  # in the worker: only the pool's reading ends a send

def main():
    pool = process_pool(2, "os", never_give_up_a_send, ())
    futs = [pool.submit(os.urandom, 16 << 20) for _ in range(24)]
    futs[0].result()
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGTERM)
    broken = sum(1 for f in futs if isinstance(f.exception(timeout=90), BrokenProcessPool))
    pool.shutdown(wait=True)
    print(broken)

if __name__ == "__main__":
    main()
"""


def test_a_broken_pool_reads_what_its_other_workers_still_send(tmp_path: Path) -> None:
    """A worker told to end that takes a new task ends at once, and the pool, broken, reads no
    more results; its other worker may be in the middle of sending one. The pool reads and drops
    those bytes until its workers have ended, so that worker ends once idle instead of waiting
    TERM_SEND for a reader (here made endless: without the draining every run hangs)."""
    script = tmp_path / "pool_broken.py"
    script.write_text(BROKEN_SCRIPT)
    for _ in range(5):  # (without the draining, three runs of five hung)
        cp = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
        assert cp.returncode == 0, cp.stderr[-3000:]
        assert 0 < int(cp.stdout) < 24, cp.stdout
