"""The parts of a pack set or chunk set end where docs/format.md section 12 says: after an item
whose BLAKE3 hash, read as a little-endian integer, has its low 11 bits all zero. Checked
against that sentence taken literally, so a faster reading of the rule cannot change the
format (every reader and every other writer splits the same way)."""

from __future__ import annotations

import os

import blake3

from bunker.repo.refs import _split


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
