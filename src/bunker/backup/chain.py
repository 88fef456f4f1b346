"""The client's memory of its own snapshot chain (docs/security.md section 6.1), and the lock
that lets only one process of this machine extend it at a time.

The head is stored in the data directory (not the cache: losing it weakens rollback detection).
When the repository's newest trusted snapshot of this client is older than what the client
remembers, someone deleted snapshots or rolled the repository back. (Rollbacks of the config are
caught when a repository is opened: repo/config_chain.py.) The state directory may be deleted at
any time: the next run that reaches the repository learns the head from it again.

``chain_lock`` is an flock on ``chain.lock`` in the client's state directory: two runs of one
client on this machine (a cron run overlapping a manual one) take their sequence numbers one
after the other. The kernel releases it when its process ends, however it ends, so nobody ever
breaks or removes it. Runs on other machines (or with another state directory) are kept apart by
the claims in the repository (repo/claims.py). ``session.json`` records which sessions of this
machine are running, so a claim or checkpoint left by a killed one is known to be dead at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from bunker import dirs
from bunker.crypto.keyfile import write_private_file
from bunker.private_files import private_dirs

LOCK_FILE = "chain.lock"
RUNNING_FILE = "session.json"
MAX_KILLED = 100  # killed sessions remembered for adoption (the oldest are forgotten)


@dataclass(frozen=True)
class ChainHead:
    seq: int
    name: str  # snapshots/<hex>
    cert: str = ""  # clients/<hex> of the chain ("" in records written before it was kept)
    # a snapshot written to the local spool: the run (session, counter) it holds. Its delivery
    # may link it under another name (signed again after a renumbering or a repair), so a copy
    # of this record that outlives the delivery (a state directory put back from an old copy)
    # witnesses that run, not that name
    spooled: tuple[str, int] | None = None


def load_head(state_dir: str) -> ChainHead | None:
    """The remembered head, or None if this client never finished a snapshot here (or the file
    does not name a snapshot: a damaged state file witnesses nothing, it never reports damage)."""
    try:
        with open(os.path.join(state_dir, "chain.json"), encoding="utf-8") as f:
            d = json.load(f)
        run = d.get("spooled")
        spooled = (str(run[0]), int(run[1])) if isinstance(run, list) and len(run) == 2 else None
        head = ChainHead(int(d["seq"]), str(d["name"]), str(d.get("cert", "")), spooled)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    prefix, _, digest = head.name.partition("/")
    if prefix != "snapshots" or len(digest) != 64 or head.seq < 1:
        return None
    return head


def save_head(state_dir: str, head: ChainHead) -> None:
    """Remember a new head durably."""
    record: dict[str, object] = {"seq": head.seq, "name": head.name, "cert": head.cert}
    if head.spooled is not None:
        record["spooled"] = list(head.spooled)
    write_private_file(os.path.join(state_dir, "chain.json"), json.dumps(record))


def witnesses(repo_id: str) -> list[ChainHead]:
    """Every chain head this machine remembers for repository ``repo_id`` (one per client that
    backed up from here): witnesses outside the storage that its newest snapshots exist."""
    root = os.path.join(dirs.data_dir(), "state", repo_id[:32])
    try:
        tags = sorted(os.listdir(root))
    except OSError:
        return []
    heads = [load_head(os.path.join(root, t)) for t in tags]
    return [h for h in heads if h is not None and h.cert]


# ---------------------------------------------------------------------- the local lock


class _Held:
    def __init__(self) -> None:
        self.lock = threading.RLock()  # threads of this process wait here, the flock is taken once
        self.fd = -1
        self.depth = 0


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def chain_lock(state_dir: str) -> Iterator[None]:
    """Hold this client's chain on this machine: other processes (and threads) wait until the
    holder leaves the block or dies. Re-entrant within one thread."""
    path = os.path.join(os.path.abspath(state_dir), LOCK_FILE)
    with _held_guard:
        held = _held.setdefault(path, _Held())
    with held.lock:
        if held.depth == 0:
            try:
                private_dirs(os.path.dirname(path))
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError:
                # a full or read-only data directory: the claims in the repository still keep
                # runs apart (repo/claims.py), and the run warns that its state is unwritable
                fd = -1
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            held.fd = fd
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                if held.fd >= 0:
                    os.close(held.fd)  # closing the last descriptor releases the flock
                held.fd = -1


# ---------------------------------------------------------------------- running sessions


def proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if it is not running): with the
    pid it identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return ""  # a killed process that nobody has reaped yet is dead all the same
    return fields[19]


@dataclass
class RunningRecord:
    """``session.json``: the sessions of this client running on this machine (session -> pid and
    start time), and killed sessions not adopted yet."""

    runs: dict[str, tuple[int, str]]
    killed: list[str]

    def dead(self) -> set[str]:
        """Recorded sessions whose process no longer runs."""
        return {s for s, (pid, start) in self.runs.items() if not (start and proc_start(pid) == start)}

    def state_of(self, session: str) -> bool | None:
        """True if ``session`` runs on this machine, False if it ran here and its process is
        gone, None if this machine does not know it."""
        if session in self.killed:
            return False
        if session not in self.runs:
            return None
        return session not in self.dead()


def read_running(state_dir: str) -> RunningRecord:
    """This machine's record (empty when there is none); reads the older one-session form too."""
    try:
        with open(os.path.join(state_dir, RUNNING_FILE), encoding="utf-8") as f:
            d = json.load(f)
        runs_raw = d.get("runs")
        if runs_raw is None and d.get("session"):
            runs_raw = {d["session"]: [d["pid"], d["start"]]}
        runs = {str(s): (int(v[0]), str(v[1])) for s, v in dict(runs_raw or {}).items()}
        killed = [str(k) for k in d.get("killed", [])]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return RunningRecord({}, [])
    return RunningRecord(runs, killed)


