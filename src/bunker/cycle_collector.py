"""How often Python's cycle collector runs in bunker's processes.

Bunker's data frees itself by reference counting; the cycle collector only finds garbage that
refers to itself (a caught exception and its frames, say). By default it runs after every 700
container objects allocated and not yet freed, and each run walks every young container and
what it holds, so a walk or a restore that builds large lists, dicts and tuples walks them
again and again while they are young, and every few hundred runs walks everything the process
holds. Measured on 200,000 small files (docs/performance.md, "The cycle collector"): the main
process of a restore spent 2.7 s of 7.4 s of CPU there, a first backup 1.1-1.3 s of 9-10.

So: what was imported before the work starts is moved out of the collector's sight for good
(``gc.freeze``: modules, classes and functions, never garbage), and the youngest generation is
collected after :data:`GEN0_THRESHOLD` allocations. Cyclic garbage still goes, only later: at most
that many objects' worth of it waits for a run.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 100_000  # container allocations (net) between two runs over the youngest objects
GEN1_THRESHOLD = 50  # runs of the youngest generation between two of the middle one
GEN2_THRESHOLD = 10  # runs of the middle generation before a full one is considered


def tune() -> None:
    """Freeze what this process holds now and collect cycles less often (module docstring).
    Call it once imports are done: at a command's start, in each worker process as it starts."""
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
