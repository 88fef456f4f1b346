"""A restore's lease on the node it reads through (docs/hierarchy.md, "Restore leases and
batches"): while the restore runs, the node leaves every pack of the snapshot it holds; a
restore that completes releases what the node fetched back for it, so the node's store returns
to its bound at once instead of after the requests' pins lapse.

The lease is renewed from a thread every third of its time; a restore killed outright stops
renewing, and the node lets the lease lapse.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from typing import Any

from bunker.errors import BunkerError

LEASE_SECONDS = 600.0


class RestoreLease:
    """The lease of one restore of ``snapshot`` (a no-op where the repository is not reached
    through a node, or through one too old to lease)."""

    def __init__(self, backend: Any, snapshot: str) -> None:
        self._call = getattr(backend, "restore_lease", None)
        self.snapshot = snapshot
        self.id = os.urandom(16).hex()
        self.held = False
        self.room: int | None = None  # bytes the node can fetch back for this restore (None: unbounded)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take the lease; False when there is no node to lease from (or it could not give one:
        the restore then runs as through a node that leases nothing, its requests' pins aside)."""
        try:
            if self._call is None or not self._ask():
                return False
        except BunkerError:
            return False
        self.held = True
        self._renewer = threading.Thread(target=self._renew_loop, name="bunker-restore-lease", daemon=True)
        self._renewer.start()
        return True

    def _ask(self, released: Iterable[str] = (), end: bool = False, done: bool = False) -> bool:
        with self._lock:
            assert self._call is not None
            got = self._call(self.snapshot, self.id, LEASE_SECONDS, sorted(released), end=end, done=done)
        if got is None:
            return False
        room = got.get("room")
        self.room = room if isinstance(room, int) else None
        return True

    def renew(self, released: Iterable[str] = ()) -> int | None:
        """Renew the lease, releasing ``released`` packs (a batch restored); the node's room now
        (as last told, when the node cannot answer this time)."""
        if self.held:
            with contextlib.suppress(BunkerError):
                self._ask(released)
        return self.room

    def _renew_loop(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                self._ask()
            except BunkerError:
                continue  # the node is away for a moment: the lease holds until it lapses

    def end(self, done: bool) -> None:
        """End the lease; ``done``: the restore completed, what was fetched for it is released
        (otherwise the requests keep it pinned for the rerun)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.held:
            self.held = False
            with contextlib.suppress(BunkerError):  # the lease then lapses on its own
                self._ask(end=True, done=done)
