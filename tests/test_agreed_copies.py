"""AgreedCopies (`bunker check`, repo/agreed_copies.py): the table it moves to for large
repositories answers what its dicts answer for small ones; copies added after a lookup (the
check's second listing) are seen by the next lookup."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bunker.repo import agreed_copies
from bunker.repo.agreed_copies import AgreedCopies

PACKS = [f"{i:064x}" for i in range(5)]
IDS = [bytes([i]) * 32 for i in range(10)] + [bytes(8) + bytes([i]) * 24 for i in range(3)]

copies = st.lists(st.tuples(st.sampled_from(IDS), st.sampled_from(PACKS)), max_size=15)
lookup = st.tuples(st.lists(st.sampled_from(IDS), max_size=12), st.sets(st.sampled_from(PACKS)))


def _answers(large: int, batches: list[list[tuple[bytes, str]]], later: list[tuple[bytes, str]], queries):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(agreed_copies, "LARGE", large)
        a = AgreedCopies()
        for b in batches:
            a.add(b)
        out = [a.missing_in(packs)(b"".join(ids)) for ids, packs in queries]
        a.add(later)
        out += [a.missing_in(packs)(b"".join(ids)) for ids, packs in queries]
        return out


@settings(max_examples=200, deadline=None)
@given(st.lists(copies, max_size=4), copies, st.lists(lookup, max_size=4), st.integers(1, 30))
def test_the_table_answers_as_the_dicts_do(
    batches: list[list[tuple[bytes, str]]],
    later: list[tuple[bytes, str]],
    queries: list[tuple[list[bytes], set[str]]],
    large: int,
) -> None:
    model: dict[bytes, set[str]] = {}
    for b in batches:
        for cid, pack in b:
            model.setdefault(cid, set()).add(pack)
    expected = []
    for ids, packs in queries:
        lost = [c for c in ids if not model.get(c, set()) & packs]
        expected.append((len(lost), lost[0] if lost else b""))
    for cid, pack in later:
        model.setdefault(cid, set()).add(pack)
    for ids, packs in queries:
        lost = [c for c in ids if not model.get(c, set()) & packs]
        expected.append((len(lost), lost[0] if lost else b""))
    assert _answers(1 << 30, batches, later, queries) == expected  # dicts only
    assert _answers(large, batches, later, queries) == expected  # a table from `large` chunks on
