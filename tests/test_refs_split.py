"""The parts of a pack set or chunk set end where docs/format.md section 12 says: after an item
whose BLAKE3 hash, read as a little-endian integer, has its low 11 bits all zero. Checked
against that sentence taken literally, so a faster reading of the rule cannot change the
format (every reader and every other writer splits the same way)."""

from __future__ import annotations

import os

import blake3
import pytest

from bunker.repo import chunk_id_set
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.refs import _split, _split_blocks


def _literal(items: list[bytes]) -> list[list[bytes]]:
    parts: list[list[bytes]] = []
    cur: list[bytes] = []
    for it in items:
        cur.append(it)
        if int.from_bytes(blake3.blake3(it).digest(), "little") & 0x7FF == 0:
            parts.append(cur)
            cur = []
    if cur or not parts:
        parts.append(cur)
    return parts


def test_parts_end_where_the_format_says() -> None:
    ids = sorted(os.urandom(32) for _ in range(50_000))
    got = list(_split(ids))
    assert got == _literal(ids) and len(got) > 10
    names = sorted(f"{i:064x}".encode() for i in range(5_000))
    assert list(_split(names)) == _literal(names)
    assert list(_split([])) == [[]]


def test_parts_cut_from_blocks_are_the_same_parts() -> None:
    """A set read in blocks (a large chunk-id set, 65,536 ids a block) is split as if whole: a
    part may span blocks, and a block may end right after a part's last item."""
    ids = sorted(os.urandom(32) for _ in range(20_000))
    whole = _literal(ids)
    for size in (1, 7, 1000, 4096):
        blocks = [ids[i : i + size] for i in range(0, len(ids), size)]
        assert list(_split_blocks(blocks)) == whole, size
    ends = [sum(len(p) for p in whole[: k + 1]) for k in range(3)]
    blocks = [ids[: ends[0]], ids[ends[0] : ends[2]], ids[ends[2] :]]  # blocks that end where parts do
    assert list(_split_blocks(blocks)) == whole
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk_id_set, "_RUN", 5000)  # sorted into arrays: read back in blocks of bytes
        s = ChunkIdSet(ids)
        assert [list(b) for b in s.blocks(3000)] == [ids[i : i + 3000] for i in range(0, len(ids), 3000)]
    assert list(ChunkIdSet(ids).blocks()) == [tuple(ids)]  # a small set: one block
