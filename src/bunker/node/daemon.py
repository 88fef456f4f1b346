"""`bunker node run`: a node as a standing service (docs/hierarchy.md, "Running a node").

One process per node directory (an flock on ``state/daemon.lock``; a second one is refused):

- with ``--socket PATH`` it serves the node's stores to clients, as `bunker node serve --socket`
  does (append-only; a thread per connection);
- it moves data continuously: every ``--interval`` seconds, and at once when a new snapshot
  appears in a store (a client's session ended, or an import published one), it runs what
  `bunker node import` and `bunker node forward` run (import from every link, forward to every
  upstream and down to every downstream link, evict to the bound). A backup still running into
  the node is no obstacle: its packs go up as they arrive, its snapshot only once it exists and
  its packs are at the top (node/relay_direct.py);
- an upstream or link that fails is tried again after 5 s, 10 s, 20 s, ... (at most 15 minutes,
  or the interval when that is longer; with jitter) while the others keep their own pace; the
  daemon never exits because an upstream is away;
- it logs one line per cycle that did something, and every problem, with its level, on stderr
  (systemd's journal);
- SIGTERM or SIGINT stops it: no new connections, the open sessions answer what they hold and
  close, a cycle under way stops after the objects in flight (every state file is replaced
  atomically, so nothing is half-written; what was not sent goes at the next start), the
  processes it started end, the socket is removed, exit 0. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from dataclasses import dataclass
from types import FrameType

from bunker import interrupt
from bunker.errors import BunkerError
from bunker.interrupt import Interrupted, signal_name
from bunker.node.daemon_support import DrainableServer, Journal, end_children, retry_delay, take_lock
from bunker.node.eviction import Evicted, evict_all
from bunker.node.link_import import import_all
from bunker.node.link_objects import ImportReport
from bunker.node.node_dir import NodeDir
from bunker.node.node_serve import node_serve_config
from bunker.node.node_settings import node_settings
from bunker.node.relay import forward_all
from bunker.node.relay_direct import DirectReport
from bunker.node.relay_link import LinkReport
from bunker.node.requests import describe_retries, retry_all

DEFAULT_INTERVAL = 60.0
POLL = 1.0  # how often an idle daemon looks for a new snapshot in its stores
STOP_GRACE = 10.0  # seconds open sessions and child processes get to end once told to stop
# problems that mean "this upstream or link could not be used now": retried with a growing wait
FAILURES = ("upstream-unreachable", "upstream-failed", "mailbox-unreachable", "import-failed", "failed")


@dataclass
class Peer:
    """An upstream or a downstream link, with its own schedule."""

    name: str
    kind: str  # "direct" | "link" (an upstream link) | "down" (a downstream link)
    failures: int = 0  # failed attempts in a row
    next_due: float = 0.0  # time.monotonic() of its next attempt

    @property
    def what(self) -> str:
        return "downstream link" if self.kind == "down" else "upstream"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def describe(report: object) -> str:
    """One part of a cycle's line for a report that did something, else ""."""
    if isinstance(report, DirectReport):
        if not (report.sent or report.present or report.snapshots or report.down):
            return ""
        return (
            f"{report.upstream}: sent {report.sent} objects ({_size(report.sent_bytes)}), {report.present} already "
            f"there, {len(report.snapshots)} snapshots, {report.down} records down"
        )
    if isinstance(report, LinkReport):
        return report.summary() if report.pieces else ""
    if isinstance(report, ImportReport):
        busy = report.pieces or report.duplicates or report.receipts.accepted or report.quarantined or report.replayed
        return report.summary() if busy else ""
    if isinstance(report, Evicted):
        return (
            f"evicted {len(report.evicted)} packs ({_size(report.evicted_bytes)}) of repository {report.repo_id[:16]}, "
            f"recorded upstream"
        )
    return ""


