"""The chunk set of this client's last snapshot, remembered with the root tree it was made for
and the layout of its parts.

A snapshot's chunk set (docs/format.md section 12) is a function of its root tree: trees are
named by their content, and a tree names its files' chunks and its subtrees, so the same root
names the same chunks. A run in which nothing changed ends with its last snapshot's root, and
building the set again (sorting the ids, hashing each to cut the parts, encrypting them) costs
~0.15 s per 200,000 chunks for objects that exist already. Such a run names the remembered set
instead, once it has checked that its objects are still in the repository (reference objects
are never deleted, but a repository can lose objects) and that it holds as many chunks as the
run collected. A run whose set differs in a few ids (a changed file, or only the directories
above the backed-up paths: their times change when anything is created beside them) builds it
from the layout (refs.rebuild_chunkset): the parts it shares with the last set are named again,
only the others are cut and encrypted. The memo lives in the client's cache directory; without
it the set is built.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.private_files import write_private_file
from bunker.repo import refs
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.objects import check_ref
from bunker.repo.repository import Repository

FILE = "chunkset.last"


@dataclass(frozen=True)
class ChunkSetMemo:
    root: bytes
    top: str  # refs/<hash> of the top object
    parts: list[str]
    count: int
    layout: refs.PartLayout | None  # None in a memo an older version wrote

    def usable(self, repo: Repository, root: bytes, count: int) -> bool:
        """Whether a run with ``root`` and ``count`` chunks may name this set: same root and
        count, and every object of the set in the repository."""
        if root != self.root or count != self.count:
            return False
        return all(repo.backend.exists(name) for name in (self.top, *self.parts))


def recall(cache_dir: str) -> ChunkSetMemo | None:
    """The memo the last run left, or None (none, unreadable, or of another shape)."""
    try:
        with open(os.path.join(cache_dir, FILE), "rb") as f:
            m = encoding.expect_map(encoding.unpack(f.read()), "root", "top", "parts", "count")
        parts = encoding.field(m, "parts", list)
        layout = None
        if "ends" in m and "digests" in m:
            ends, digests = encoding.field(m, "ends", list), encoding.field(m, "digests", list)
            if len(ends) == len(digests) == len(parts) and all(type(x) is bytes for x in (*ends, *digests)):
                layout = refs.PartLayout(ends, digests, parts)
        memo = ChunkSetMemo(
            encoding.field_bytes(m, "root"),
            encoding.field(m, "top", str),
            parts,
            encoding.field(m, "count", int),
            layout,
        )
        for name in (memo.top, *parts):
            check_ref(name, "refs")
    except (OSError, encoding.FormatError, ValueError):
        return None
    return memo


def build(
    repo: Repository, chunk_ids: ChunkIdSet, secrets: PutSecrets, memo: ChunkSetMemo | None
) -> tuple[dict[str, bytes], refs.PartLayout]:
    """The objects of the chunk set of ``chunk_ids`` and its layout: from the memo's layout
    where the set shares parts with the last one and they are still in the repository, else
    built whole."""
    if memo is not None and memo.layout is not None:
        got = refs.rebuild_chunkset(chunk_ids, secrets, memo.layout)
        if got is not None and all(repo.backend.exists(name) for name in got[2]):
            return got[0], got[1]
    return refs.build_chunkset_layout(chunk_ids, secrets)


def remember(cache_dir: str, root: bytes, top: str, layout: refs.PartLayout, count: int) -> None:
    """Keep the chunk set just written for ``root`` (best effort: without room, the next run
    builds the set again)."""
    data = encoding.pack(
        {
            "root": root,
            "top": top,
            "parts": layout.names,
            "count": count,
            "ends": layout.ends,
            "digests": layout.digests,
        }
    )
    with contextlib.suppress(OSError):
        write_private_file(os.path.join(cache_dir, FILE), data, durable=False)
