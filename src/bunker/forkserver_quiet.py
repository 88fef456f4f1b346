"""Imported by the forkserver of bunker's worker pools (process_pool.py), and only there.

A worker the forkserver forks while its command is being stopped (a signal came while the pool
was starting workers) cannot read its task: the command has closed the pipe and removed the
pool's semaphores. The forkserver prints such a failure as a traceback on the command's
terminal, after the command's own message about the stop, which already says what happened.
Failures of the hand-over itself (end of file, a vanished pipe or semaphore: EOFError or
OSError with no frame of bunker's on the stack) are not printed; any other failure is.
"""

from __future__ import annotations

import sys
from types import TracebackType

_default = sys.excepthook


def _hand_over_failed(kind: type[BaseException], tb: TracebackType | None) -> bool:
    if not issubclass(kind, (EOFError, OSError)):
        return False
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith("bunker"):
            return False  # the worker's own code ran: a real failure
        tb = tb.tb_next
    return True


def _hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if not _hand_over_failed(kind, tb):
        _default(kind, value, tb)


sys.excepthook = _hook
