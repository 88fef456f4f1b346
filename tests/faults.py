"""A backend wrapper that injects the faults real storage shows: requests that fail (a dropped
connection after the retries), slow requests, and torn writes (the storage acknowledges a put but
keeps only the first part of the object). It wraps a real backend: the objects that do get
through are stored for real."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bunker.errors import ExitCode, StorageError
from bunker.storage.backend import Backend, Capabilities, ObjectInfo


@dataclass
class FaultPlan:
    """Which requests go wrong. ``fail_after``: this many puts succeed, then every request fails
    (the storage went away) until ``heal()``. ``fail_puts``: these put numbers (1-based) fail
    once. ``torn``: names whose put stores only the first half. ``delay``: seconds added to every
    request. ``match``: only puts of names with this prefix count."""

    fail_after: int | None = None
    fail_puts: set[int] = field(default_factory=set)
    torn: Callable[[str], bool] = lambda name: False
    delay: float = 0.0
    match: str = ""


class FaultyBackend(Backend):
    """``inner`` with the faults of ``plan``; ``log`` records what was injected."""

    def __init__(self, inner: Backend, plan: FaultPlan) -> None:
        self.inner, self.plan = inner, plan
        self.url = inner.url
        self.puts = 0
        self.down = False
        self.log: list[str] = []
        self._lock = threading.Lock()

    def heal(self) -> None:
        self.down = False
        self.plan.fail_after = None

    def _fault(self, what: str) -> StorageError:
        self.log.append(what)
        return StorageError(f"injected fault: {what}", "the test's storage went away", exit_code=ExitCode.NO_REPOSITORY)

    def _gate(self, what: str) -> None:
        if self.plan.delay:
            time.sleep(self.plan.delay)
        if self.down:
            raise self._fault(what)

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        self._gate(f"put {name}")
        if name.startswith(self.plan.match):
            with self._lock:
                self.puts += 1
                n = self.puts
            if self.plan.fail_after is not None and n > self.plan.fail_after:
                self.down = True
                raise self._fault(f"put {name} (storage gone)")
            if n in self.plan.fail_puts:
                raise self._fault(f"put {name} (one failure)")
        if self.plan.torn(name):
            self.log.append(f"torn {name}")
            return self.inner.put(name, bytes(data[: len(data) // 2]), if_absent=if_absent)
        return self.inner.put(name, data, if_absent=if_absent)

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        self._gate(f"get {name}")
        return self.inner.get(name, offset, length)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._gate(f"list {prefix}")
        return iter(list(self.inner.list(prefix)))

    def _delete(self, name: str) -> None:
        self._gate(f"delete {name}")
        self.inner.delete(name)

    def _stat(self, name: str) -> ObjectInfo | None:
        self._gate(f"stat {name}")
        return self.inner.stat(name)

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()