class Daemon:
    """`bunker node run DIR`: see the module's docstring."""

    def __init__(self, root: str, socket_path: str | None, socket_mode: int, interval: float) -> None:
        self.root = os.path.abspath(root)
        self.socket_path = os.path.abspath(socket_path) if socket_path else None
        self.socket_mode = socket_mode
        self.interval = interval
        self.log = Journal()
        self.peers: dict[str, Peer] = {}
        self.server: DrainableServer | None = None
        self._signal: int | None = None  # the first SIGTERM/SIGINT received
        self._armed = False  # the loop runs: a first signal raises Interrupted there
        self._in_cycle = False
        self._next_cycle = 0.0
        self._marks: dict[str, int] = {}
        self.nd: NodeDir | None = None  # as read at the last cycle

    # ------------------------------------------------------------------ the process

    def run(self) -> int:
        """Serve and forward until told to stop; the exit code (0 after a signal)."""
        nd = self.nd = NodeDir(self.root)
        lock = take_lock(nd)
        try:
            if self.socket_path:
                self.server = DrainableServer(self.socket_path, node_serve_config(nd), self.socket_mode)
            for sig in interrupt.SIGNALS:
                signal.signal(sig, self._on_signal)
            if self.server is not None:
                self.server.start()
            self._started(nd)
            try:
                self._loop()
            finally:
                self._stop()
        finally:
            if self.server is not None:
                self.server.close()
            os.close(lock)  # the kernel would release it anyway: this only makes it prompt
        interrupt.ignore()  # stopped in order: a late signal must not turn exit 0 into 143
        self.log.say("ok", f"node {nd.name} stopped ({signal_name(self._signal or signal.SIGTERM)})")
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:
            with contextlib.suppress(OSError):
                os.write(2, f"bunker node run: warn: second {signal_name(signum)}: exiting at once\n".encode())
            if self.server is not None and self.socket_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)
            os._exit(128 + signum)
        self._signal = signum
        if self._armed:
            interrupt.note_raised(signum)
            raise Interrupted(signum)

    def _started(self, nd: NodeDir) -> None:
        where = (
            f"serving on {self.socket_path} (mode {self.socket_mode:o})"
            if self.socket_path
            else "not serving clients (no --socket)"
        )
        peers = [f"{u.name} ({u.kind})" for u in nd.config.upstreams]
        peers += [f"{d.name} (downstream link)" for d in nd.config.downstreams]
        self.log.say(
            "ok",
            f"node {nd.name} ({nd.config.node_id[:16]}) running as pid {os.getpid()}: {where}; moving data every "
            f"{self.interval:g} s with {', '.join(peers) or 'no upstream yet'}",
        )

    def _loop(self) -> None:
        try:
            while self._signal is None:
                self._armed = True
                if self._signal is not None:
                    break
                self._in_cycle = True
                try:
                    self._cycle()
                except Exception:  # a bug or a failing node directory must not end the service
                    self._next_cycle = time.monotonic() + self.interval
                    for p in self.peers.values():
                        p.next_due = max(p.next_due, self._next_cycle)
                    failure = traceback.format_exc()
                    self.log.say("err", f"the cycle failed (tried again in {self.interval:g} s):\n{failure}")
                self._in_cycle = False
                self._idle()
        except Interrupted as exc:
            if self._in_cycle:
                self.log.say(
                    "note",
                    f"{signal_name(exc.signum)}: the cycle under way stopped after the objects in flight; what it "
                    "delivered is recorded, the rest goes at the next start",
                )
        finally:
            self._armed = False
            self._in_cycle = False

    def _stop(self) -> None:
        if self._signal is not None:
            self.log.say("ok", f"{signal_name(self._signal)}: stopping (a second signal exits at once)")
        if self.server is not None:
            still = self.server.drain(STOP_GRACE)
            if still:
                self.log.say("warn", f"{still} client sessions did not end within {STOP_GRACE:g} s; they are cut")
        ended = end_children(STOP_GRACE)
        if ended:
            self.log.say("note", f"ended {ended} processes a cycle had started (ssh or a node server)")

    # ------------------------------------------------------------------ the cycle

    def _sync_peers(self, nd: NodeDir) -> None:
        """Follow node.json: an upstream added while the daemon runs is served from the next cycle."""
        wanted = [(u.name, u.kind) for u in nd.config.upstreams] + [(d.name, "down") for d in nd.config.downstreams]
        old = self.peers
        self.peers = {name: old.get(name) or Peer(name, kind) for name, kind in wanted}
        for name, kind in wanted:
            self.peers[name].kind = kind

    def _cycle(self) -> None:
        now = time.monotonic()
        self._next_cycle = now + self.interval
        try:
            nd = self.nd = NodeDir(self.root)
        except BunkerError as exc:
            self.log.say("err", f"{exc.message} (next step: {exc.hint}); trying again in {self.interval:g} s")
            return
        self._marks = self._snapshot_marks(nd)
        self._sync_peers(nd)
        if not nd.config.upstreams:
            self.log.say(
                "warn",
                f"node {nd.name} has no upstream: what it holds stays here; add one with "
                f"`bunker node upstream add {nd.root} NAME --direct URL | --link URL --card FILE`",
                once=True,
            )
        done: list[str] = []
        with nd.moving():  # never beside a `node forward` or `node import` run by hand
            for peer in self.peers.values():
                if peer.next_due <= now:
                    self._serve_peer(nd, peer, done)
            try:
                done += describe_retries(retry_all(nd))  # restore requests whose backoff passed
            except (BunkerError, OSError) as exc:
                self.log.say("err", f"restore requests of node {nd.name} could not be retried: {exc}", once=True)
            try:
                # an unbounded store has nothing to evict: no listing of it every cycle
                bounded = any(node_settings(nd, r).max_size is not None for r in nd.repositories())
                evictions, full = evict_all(nd) if bounded else ([], [])
            except (BunkerError, OSError) as exc:
                evictions, full = [], []
                self.log.say("err", f"eviction in node {nd.name}'s store failed: {exc}", once=True)
        done += [describe(e) for e in evictions]
        for level, _code, message in full:
            self.log.say(level, message, once=True)
        done = [d for d in done if d]
        if done:
            self.log.say("ok", "; ".join(done))

    def _serve_peer(self, nd: NodeDir, peer: Peer, done: list[str]) -> None:
        """Import from and forward to one peer; schedule its next attempt."""
        problems: list[tuple[str, str, str]] = []
        try:
            if peer.kind in ("link", "down"):
                reports, found = import_all(nd, peer.name)
                problems += found
                done += [describe(r) for r in reports]
            sent = forward_all(nd, peer.name)
            problems += [(p.level, p.code, p.message) for p in sent.problems if p.code != "no-upstream"]
            done += [describe(r) for r in sent.reports]
        except BunkerError as exc:
            hint = f" (next step: {exc.hint})" if exc.hint else ""
            problems.append(("err", "failed", f"{peer.what} {peer.name}: {exc.message}{hint}"))
        except OSError as exc:
            problems.append(("err", "failed", f"{peer.what} {peer.name}: {exc.strerror or exc} ({exc.filename})"))
        except Exception:  # a bug must not end the daemon: named, and tried again later
            problems.append(
                ("err", "failed", f"{peer.what} {peer.name}: internal error (a bug):\n{traceback.format_exc()}")
            )
        now = time.monotonic()
        failed = [p for p in problems if p[1] in FAILURES]
        if failed:
            peer.failures += 1
            wait = retry_delay(peer.failures, self.interval)
            peer.next_due = now + wait
            for level, _code, message in failed:
                self.log.say(
                    level, f"{message}; next attempt in {wait:.1f} s ({peer.failures} failed in a row, backing off)"
                )
        else:
            if peer.failures:
                self.log.say("ok", f"{peer.what} {peer.name} works again after {peer.failures} failed attempts")
            peer.failures = 0
            peer.next_due = now + self.interval
        for level, _code, message in problems:
            if (level, _code, message) not in failed:
                self.log.say(level, message, once=True)

    # ------------------------------------------------------------------ between cycles

    def _snapshot_marks(self, nd: NodeDir) -> dict[str, int]:
        """The change time of each store's snapshots/ directory: a new snapshot changes it."""
        marks = {}
        for repo_id in nd.repositories():
            with contextlib.suppress(OSError):
                marks[repo_id] = os.stat(os.path.join(nd.store_path(repo_id), "snapshots")).st_mtime_ns
        return marks

    def _idle(self) -> None:
        """Wait for the next peer (or the next cycle); a new snapshot in a store cuts the wait
        short for every peer that is not backing off."""
        while self._signal is None:
            now = time.monotonic()
            due = min([self._next_cycle, *(p.next_due for p in self.peers.values())])
            if due <= now:
                return
            try:
                marks = self._snapshot_marks(self.nd) if self.nd is not None else self._marks
            except OSError:
                marks = self._marks
            if marks != self._marks:
                for p in self.peers.values():
                    if not p.failures:
                        p.next_due = now
                return
            time.sleep(min(POLL, due - now))


def run_node(directory: str, socket_path: str | None, socket_mode: int, interval: float) -> int:
    """`bunker node run`: the exit code."""
    return Daemon(directory, socket_path, socket_mode, interval).run()
