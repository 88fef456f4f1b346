"""The pack trailers `check` compares index entries with (repo/trailer_spans.py): only a few
packs' spans are open as dicts at a time, and interleaved index objects make more stay open
instead of building the same dicts again and again."""

from __future__ import annotations

import os

from bunker.repo.pack import BlobEntry
from bunker.repo.trailer_spans import OpenedTrailers, PackBlobs, span


class CountingTrailers(dict[str, PackBlobs]):
    """The first pass's trailers, counting how often a pack's spans are built (each build
    reads its trailer from here once)."""

    reads = 0

    def get(self, key: str, default: PackBlobs | None = None) -> PackBlobs | None:  # type: ignore[override]
        self.reads += 1
        return super().get(key, default)


def _trailers(packs: int, blobs: int) -> tuple[CountingTrailers, dict[str, list[BlobEntry]]]:
    trailers, entries = CountingTrailers(), {}
    for p in range(packs):
        es = [BlobEntry(os.urandom(32), 0, 100 * i, 90 + p, 200 + i, b"") for i in range(blobs)]
        trailers[f"pack{p}"], entries[f"pack{p}"] = PackBlobs.of(es), es
    return trailers, entries


def test_spans_are_the_trailers_blobs() -> None:
    trailers, entries = _trailers(3, 50)
    opened = OpenedTrailers(trailers)
    for pack, es in entries.items():
        spans = opened.get(pack)
        assert spans == {e.chunk_id: span(e.offset, e.length, e.raw_length) for e in es}
    assert opened.get("absent") is None


def test_a_writers_packs_one_after_another_keep_few_open() -> None:
    trailers, entries = _trailers(20, 10)
    opened = OpenedTrailers(trailers)
    for pack in entries:
        for _ in range(10):  # one lookup per entry, a pack's entries together
            assert opened.get(pack) is not None
        assert len(opened._open) <= OpenedTrailers.KEEP
    assert trailers.reads == 20 and opened.keep == OpenedTrailers.KEEP


def test_interleaved_packs_keep_more_open_instead_of_building_again() -> None:
    trailers, _ = _trailers(6, 10)
    opened = OpenedTrailers(trailers)
    for _ in range(100):  # entries of six packs in turn: more than KEEP
        for p in range(6):
            assert opened.get(f"pack{p}") is not None
    # the first round closed two packs; reopening each doubled what is kept, then all stay open
    assert opened.keep >= 6 and trailers.reads == 6 + 2, trailers.reads


def test_dropped_trailers_are_read_again() -> None:
    trailers, entries = _trailers(2, 5)
    again: list[str] = []

    def read_again(pack: str) -> PackBlobs | None:
        again.append(pack)
        return trailers[pack]

    opened = OpenedTrailers({}, read_again)
    assert opened.get("pack1") == {e.chunk_id: span(e.offset, e.length, e.raw_length) for e in entries["pack1"]}
    assert again == ["pack1"]
