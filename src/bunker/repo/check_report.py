"""What `bunker check` found: problems, each naming its object, and counts."""

from __future__ import annotations

import datetime
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


def utc(t: float) -> str:
    """A time for a problem message; a forged time beyond any calendar is shown as it is."""
    try:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return repr(t)


@dataclass
class Problem:
    object: str
    problem: str
    severity: str = "err"  # "err" damages or forgeries; "warn" things that need attention
    # what put it there, so the closing advice fits: "damage" (a mirror helps) or "other-secret"
    # (written with a damaged put key: a new backup and prune help, a mirror holds the same bytes)
    cause: str = "damage"

    def to_json(self) -> dict[str, str]:
        return {"object": self.object, "problem": self.problem, "severity": self.severity, "cause": self.cause}


@dataclass
class CheckReport:
    repo_id: str = ""
    authenticated: bool = False  # the id was pinned by --expect or a key
    mode: str = "keyless"
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, obj: str, problem: str, severity: str = "err", cause: str = "damage") -> None:
        with self._lock:
            self.problems.append(Problem(obj, problem, severity, cause))

    @property
    def ok(self) -> bool:
        return not any(p.severity == "err" for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.repo_id,
            "authenticated": self.authenticated,
            "mode": self.mode,
            "ok": self.ok,
            "counts": dict(self.counts),
            "bytes_read": self.bytes_read,
            "problems": [p.to_json() for p in self.problems],
        }


