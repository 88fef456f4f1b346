"""Pack trailers as `bunker check` keeps them for its index check: each blob's span (offset,
length, raw length) by chunk id, as columns per pack, opened as a dict for the few packs in use.
A check of 10 M chunks keeps every pack's trailer until the index objects are checked: ~48 B per
blob here, against ~200 B as a dict entry.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import NamedTuple

from bunker.repo.pack import BlobEntry

Span = int


def span(offset: int, length: int, raw_length: int) -> Span:
    return (offset << 64) | (length << 32) | raw_length


class PackBlobs(NamedTuple):
    """A pack's trailer as columns, kept for the index check (~48 B per blob instead of a dict
    entry's ~200: a check of 10 M chunks keeps every pack's)."""

    ids: bytes  # chunk ids end to end
    offsets: array[int]  # "Q"
    sizes: array[int]  # "Q": length << 32 | raw length

    @classmethod
    def of(cls, blobs: list[BlobEntry]) -> PackBlobs:
        return cls(
            b"".join(b.chunk_id for b in blobs),
            array("Q", [b.offset for b in blobs]),
            array("Q", [(b.length << 32) | b.raw_length for b in blobs]),
        )

    def spans(self) -> dict[bytes, Span]:
        """chunk id -> span of each blob."""
        ids, sizes = self.ids, self.sizes
        return {ids[32 * i : 32 * i + 32]: (off << 64) | sizes[i] for i, off in enumerate(self.offsets)}


class OpenedTrailers:
    """The spans of the packs the index check compares entries with, as dicts for the last few
    packs opened only. A writer lists a pack's entries together, so one pack at a time is open
    in the common case (a check of 200,000 small files held 24 MB of dicts with every pack's
    open); index objects that interleave more packs than are kept (a pack opened again after
    it was closed) double how many are kept, up to MAX_KEEP, so the dicts are not built over
    and over."""

    KEEP = 4
    MAX_KEEP = 256

    def __init__(
        self, trailers: dict[str, PackBlobs], again: Callable[[str], PackBlobs | None] = lambda pack: None
    ) -> None:
        """``again``: reads a trailer that is not in ``trailers`` (one dropped to save memory)."""
        self.trailers = trailers
        self.again = again
        self.keep = self.KEEP
        self._open: dict[str, dict[bytes, Span]] = {}
        self._closed: set[str] = set()

    def get(self, pack: str) -> dict[bytes, Span] | None:
        t = self._open.get(pack)
        if t is None:
            blobs = self.trailers.get(pack)
            if blobs is None:
                blobs = self.again(pack)
            if blobs is None:
                return None
            if pack in self._closed:
                self._closed.discard(pack)
                self.keep = min(2 * self.keep, self.MAX_KEEP)
            while len(self._open) >= self.keep:
                closed = next(iter(self._open))
                del self._open[closed]
                self._closed.add(closed)
            t = self._open[pack] = blobs.spans()
        return t
