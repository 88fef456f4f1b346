"""A regular file's tree entry, files-cache row and run-log events from what reading it gave.

The archiver builds entries on its main thread; a directory read whole in a worker process
(whole_dirs.py) builds them there. Both go through these functions, so an entry holds the same
keys whichever built it (the test of whole directories compares their trees byte for byte).
"""

from __future__ import annotations

import stat
from typing import Any

from bunker.backup.file_reader import MAX_REREADS, ReadOutcome
from bunker.backup.owners import OwnerNames
from bunker.encoding import FormatError
from bunker.fs.fsmeta import name_acl
from bunker.repo.tree import fit_entry

# (level, code, message, path) of an event for the run log (runlog.RunLog.add)
Event = tuple[str, str, str, bytes]

CHANGED_WHILE_READ = (
    f"file kept changing while it was read ({MAX_REREADS + 1} tries); the stored copy may mix old "
    "and new content: back it up again when it is idle, or snapshot the filesystem first"
)


def base_entry(
    name: bytes, kind: str, mode: int, uid: int, gid: int, mtime_ns: int, ctime_ns: int, owners: OwnerNames
) -> dict[str, Any]:
    """The keys every entry has, from its ``lstat`` fields (FORMAT.md section 14)."""
    return {
        "n": name,
        "t": kind,
        "m": stat.S_IMODE(mode),
        "u": uid,
        "g": gid,
        "U": owners.user(uid),
        "G": owners.group(gid),
        "mt": mtime_ns,
        "ct": ctime_ns,
    }


def apply_outcome(entry: dict[str, Any], r: ReadOutcome, owners: OwnerNames) -> bool:
    """Put a read's outcome into a file's entry; False when the file is not in the backup (the
    entry is then marked to be dropped)."""
    if r.status in ("ok", "changing"):
        entry.update(c=r.chunks, sz=r.size, mt=r.mtime_ns, ct=r.ctime_ns)
        if r.meta:
            entry.update(r.meta)
            if "acl" in r.meta:
                name_acl(entry["acl"], owners.user, owners.group)
        return True
    entry["c"] = []
    entry["drop"] = True  # not in the backup: the tree must not claim it
    return False


def cache_row(r: ReadOutcome) -> list[Any]:
    """The files-cache row of a file read without change (files_cache.lookup reads it)."""
    return [r.ino, r.size, r.mtime_ns, r.ctime_ns, r.chunks, r.meta or None]


def outcome_events(r: ReadOutcome, path: bytes) -> list[Event]:
    """What the run log says of a read (nothing for a plain success)."""
    out: list[Event] = [
        ("warn", "metadata-unreadable", f"{problem}; the file itself is stored", path) for problem in r.problems
    ]
    if r.status == "changing":
        out.append(("warn", "changed-while-read", CHANGED_WHILE_READ, path))
    elif r.status == "vanished":
        out.append(("note", "vanished", "file vanished before it could be read", path))
    elif r.status == "replaced":
        out.append(("note", "replaced", "file was replaced by another kind of item while it was read", path))
    elif r.status != "ok":
        out.append(("err", "read-failed", f"{r.message}; it is not in this backup", path))
    return out


def fit_entries(entries: list[dict[str, Any]], where: bytes) -> tuple[list[dict[str, Any]], list[Event]]:
    """The entries of directory ``where`` held to the tree rules readers apply (tree.fit_entry:
    1-2 µs for an ordinary entry), and an ``err`` event for each entry changed or left out.
    Metadata read from a filesystem rarely breaks them, a files cache may."""
    out = []
    events: list[Event] = []
    for e in entries:
        try:
            changes = fit_entry(e)
        except FormatError as exc:
            events.append(_bad_metadata(where, e, f"item left out: {exc}"))
            continue
        if changes:
            what = "; ".join(changes)
            events.append(_bad_metadata(where, e, f"{what} (metadata a backup cannot hold); the item itself is stored"))
        out.append(e)
    return out, events


def _bad_metadata(where: bytes, e: dict[str, Any], message: str) -> Event:
    name = e.get("n")
    path = where.rstrip(b"/") + b"/" + name if isinstance(name, bytes) else where
    return ("err", "bad-metadata", message, path)
