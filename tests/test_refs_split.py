"""The parts of a pack set or chunk set end where docs/format.md section 12 says: after an item
whose BLAKE3 hash, read as a little-endian integer, has its low 11 bits all zero. Checked
against that sentence taken literally, so a faster reading of the rule cannot change the
format (every reader and every other writer splits the same way)."""

from __future__ import annotations

import os
import random

import blake3
import pytest

from bunker.crypto.derive import PutSecrets
from bunker.repo import chunk_id_set
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.refs import _split, _split_blocks, build_chunkset_layout, rebuild_chunkset, top_name


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


def _boundary(rng: random.Random, want: bool) -> bytes:
    """A random id that ends a part (``want``) or does not."""
    while True:
        it = rng.randbytes(32)
        if (int.from_bytes(blake3.blake3(it).digest(), "little") & 0x7FF == 0) == want:
            return it


@pytest.mark.parametrize("seed", range(12))
def test_a_chunk_set_built_again_from_an_earlier_layout_is_the_same_set(seed: int) -> None:
    """refs.rebuild_chunkset gives the objects refs.build_chunkset gives, whatever changed: ids
    added or removed anywhere (a part's last id, ids before the first or after the last part,
    ids that end a part), and re-uses every part that did not change."""
    rng = random.Random(seed)
    secrets = PutSecrets(bytes(32))
    old_ids = sorted({rng.randbytes(32) for _ in range(rng.choice([1, 3, 5000, 20_000]))})
    old_objects, layout = build_chunkset_layout(old_ids, secrets)
    new = set(old_ids)
    for _ in range(rng.randrange(0, 6)):
        what = rng.randrange(5)
        if what == 0 and new:
            new.discard(rng.choice(sorted(new)))
        elif what == 1 and len(layout.ends) > 1:
            new.discard(rng.choice(layout.ends[:-1]))  # a part's last id: two parts become one
        elif what == 2:
            new.add(_boundary(rng, True))  # a new boundary: a part splits in two
        elif what == 3:
            new.add(b"\xff" * 31 + rng.randbytes(1))  # after every other id
        else:
            new.add(_boundary(rng, False))
    if not new:
        new.add(rng.randbytes(32))
    ids = ChunkIdSet(new)
    want, want_layout = build_chunkset_layout(sorted(new), secrets)
    got = rebuild_chunkset(ids, secrets, layout)
    assert got is not None
    objects, got_layout, reused = got
    assert got_layout == want_layout
    assert top_name(objects) == top_name(want) and objects["top"] == want["top"]
    # every part is either new here (and the same object) or re-used from the old set
    assert set(reused) <= set(old_objects) and set(objects) | set(reused) == set(want)
    for name in set(objects) - {"top"}:
        assert objects[name] == want[name]
    unchanged = set(old_objects) & set(want)
    assert set(reused) == unchanged - {top_name(old_objects), "top"}


def test_a_chunk_set_rebuilt_with_nothing_changed_makes_only_its_top() -> None:
    secrets = PutSecrets(bytes(32))
    ids = sorted(os.urandom(32) for _ in range(30_000))
    objects, layout = build_chunkset_layout(ids, secrets)
    got = rebuild_chunkset(ChunkIdSet(ids), secrets, layout)
    assert got is not None
    again, again_layout, reused = got
    assert set(again) == {"top", top_name(objects)} and again_layout == layout and reused == layout.names
    assert rebuild_chunkset(ChunkIdSet(), secrets, layout) is None
