"""Worker process pools that never outlive their command.

The pools (small files in a backup, restore's writers, check's pack verifier) start their
workers through a forkserver, so a worker's parent is the forkserver, not the command. When the
command dies without shutting its pool down (kill -9, the OOM killer), nothing tells the workers:
they wait forever on their task queue, and keep the forkserver (which holds the command's stdout
and stderr) and the resource tracker alive with them. So every worker watches the command's
process itself (a pidfd on Linux, which becomes readable when the process ends, else polling)
and exits when it is gone; then the forkserver and the resource tracker, whose pipes only the
command and the workers hold, end too.

Workers ignore SIGINT: Ctrl-C on a terminal reaches the whole process group, and it is the
command that decides how to stop (it shuts the pool down). SIGTERM reaches the whole group too
(`systemctl stop`, `kill -- -PGID`), but it must end a worker: a pool whose worker died is torn
down with SIGTERM to the others (concurrent.futures). A worker must never end while it sends a
result, though: the pool reads results from one pipe, and half a message there stops the pool's
reader forever, and with it the command. So a worker that gets SIGTERM takes no new task and
ends once it is idle: TERM_IDLE after its last result was sent, or TERM_SEND after the command
last left a result it is sending unread, at the latest after TERM_LIMIT. A pool that a dead
worker broke reads no more results, and its other workers may be sending one: it reads and
drops their bytes until they have ended, so they end once idle too (`_TrackedPool`).

A pool can also be left without having been told to stop: an interrupt that comes while it
starts a worker (concurrent.futures starts the worker before the thread that would stop it),
and the pool's shutdown then ends nothing. At exit, multiprocessing waits for every worker the
command started, and the worker waits for the command to end: both waited for ever. So at exit
the command first sends SIGTERM to the workers still running (:func:`_end_leftover_workers`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import multiprocessing
import multiprocessing.util
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from bunker import cycle_collector

POLL_SECONDS = 1.0  # without pidfds: how often a worker looks whether the command still runs
TERM_IDLE = 1.0  # after SIGTERM, a worker ends once this long has passed since its last task ended
TERM_LIMIT = 60.0  # ... and after this long whatever it does
# ... but while it sends a result, not before the command has read none of it for this long (a
# command held up for a moment still gets the whole result; a pool that gave up on its workers
# when one of them died reads no more, and its other workers end after this)
TERM_SEND = 10.0

_exit_hook = False  # _end_leftover_workers is registered (once a pool was made)
_busy = 0  # tasks this worker is running (0 or 1: one task at a time)
_idle_since = 0.0  # monotonic time its last task ended
_sending_since: float | None = None  # monotonic time the result being sent began to be sent
_terminating = False


class _TrackedPool(ProcessPoolExecutor):
    """A ProcessPoolExecutor whose workers know when they run a task (see the module's
    docstring), and whose results are read to the end when it breaks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drain_lock = threading.Lock()
        self._drained = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fut = super().submit(_tracked, fn, *args, **kwargs)
        fut.add_done_callback(self._on_done)
        return fut

    def _on_done(self, fut: Future[Any]) -> None:
        # Set when a worker died: the pool reads no more results and tells its other workers
        # to end, then waits for them; one that is sending a result would wait TERM_SEND for a
        # reader. Its bytes are read and dropped instead, so it ends TERM_IDLE later.
        if fut.cancelled() or not isinstance(fut.exception(), BrokenProcessPool):
            return
        with self._drain_lock:
            if self._drained:
                return
            self._drained = True
        reader = getattr(getattr(self, "_result_queue", None), "_reader", None)
        workers = list(getattr(self, "_processes", {}))
        if reader is not None and workers:
            with contextlib.suppress(OSError):
                fd = os.dup(reader.fileno())  # (the pool closes its own when it is shut down)
                threading.Thread(target=_drop_results, args=(fd, workers), name="bunker-drain", daemon=True).start()


def _drop_results(fd: int, workers: list[int]) -> None:
    """Read and drop what a broken pool's workers still send, until they have all ended."""
    deadline = time.monotonic() + TERM_LIMIT + TERM_SEND
    try:
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0] and not os.read(fd, PIPE_BYTES):
                return  # every writer closed it
    except OSError:
        return
    finally:
        os.close(fd)


def _tracked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    global _busy, _idle_since
    if _terminating:  # told to end: no new task (nothing is being sent now, so it may end at once)
        os._exit(128 + signal.SIGTERM)
    _busy += 1
    try:
        return fn(*args, **kwargs)
    finally:
        _busy -= 1
        _idle_since = time.monotonic()


def _on_term(signum: int, frame: object) -> None:
    global _terminating
    if not _terminating:
        _terminating = True
        threading.Thread(target=_end_when_idle, args=(signum,), name="bunker-term", daemon=True).start()


def _end_when_idle(signum: int) -> None:
    told = time.monotonic()
    deadline = told + TERM_LIMIT
    while (now := time.monotonic()) < deadline:
        sending = _sending_since
        if sending is not None:
            if now - max(sending, told) >= TERM_SEND:
                break  # not read for that long: the pool has given up (a worker of it died)
        elif _busy == 0 and now - _idle_since >= TERM_IDLE:
            break
        time.sleep(0.05)
    os._exit(128 + signum)


