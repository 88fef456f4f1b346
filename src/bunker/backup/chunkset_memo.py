"""The chunk set of this client's last snapshot, remembered with the root tree it was made for.

A snapshot's chunk set (docs/format.md section 12) is a function of its root tree: trees are
named by their content, and a tree names its files' chunks and its subtrees, so the same root
names the same chunks. A run in which nothing changed ends with its last snapshot's root, and
building the set again (sorting the ids, hashing each to cut the parts, encrypting them) costs
~0.15 s per 200,000 chunks for objects that exist already. Such a run names the remembered set
instead, once it has checked that its objects are still in the repository (reference objects
are never deleted, but a repository can lose objects) and that it holds as many chunks as the
run collected. The memo lives in the client's cache directory; without it the set is built.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from bunker import encoding
from bunker.private_files import write_private_file
from bunker.repo import refs
from bunker.repo.objects import check_ref
from bunker.repo.repository import Repository

FILE = "chunkset.last"


@dataclass(frozen=True)
class ChunkSetMemo:
    root: bytes
    top: str  # refs/<hash> of the top object
    parts: list[str]
    count: int

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
        memo = ChunkSetMemo(
            encoding.field_bytes(m, "root"), encoding.field(m, "top", str), parts, encoding.field(m, "count", int)
        )
        for name in (memo.top, *parts):
            check_ref(name, "refs")
    except (OSError, encoding.FormatError, ValueError):
        return None
    return memo


def remember(cache_dir: str, root: bytes, chunkset: dict[str, bytes], count: int) -> None:
    """Keep the chunk set just written for ``root`` (best effort: without room, the next run
    builds the set again)."""
    top = refs.top_name(chunkset)
    parts = [n for n in chunkset if n not in ("top", top)]
    data = encoding.pack({"root": root, "top": top, "parts": parts, "count": count})
    with contextlib.suppress(OSError):
        write_private_file(os.path.join(cache_dir, FILE), data, durable=False)

