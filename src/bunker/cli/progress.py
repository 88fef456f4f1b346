"""Progress of a backup on stderr: a live line on a terminal (files, bytes, rate, ETA), and without
one (cron, systemd) a plain line every 30 s, so a log shows that a long run is working
(``backup --progress=auto|always|never``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

from bunker.backup.archiver import Progress
from bunker.child_env import child_env
from bunker.cli.output import human_bytes
from bunker.runlog import display_path

if TYPE_CHECKING:  # rich is loaded only for a live display on a terminal (~14 ms otherwise lost)
    from rich.live import Live
    from rich.text import Text


class TotalsCounter:
    """Counts the files and bytes to back up in a process of its own (cli/count_tree.py) and
    puts them into ``progress`` when done."""

    def __init__(self, paths: list[str], progress: Progress) -> None:
        self.p = progress
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "count_tree.py")
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-I", "-S", script, *paths],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=child_env(),
            )
        except OSError:
            self.proc = None  # no percent and no ETA: the backup itself is not affected
            return
        threading.Thread(target=self._read, name="bunker-count", daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(OSError, ValueError):
            out = self.proc.stdout.read() if self.proc.stdout else b""
            files, size = (int(x) for x in out.split())
            self.p.total_files, self.p.total_bytes = files, size

    def stop(self) -> None:
        """End the count if it still runs (the backup is over)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


PROGRESS_MODES = ("auto", "always", "never")
COUNT_AFTER_LIVE = 1.0  # seconds a run with a live line lasts before its totals are counted
# the same for a line every interval (at most half the interval): the first line needs the totals
# only after the interval (30 s), and a run that ends before then wasted the count's walk
COUNT_AFTER_LINES = 15.0
LINE_SECONDS = 30.0
# the interval of the plain lines; tests make it short (a test cannot wait 30 s per line)
INTERVAL_VARIABLE = "BUNKER_PROGRESS_INTERVAL"


def line_interval() -> float:
    try:
        seconds = float(os.environ.get(INTERVAL_VARIABLE, LINE_SECONDS))
    except ValueError:
        return LINE_SECONDS
    return seconds if seconds > 0 else LINE_SECONDS


class ProgressDisplay:
    """Shows ``Progress`` on stderr while a backup runs. ``mode``: ``auto`` shows a live line on a
    terminal and a plain line every 30 s otherwise, except with --json; ``always`` does so with
    --json too (stderr never mixes into the JSON on stdout); ``never`` shows nothing."""

    def __init__(self, progress: Progress, paths: list[str], mode: str = "auto", as_json: bool = False) -> None:
        self.p = progress
        shown = mode == "always" or (mode == "auto" and not as_json)
        self.live = shown and sys.stderr.isatty()
        self.lines = shown and not self.live
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._live: Live | None = None
        self._liner: threading.Thread | None = None
        self._counter: TotalsCounter | None = None
        self._count_later: threading.Timer | None = None
        if (self.live or self.lines) and paths:
            # the count walks the whole tree once more, competing for the cores: a run shorter
            # than the delay (a backup in which little changed) shows no line that needs it
            delay = COUNT_AFTER_LIVE if self.live else min(COUNT_AFTER_LINES, line_interval() / 2)
            self._count_later = threading.Timer(delay, self._start_count, (paths,))
            self._count_later.daemon = True
            self._count_lock = threading.Lock()

    def _start_count(self, paths: list[str]) -> None:
        with self._count_lock:
            if not self._stop.is_set():
                self._counter = TotalsCounter(paths, self.p)

    def summary(self) -> str:
        """Files, bytes, rate and, once the sizes are counted, percent done and time left."""
        p = self.p
        el = max(time.monotonic() - self._t0, 1e-6)
        rate = p.nbytes / el
        line = f"{p.files} files  {human_bytes(p.nbytes)}  {human_bytes(rate)}/s"
        if p.total_bytes:
            frac = min(p.nbytes / p.total_bytes, 1.0)
            eta = (p.total_bytes - p.nbytes) / rate if rate > 0 else 0
            line += f"  {frac * 100:5.1f}% of {human_bytes(p.total_bytes)}  ETA {int(eta // 60)}:{int(eta % 60):02d}"
        return line

    def render(self) -> Text:
        from rich.text import Text

        cur = display_path(self.p.current)[-60:]
        return Text(f"{self.summary()}  {cur}", no_wrap=True, overflow="ellipsis")

    def _print_lines(self, interval: float) -> None:
        while not self._stop.wait(interval):
            el = int(time.monotonic() - self._t0)
            where = f"  at {display_path(self.p.current)}" if self.p.current else ""
            text = f"bunker: backup running for {el // 60}:{el % 60:02d}: {self.summary()}{where}\n"
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(text)
                sys.stderr.flush()

    def __enter__(self) -> ProgressDisplay:
        if self._count_later is not None:
            self._count_later.start()
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                self.render(),
                console=Console(stderr=True),
                refresh_per_second=4,
                transient=True,
                get_renderable=self.render,
            )
            self._live.__enter__()
        elif self.lines:
            self._liner = threading.Thread(
                target=self._print_lines, args=(line_interval(),), name="bunker-progress", daemon=True
            )
            self._liner.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._count_later is not None:
            self._count_later.cancel()
            with self._count_lock:  # a count starting now sees the stop and does not start
                if self._counter is not None:
                    self._counter.stop()
        if self._liner is not None:
            self._liner.join(timeout=5)
        if self._live is not None:
            self._live.__exit__(et, ev, tb)