def _write_running(state_dir: str, record: RunningRecord) -> None:
    path = os.path.join(state_dir, RUNNING_FILE)
    if not record.runs and not record.killed:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    doc = {"runs": {s: list(v) for s, v in sorted(record.runs.items())}, "killed": record.killed[-MAX_KILLED:]}
    write_private_file(path, json.dumps(doc))


def mark_running(state_dir: str, session: str, killed: Iterable[str] = ()) -> None:
    """A backup run starts: remember that ``session`` runs in this process (until clear_running).
    The run has just adopted the checkpoints of this client's killed sessions: recorded sessions
    whose process is gone are dropped, and ``killed`` (those it could not reach, offline) is kept
    for a later run."""
    pid = os.getpid()
    with chain_lock(state_dir):
        record = read_running(state_dir)
        dead = record.dead()
        record.runs = {s: v for s, v in record.runs.items() if s not in dead}
        record.runs[session] = (pid, proc_start(pid))
        record.killed = sorted(set(killed))
        _write_running(state_dir, record)


def note_running(state_dir: str, session: str) -> None:
    """Remember that ``session`` (a forward or a prune extending this chain) runs in this
    process, until clear_running names it."""
    pid = os.getpid()
    with chain_lock(state_dir):
        record = read_running(state_dir)
        record.runs[session] = (pid, proc_start(pid))
        _write_running(state_dir, record)


def clear_running(
    state_dir: str, killed: Iterable[str] | None = None, session: str | None = None, failed: Iterable[str] = ()
) -> None:
    """A run ended: forget ``session`` (None: every session of this process); ``killed``, when
    given, replaces the killed sessions not adopted yet. ``failed``: sessions whose lease could
    not be released (the storage failed under them): recorded as killed, so their claims and
    checkpoints are taken over at once by the next run here instead of after the lease expires."""
    pid = os.getpid()
    with chain_lock(state_dir):
        record = read_running(state_dir)
        for s, (p, _start) in list(record.runs.items()):
            if s == session or (session is None and p == pid):
                del record.runs[s]
        if killed is not None:
            record.killed = sorted(set(killed))
        record.killed = sorted(set(record.killed) | set(failed))
        _write_running(state_dir, record)


@contextlib.contextmanager
def releasing(state_dir: str, session: str) -> Iterator[None]:
    """Around a lease's release at the end of a run that is not a backup (forward, prune): the
    run is forgotten here whether the release works or not, and a failed release leaves the
    session known as killed (see clear_running)."""
    released = False
    try:
        yield
        released = True
    finally:
        clear_running(state_dir, session=session, failed=() if released else (session,))


def killed_sessions(state_dir: str) -> set[str]:
    """Sessions of this machine whose process is gone (killed) and not yet adopted."""
    record = read_running(state_dir)
    return record.dead() | set(record.killed)
