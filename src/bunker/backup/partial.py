"""The tree of what a running backup has finished so far (for checkpoints, issue 5).

The archiver finishes directories in post-order; at any moment some are in progress: on the walk
stack, waiting for their files, or virtual ancestors of the paths named on the command line. A
partial tree keeps, of each directory in progress, the entries that are final: items other than
regular files, regular files whose content is stored, finished subdirectories, and (recursively)
the partial trees of subdirectories in progress. Files still being read and further names of
hard links not yet resolved are left out. Runs on the archiver's main thread, the only one that
adds entries; worker threads only complete entries (one dict.update each, atomic under the GIL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bunker.encoding import FormatError
from bunker.repo.tree import fit_entry


class _Job(Protocol):
    entries: list[dict[str, Any]]
    parent_entry: dict[str, Any] | None


@dataclass
class VirtualFrame:
    """An ancestor of the named paths being built (archiver._virtual_dir): its finished
    entries, the holder job of its walked children, and the virtual child in progress."""

    done: list[dict[str, Any]] = field(default_factory=list)
    holder: _Job | None = None
    current: dict[str, Any] | None = None


def partial_root(
    frames: list[VirtualFrame],
    jobs: Iterable[_Job],
    root_entry: dict[str, Any] | None,
    store_tree: Callable[[list[dict[str, Any]]], bytes],
) -> tuple[bytes | None, set[bytes]]:
    """(root tree id, the chunk ids of the trees and entries it adds) of what is finished, or
    (None, set()) when nothing is in progress; finished subtrees count only by their tree id.
    ``root_entry``: the entry whose "st" is the root when "/" itself is backed up (no virtual
    frames)."""
    by_parent = {id(j.parent_entry): j for j in jobs if j.parent_entry is not None}
    chunks: set[bytes] = set()

    def tree(entries: list[dict[str, Any]]) -> bytes:
        tid = store_tree(entries)
        chunks.add(tid)
        return tid

    def final(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for orig in list(entries):
            e = dict(orig)
            kind = e.get("t")
            if kind is None or e.pop("drop", False):
                continue  # a further name of a hard link not yet resolved, or not backed up
            if kind == "f" and "c" not in e:
                continue  # still being read
            if kind == "d" and "st" not in e:
                job = by_parent.get(id(orig))
                if job is None:
                    continue
                e["st"] = tree(final(job.entries))
            try:
                fit_entry(e)  # on the copy, silently: the directory's final tree reports it
            except FormatError:
                continue
            chunks.update(e.get("c", ()))
            if kind == "d":
                chunks.add(e["st"])
            out.append(e)
        return out

    if not frames:
        if root_entry is None:
            return None, set()
        if "st" in root_entry:
            chunks.add(root_entry["st"])
            return root_entry["st"], chunks
        job = by_parent.get(id(root_entry))
        return (tree(final(job.entries)), chunks) if job is not None else (None, set())

    def frame_tree(i: int) -> bytes:
        f = frames[i]
        entries = final(f.done)
        if f.holder is not None:
            entries += final(f.holder.entries)
        if f.current is not None and i + 1 < len(frames):
            entries.append({**f.current, "st": frame_tree(i + 1)})
            chunks.add(entries[-1]["st"])
        entries.sort(key=lambda e: e["n"])
        return tree(entries)

    return frame_tree(0), chunks
