"""A backend that keeps working when its upstream stops answering: writes go to a local spool.

The spool is a local directory in the repository format (a partial repository): it holds a copy
of the upstream's ``config/`` and ``clients/`` objects (the *seed*, so a run can open the
repository without the upstream) and every object written while the upstream was unreachable.
``bunker forward`` (bunker.node.forward) later sends those objects upstream.

Once an upstream request fails with StorageError (after the upstream's own retries), the backend
goes *offline* for the rest of the run: every later write goes to the spool without waiting for
the upstream again, and reads and listings see only the spool. Its capabilities then say
``partial``: the listing shows part of the repository, so absence proves nothing (the chain head
comes from the client's own state, the index view from its cache).

An upstream that *refused* (StorageRefused: read-only, permissions; storage/refused.py) is
remembered as ``refused``: the backup is kept in the spool all the same, but the run reports it
as an error, since the repository will not come back by itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from bunker.errors import ObjectMissing, StorageError
from bunker.storage.backend import Backend, Capabilities, ObjectInfo
from bunker.storage.local import LocalBackend
from bunker.storage.refused import NodeStoreFull, StorageRefused
from bunker.storage.staged import StagedFile

# Copied from the upstream so the spool opens as a repository; never forwarded.
SEED_PREFIXES = ("config/", "clients/")
# What a spool holds for the upstream, in the order it must arrive there (docs/format.md section 17: packs,
# then index, then snapshot; reference objects before the snapshot that names them).
# Status records (a run's report) last: a spooled snapshot they name may be renumbered on delivery.
FORWARD_PREFIXES = ("packs/", "index/", "refs/", "retired/", "gc/", "snapshots/", "status/")


class SpoolingBackend(Backend):
    """``upstream`` with ``spool`` as the fallback for writes; ``upstream`` None: offline from the
    start (``reason`` says why, ``url`` names the upstream)."""

    def __init__(
        self,
        upstream: Backend | None,
        spool: LocalBackend,
        reason: str = "",
        url: str = "",
        refused: StorageRefused | None = None,
    ) -> None:
        self.upstream = upstream
        self.spool = spool
        self.url = upstream.url if upstream is not None else (url or spool.url)
        self.reason = reason
        self.refused = refused  # why the upstream refused, when it did (not merely unreachable)
        self.full: NodeStoreFull | None = None  # the upstream is a node without room for now
        self._lock = threading.Lock()

    @property
    def offline(self) -> bool:
        """True once the upstream failed (or was never reached): everything goes to the spool."""
        return self.upstream is None

    def _go_offline(self, exc: StorageError) -> None:
        with self._lock:
            if self.upstream is not None:
                self.upstream = None
                self.reason = exc.message
                if isinstance(exc, StorageRefused):
                    self.refused = exc
                if isinstance(exc, NodeStoreFull):
                    self.full = exc

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        up = self.upstream
        if up is not None:
            try:
                return up.put(name, data, if_absent=if_absent)
            except StorageError as exc:
                self._go_offline(exc)
        return self.spool.put(name, data, if_absent=if_absent)

    def stage(self, prefix: str) -> StagedFile | None:
        """In the spool, on this machine: an upstream that stops answering in the middle of an
        object must not take the bytes written so far with it (storage/staged.py)."""
        return self.spool.stage(prefix)

    def _put_staged(self, name: str, path: str) -> None:
        up = self.upstream
        if up is not None:
            try:
                up.put_staged(name, path)
                return
            except StorageError as exc:
                self._go_offline(exc)
        self.spool.put_staged(name, path)

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        up = self.upstream
        if up is not None:
            try:
                return up.get(name, offset, length)
            except ObjectMissing:
                return self.spool.get(name, offset, length)
            except StorageError as exc:
                self._go_offline(exc)
        try:
            return self.spool.get(name, offset, length)
        except ObjectMissing:
            raise StorageError(
                f"{name} is held only by the repository at {self.url}, which cannot be reached ({self.reason})",
                "run the command again once the repository is reachable",
            ) from None

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        up = self.upstream
        if up is not None:
            try:
                found = list(up.list(prefix))
            except StorageError as exc:
                self._go_offline(exc)
            else:
                names = {i.name for i in found}
                yield from found
                yield from (i for i in self.spool.list(prefix) if i.name not in names and prefix not in SEED_PREFIXES)
                return
        yield from self.spool.list(prefix)

    def _delete(self, name: str) -> None:
        up = self.upstream
        if up is not None:
            try:
                up.delete(name)
            except StorageError as exc:
                self._go_offline(exc)
        self.spool.delete(name)

    def _stat(self, name: str) -> ObjectInfo | None:
        up = self.upstream
        if up is not None:
            try:
                info = up.stat(name)
            except StorageError as exc:
                self._go_offline(exc)
            else:
                return info if info is not None else self.spool.stat(name)
        return self.spool.stat(name)

    def capabilities(self) -> Capabilities:
        up = self.upstream
        if up is not None:
            return up.capabilities()
        return Capabilities(create_if_absent=True, server_side_time=True, partial=True)

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        self.spool.close()


def pending_objects(spool: Backend) -> list[ObjectInfo]:
    """The spool's objects that wait for the upstream, in forwarding order."""
    return [info for prefix in FORWARD_PREFIXES for info in spool.list(prefix)]


def oldest_pending(spool: Backend) -> float | None:
    """Storage time of the oldest object waiting for the upstream, or None when there is none."""
    times = [info.mtime for info in pending_objects(spool)]
    return min(times) if times else None
