"""Hard links in a backup run (FORMAT.md section 14).

The first name of a hard-linked inode met in the walk is backed up like any other item, its
entry marked with ``ino`` and ``nl``; every further name gets a copy of that entry (same
``ino``), so the data is read and stored once. A further name met while the first one's content
is still being read is a waiter: it counts as pending in its directory, which therefore is not
finished before the copy is made.

The archiver owns one :class:`HardLinks` per run and hands it the lock over the directories'
pending counts and a way to wake its main thread, so the two stay consistent without this module
knowing the archiver.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bunker.runlog import RunLog


class _Job(Protocol):
    """What is used of the archiver's directory in progress."""

    entries: list[dict[str, Any]]
    pending: int


@dataclass
class _Link:
    """A hard-linked inode met in this run: the entry of its first name, final once read."""

    entry: dict[str, Any]
    path: bytes
    nlink: int
    kind: int  # stat.S_IFMT: a reused inode number of another kind is another inode
    seen: int = 1
    final: dict[str, Any] | None = None  # the first entry's keys but its name (None: not stored)
    done: bool = False
    waiters: list[tuple[dict[str, Any], _Job, bytes]] = field(default_factory=list)


class HardLinks:
    """The hard-linked inodes of one run.

    :meth:`first_name` and :meth:`other_name` run on the walking thread; :meth:`read_done` on
    whichever thread records the read of a first name. ``lock`` guards the directories'
    ``pending`` counts (and the links' waiters with them); ``wake`` tells the walking thread a
    count went down.
    """

    def __init__(self, lock: threading.Lock, wake: Callable[[], None], log: RunLog) -> None:
        self._lock = lock
        self._wake = wake
        self._log = log
        self._links: dict[tuple[int, int], _Link] = {}  # (st_dev, st_ino) -> first name
        # id(first entry) -> its link while its content is read; checked on every recorded
        # read, so the common case (no link being read) costs one truth test
        self.reading: dict[int, _Link] = {}
        self._ids: set[int] = set()  # the "ino" values given out in this run

    def first_name(self, e: dict[str, Any], st: os.stat_result, path: bytes, reading: bool) -> None:
        """Remember the first name of a hard-linked inode; ``reading``: its entry is final only
        once its content is read (then :meth:`read_done` is due)."""
        lid = st.st_ino  # stable from run to run, so unchanged trees stay identical
        while lid in self._ids:  # the same number on another filesystem of this backup
            lid += 1
        self._ids.add(lid)
        e["ino"] = lid
        e["nl"] = st.st_nlink
        link = _Link(e, path, st.st_nlink, stat.S_IFMT(st.st_mode))
        self._links[(st.st_dev, st.st_ino)] = link
        if reading:
            self.reading[id(e)] = link
        else:
            self._done(link)

    def read_done(self, entry: dict[str, Any]) -> None:
        """The read of ``entry`` is recorded: if it is a first name, give its waiters their copy."""
        link = self.reading.pop(id(entry), None)
        if link is not None:
            self._done(link)

    def other_name(self, job: _Job, name: bytes, path: bytes, st: os.stat_result) -> bool:
        """Add a further name of an inode already met to ``job`` (True), or return False."""
        key = (st.st_dev, st.st_ino)
        link = self._links.get(key)
        if link is None or link.kind != stat.S_IFMT(st.st_mode):
            return False
        e: dict[str, Any] = {"n": name}
        job.entries.append(e)
        link.seen += 1
        if link.seen >= link.nlink:
            del self._links[key]  # every name met: forget it
        with self._lock:
            if not link.done:
                link.waiters.append((e, job, path))
                job.pending += 1
                return True
        self._copy(link, e, path)
        return True

    def _done(self, link: _Link) -> None:
        first = link.entry
        with self._lock:
            link.final = None if first.get("drop") else {k: v for k, v in first.items() if k != "n"}
            link.done = True
            waiters, link.waiters = link.waiters, []
        for e, job, path in waiters:
            self._copy(link, e, path)
            with self._lock:
                job.pending -= 1
        if waiters:
            self._wake()

    def _copy(self, link: _Link, e: dict[str, Any], path: bytes) -> None:
        if link.final is None:
            e["drop"] = True
            self._log.add(
                "note",
                "link-dropped",
                f"hard link of {link.path.decode('utf-8', 'backslashreplace')}, which could not be backed up; "
                "it is not in this backup either",
                path,
            )
        else:
            e.update(link.final)
