"""A live progress line on a terminal (files, bytes, rate, ETA); silent otherwise."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.text import Text

from bunker.backup.archiver import Progress
from bunker.cli.output import human_bytes
from bunker.runlog import display_path


def _count_totals(paths: list[str], p: Progress, stop: threading.Event) -> None:
    files = size = 0
    stack = [os.path.abspath(x) for x in paths]
    while stack and not stop.is_set():
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            files += 1
                            size += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
        except NotADirectoryError:
            with contextlib.suppress(OSError):
                files, size = files + 1, size + os.lstat(top).st_size
        except OSError:
            pass
    if not stop.is_set():
        p.total_files, p.total_bytes = files, size


class ProgressDisplay:
    """Shows ``Progress`` on stderr while a backup runs, if stderr is a terminal."""

    def __init__(self, progress: Progress, paths: list[str], enabled: bool | None = None) -> None:
        self.p = progress
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._live: Live | None = None
        if self.enabled and paths:
            threading.Thread(target=_count_totals, args=(paths, progress, self._stop), daemon=True).start()

    def render(self) -> Text:
        p = self.p
        el = max(time.monotonic() - self._t0, 1e-6)
        rate = p.nbytes / el
        line = f"{p.files} files  {human_bytes(p.nbytes)}  {human_bytes(rate)}/s"
        if p.total_bytes:
            frac = min(p.nbytes / p.total_bytes, 1.0)
            eta = (p.total_bytes - p.nbytes) / rate if rate > 0 else 0
            line += f"  {frac * 100:5.1f}% of {human_bytes(p.total_bytes)}  ETA {int(eta // 60)}:{int(eta % 60):02d}"
        cur = display_path(p.current)[-60:]
        return Text(f"{line}  {cur}", no_wrap=True, overflow="ellipsis")

    def __enter__(self) -> ProgressDisplay:
        if self.enabled:
            self._live = Live(
                self.render(),
                console=Console(stderr=True),
                refresh_per_second=4,
                transient=True,
                get_renderable=self.render,
            )
            self._live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.__exit__(et, ev, tb)
