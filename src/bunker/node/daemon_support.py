"""The parts `bunker node run` stands on (node/daemon.py): the one-daemon-per-node lock, the log
on stderr (systemd's journal), retry delays, the socket server that can be drained, and ending
the processes a cycle started (ssh, a node's own server).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import signal
import socket
import sys
import threading
import time

from bunker.errors import ExitCode
from bunker.node.node_dir import NodeDir, NodeError
from bunker.node.serve import ServeConfig
from bunker.node.serve_frontends import SocketServer

LOCK_FILE = "daemon.lock"  # in DIR/state: held (flock) while a daemon runs the node
RETRY_FIRST = 5.0  # seconds before the first retry of an upstream that failed
RETRY_CAP = 15 * 60.0  # retries never wait longer than this, or than the interval when it is longer
RETRY_FIRST_VAR = "BUNKER_NODE_RETRY_DELAY"  # the first wait, in seconds (tests make it short)

# syslog priorities of the run log's levels: systemd reads a "<N>" line prefix as the priority
PRIORITY = {"ok": 6, "note": 5, "warn": 4, "err": 3, "fatal": 2}


# ------------------------------------------------------------------------------------ the lock


def take_lock(nd: NodeDir) -> int:
    """Hold ``DIR/state/daemon.lock`` for this process's life (an flock: the kernel releases it
    when the process ends, even by kill -9); refuse when another daemon holds it."""
    path = os.path.join(nd.state_dir(), LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise NodeError(
            f"node {nd.name} at {nd.root} is already run by another `bunker node run`{pid}; one daemon per node "
            "directory",
            "leave that one running (it serves and forwards for this node), or stop it first "
            f"(`systemctl stop` its unit{', or `kill ' + holder + '`' if holder.isdigit() else ''})",
            exit_code=ExitCode.USAGE,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ------------------------------------------------------------------------------------- the log


def _to_journal() -> bool:
    """Whether stderr is systemd's journal stream (JOURNAL_STREAM names its device and inode)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class Journal:
    """One line per event on stderr: ``bunker node run: LEVEL: message``. Under systemd the line
    starts with its syslog priority, so `journalctl -p warning` finds the problems. A problem that
    repeats word for word is said again only after REPEAT seconds (a snapshot held back for a
    day would otherwise fill the journal)."""

    REPEAT = 3600.0

    def __init__(self) -> None:
        self.journal = _to_journal()
        self._said: dict[str, float] = {}
        self._lock = threading.Lock()

    def say(self, level: str, message: str, *, once: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if once:
                last = self._said.get(message)
                if last is not None and now - last < self.REPEAT:
                    return
                self._said[message] = now
        prefix = f"<{PRIORITY.get(level, 6)}>" if self.journal else ""
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"{prefix}bunker node run: {level}: {message}\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------- retries


def first_retry() -> float:
    """The first wait after a failure (RETRY_FIRST, or BUNKER_NODE_RETRY_DELAY seconds)."""
    raw = os.environ.get(RETRY_FIRST_VAR, "")
    try:
        value = float(raw) if raw else RETRY_FIRST
    except ValueError:
        value = RETRY_FIRST
    return min(max(value, 0.1), RETRY_CAP)


def retry_delay(failures: int, interval: float) -> float:
    """Seconds to wait after ``failures`` failed attempts in a row: 5, 10, 20, ... capped at 15
    minutes (or at the interval when it is longer), with +-20 % jitter so that nodes cut off
    together do not come back at the same instant."""
    cap = max(interval, RETRY_CAP)
    base = min(first_retry() * 2.0 ** max(failures - 1, 0), cap)
    return base * random.uniform(0.8, 1.2)


# --------------------------------------------------------------------------------- the server


class DrainableServer(SocketServer):
    """`node serve --socket`'s server that can end its connections in order: the reading side of
    each is shut, so every session stops taking requests, answers those it holds (an object being
    stored is stored whole) and closes."""

    def __init__(self, path: str, config: ServeConfig, mode: int) -> None:
        super().__init__(path, config, mode)
        self._open: dict[socket.socket, threading.Thread] = {}
        self._open_lock = threading.Lock()

    def _one(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open[conn] = threading.current_thread()
        try:
            super()._one(conn)
        finally:
            with self._open_lock:
                self._open.pop(conn, None)

    def drain(self, grace: float) -> int:
        """Stop accepting, remove the socket, end the open sessions (waiting up to ``grace``
        seconds for them); return how many were still open."""
        self.close()
        with self._open_lock:
            sessions = list(self._open.items())
        for conn, _ in sessions:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for _, thread in sessions:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(1 for _, t in sessions if t.is_alive())


# ------------------------------------------------------------------------------- children


def _children() -> list[int]:
    """This process's children that are still running (from /proc; none elsewhere)."""
    me = os.getpid()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            if fields[0] == b"Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry), os.WNOHANG)
                continue
            found.append(int(entry))
    return found


def end_children(grace: float) -> int:
    """End the processes a cycle started and left (an ssh whose server hangs, a node server):
    they had their input closed; what still runs after a moment gets SIGTERM, then SIGKILL after
    ``grace`` seconds. Returns how many had to be signalled."""
    deadline = time.monotonic() + min(1.0, grace)
    while _children() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _children()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _children() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _children():
            break
    return len(left)
