"""glibc's heap: handing freed memory back to the system.

Building the chunk index of millions of entries allocates and frees several hundred MB of
temporaries; glibc keeps most of that in its heap (freed blocks below its dynamic mmap
threshold), so the process's RSS stays at the peak long after. ``malloc_trim`` returns it:
measured at 1 M chunks, 170 -> 56 B per chunk of resident memory (docs/performance.md, "Scale").
"""

from __future__ import annotations

import sys
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked = False


def give_back() -> None:
    """Return the heap's free memory to the system (glibc; elsewhere nothing happens). Costs a
    walk over the heap's free blocks: call it after freeing a lot, not in a loop."""
    global _trim, _looked
    if not _looked:
        _looked = True
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):
                _trim = None  # not glibc (musl has no malloc_trim)
    if _trim is not None:
        _trim(0)
