"""Count the files and bytes below some paths, for a backup's progress line (percent done, ETA).

Run as a script in a process of its own (``python -I -S count_tree.py PATH...``), it prints
``FILES BYTES`` when done. A thread of the backup's own process used to do this walk: it took
about a third of the interpreter's time from the backup's walk on a 200,000-file tree (the GIL
lets one of the two run at a time), whereas a process of its own runs beside it. It imports only
the standard library, so it starts in milliseconds, and it dies with the backup (PDEATHSIG on
Linux; elsewhere the backup kills it when it ends).
"""

from __future__ import annotations

import contextlib
import os
import sys


def count(paths: list[str]) -> tuple[int, int]:
    """(regular files, their apparent bytes) below ``paths``, symlinks not followed."""
    files = size = 0
    stack = [os.path.abspath(x) for x in paths]
    while stack:
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
    return files, size


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            import signal

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    _die_with_parent()
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        n, b = count(sys.argv[1:])
        sys.stdout.write(f"{n} {b}\n")
