"""Liveness (prune's marking, repo/liveness.py): the columns of chunk copies answer what the
plain model answers: a copy (chunk, pack) is live if some root names the chunk in its chunk set
and the pack in its resolved pack set; blob bytes count each copy once, however often index
objects list it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bunker.repo.copy_table import CopiesBuilder
from bunker.repo.liveness import Liveness

PACKS = [f"{i:064x}" for i in range(6)]
# ids that share their first 8 or 16 bytes, so the sort's tie-breaking is exercised
IDS = [bytes([i]) * 32 for i in range(12)] + [bytes(8) + bytes([i]) * 24 for i in range(3)]
IDS += [bytes(16) + bytes([i]) * 16 for i in range(3)]

copy = st.tuples(st.sampled_from(IDS), st.sampled_from(PACKS), st.integers(1, 5000))
root = st.tuples(st.lists(st.sampled_from(IDS), max_size=10), st.sets(st.sampled_from(PACKS + ["f" * 64])))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(copy, max_size=12), max_size=5), st.lists(root, max_size=4), st.integers(1, 4))
def test_marks_what_the_plain_model_marks(
    batches: list[list[tuple[bytes, str, int]]], roots: list[tuple[list[bytes], set[str]]], split: int
) -> None:
    contents: dict[str, dict[bytes, int]] = {}  # pack -> chunk -> length (an id listed twice: once)
    for b in batches:
        for cid, pack, length in b:
            contents.setdefault(pack, {}).setdefault(cid, length)
    found = CopiesBuilder()
    for b in batches:  # a copy listed again (by another index object) is the same blob: same length
        found.add((cid, pack, contents[pack][cid]) for cid, pack, _ in b)
    liveness = Liveness(found)
    live: dict[str, set[bytes]] = {}
    for chunks, packs in roots:
        mask = liveness.pack_mask(packs)
        for i in range(0, len(chunks), split):  # a chunk set's parts, one at a time
            liveness.mark(b"".join(chunks[i : i + split]), mask)
        for cid in chunks:
            for p in packs:
                if cid in contents.get(p, {}):
                    live.setdefault(p, set()).add(cid)
    for p in PACKS + ["f" * 64]:
        assert liveness.has_pack(p) == (p in contents)
        c = contents.get(p, {})
        assert liveness.chunk_ids(p) == set(c)
        assert liveness.live_ids(p) == live.get(p, set())
        assert liveness.blob_bytes(p) == sum(c.values())
        assert liveness.live_bytes(p) == sum(c[cid] for cid in live.get(p, ()))


def test_nothing_is_live_without_roots_and_an_empty_domain_works() -> None:
    empty = Liveness(CopiesBuilder())
    empty.mark(IDS[0], empty.pack_mask(PACKS))
    assert not empty.has_pack(PACKS[0]) and empty.live_bytes(PACKS[0]) == 0 and empty.live_ids(PACKS[0]) == set()
    found = CopiesBuilder()
    found.add([(IDS[0], PACKS[0], 10)])
    one = Liveness(found)
    assert one.blob_bytes(PACKS[0]) == 10 and one.live_bytes(PACKS[0]) == 0
    one.mark(IDS[0], one.pack_mask([PACKS[1]]))  # named, but in a pack set without its pack
    assert one.live_ids(PACKS[0]) == set()
    one.mark(IDS[0], one.pack_mask([PACKS[0]]))
    assert one.live_ids(PACKS[0]) == {IDS[0]} and one.live_bytes(PACKS[0]) == 10
