"""A run's log: events with levels; the run's level is the highest (promise 7)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("ok", "note", "warn", "err", "fatal")


def display_path(path: bytes | str | None) -> str:
    """A path for humans: undecodable bytes shown as \\xNN escapes, never lost."""
    if path is None:
        return ""
    if isinstance(path, str):
        return path
    return path.decode("utf-8", "backslashreplace")


@dataclass
class Event:
    level: str
    code: str
    message: str
    path: bytes | None = None
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"level": self.level, "code": self.code, "message": self.message, "time": self.time}
        if self.path is not None:
            d["path"] = self.path
        return d

    def to_json(self) -> dict[str, Any]:
        d = self.to_dict()
        if self.path is not None:
            d["path"] = display_path(self.path)
        return d


class RunLog:
    """Thread-safe list of events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[Event] = []

    def add(self, level: str, code: str, message: str, path: bytes | None = None) -> Event:
        assert level in LEVELS
        ev = Event(level, code, message, path)
        with self._lock:
            self.events.append(ev)
        return ev

    def os_error(self, level: str, code: str, path: bytes, exc: OSError, what: str) -> Event:
        return self.add(
            level, code, f"{what}: {exc.strerror or exc} (errno {exc.errno} {os.strerror(exc.errno or 0)})", path
        )

    @property
    def level(self) -> str:
        with self._lock:
            return max((e.level for e in self.events), key=LEVELS.index, default="ok")

    def count(self, level: str) -> int:
        with self._lock:
            return sum(1 for e in self.events if e.level == level)