def process_pool(
    workers: int, preload: str, initializer: Callable[..., None], initargs: tuple[Any, ...]
) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes started by a forkserver that imported module ``preload``
    (and bunker.forkserver_quiet, which keeps a worker handed over while this command was being
    stopped from printing a traceback); each runs ``initializer(*initargs)`` first and exits
    when this process ends."""
    global _exit_hook
    if not _exit_hook:
        # (registered after multiprocessing's own exit function, so it runs before it)
        atexit.register(_end_leftover_workers)
        _exit_hook = True
    # forkserver: never fork a process that already runs threads
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([preload, "bunker.forkserver_quiet"])
    _start_forkserver()
    pool = _TrackedPool(
        workers, mp_context=ctx, initializer=_start_worker, initargs=(os.getpid(), initializer, initargs)
    )
    _widen_pipes(pool)
    return pool


def _end_leftover_workers() -> None:
    """SIGTERM to every worker this process started that still runs: multiprocessing waits for
    them at exit, and they end only once idle or told to (see the module's docstring)."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):  # ended meanwhile
            child.terminate()


def prestart(preload: str) -> None:
    """Start the forkserver that a :func:`process_pool` with ``preload`` will use, from a thread
    of its own: it imports the workers' modules in a process of its own while this one goes on,
    instead of when the first job is handed over. A start that fails here is left to that
    first job, which starts the forkserver again and reports what is wrong."""

    def start() -> None:
        with contextlib.suppress(Exception):
            multiprocessing.get_context("forkserver").set_forkserver_preload([preload, "bunker.forkserver_quiet"])
            _start_forkserver()

    threading.Thread(target=start, name="bunker-forkserver-start", daemon=True).start()


PIPE_BYTES = 1 << 20


def _widen_pipes(pool: ProcessPoolExecutor) -> None:
    """Give the pipes that carry tasks out and results back the room of a whole batch (1 MiB
    instead of 64 KiB, Linux only). The command's threads that read and write them share the
    interpreter with the busy walk or restore: after each system call they wait for their turn
    (up to the switch interval, 5 ms), so a 300 KiB result read 64 KiB at a time took that wait
    five times, and the workers sat blocked in their writes meanwhile (docs/performance.md).
    Where the size cannot be raised, batches just flow slower."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = PIPE_BYTES
    for queue in (getattr(pool, "_result_queue", None), getattr(pool, "_call_queue", None)):
        reader = getattr(queue, "_reader", None)
        if reader is not None:
            # over the user's pipe quota (pipe-user-pages-soft) this fails: the default size works
            with contextlib.suppress(OSError):
                fcntl.fcntl(reader.fileno(), set_size, min(PIPE_BYTES, limit))


def _start_forkserver() -> None:
    """Start the forkserver (and the resource tracker) now, with SIGINT blocked. Both are fresh
    interpreters: a Ctrl-C reaches the whole process group, and one that came while they start up
    and import the preload killed them with a traceback (or "Fatal Python error") on the
    command's stderr. They inherit the blocked signal (and ignore SIGINT anyway, as do the
    workers they fork); this thread gets a SIGINT that came meanwhile once it is unblocked."""
    from multiprocessing import forkserver, resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        # the tracker first, on its own: its start unblocks SIGINT and SIGTERM in this thread when
        # it returns, whatever the mask was, so the forkserver (which would start it) is started
        # after blocking SIGINT again
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_worker(command: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    _track_sends()
    watch_command(command)
    cycle_collector.tune()
    initializer(*initargs)


def _track_sends() -> None:
    """Let the sending of a task's result keep the worker (see the module's docstring): the
    worker loop of concurrent.futures sends it after the task has returned, through the module's
    ``_sendback_result``, and a result larger than the pipe waits there until the command reads
    it, which may take longer than TERM_IDLE (TERM_SEND). This process is a worker: only its own
    copy of the module is changed. A Python without that function keeps the task-only count."""
    from concurrent.futures import process as futures_process

    send = getattr(futures_process, "_sendback_result", None)
    if send is None or getattr(send, "_tracks_sends", False):
        return

    def sendback_result(*args: Any, **kwargs: Any) -> Any:
        global _sending_since, _idle_since
        _sending_since = time.monotonic()
        try:
            return send(*args, **kwargs)
        finally:
            _sending_since = None
            _idle_since = time.monotonic()

    sendback_result._tracks_sends = True  # type: ignore[attr-defined]
    futures_process._sendback_result = sendback_result


def watch_command(pid: int) -> None:
    """End this process as soon as process ``pid`` has ended (at once if it already has)."""
    fd: int | None = None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None  # not Linux, or a kernel before 5.3: poll instead
    threading.Thread(target=_exit_when_gone, args=(pid, fd), name="bunker-watch-command", daemon=True).start()


def _exit_when_gone(pid: int, fd: int | None) -> None:
    if fd is not None:
        select.select([fd], [], [])  # a pidfd becomes readable when its process has ended
    else:
        while _running(pid):
            time.sleep(POLL_SECONDS)
    os._exit(1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
