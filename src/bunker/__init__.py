"""Bunker: secure, deduplicating backups that need no password to take."""

import os

__version__ = "0.1.0"

# numpy (the index and chunk-set arrays: sorting, searching) loads OpenBLAS, which starts a
# thread per core that spins for work bunker never gives it: ~70 ms of a core in a backup of
# 200,000 files (docs/performance.md). A user's own setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
