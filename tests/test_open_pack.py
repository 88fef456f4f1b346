"""A restore keeps the trailer of every pack it opens (repo/blob_reader.py's OpenPack): the same
entries the trailer lists, in a compact form."""

from __future__ import annotations

import os
import tracemalloc

from bunker.crypto import aead
from bunker.repo.blob_reader import OpenPack
from bunker.repo.pack import WRAPPED_SIZE, BlobEntry, decrypt_trailer
from test_pack_format import Built


def test_the_entries_are_the_trailers() -> None:
    built = Built(40, seed=3)
    blobs = decrypt_trailer(built.footer, built.secrets).blobs
    op = OpenPack(blobs, [aead.Cipher(os.urandom(32))])
    assert [op.get(b.chunk_id) for b in blobs] == blobs
    assert op.get(os.urandom(32)) is None
    assert op.span() == (min(b.offset for b in blobs), max(b.offset + b.length for b in blobs))
    assert OpenPack([], []).span() == (0, 0) and OpenPack([], []).get(b"x" * 32) is None


def test_a_pack_of_many_small_blobs_costs_about_200_bytes_a_blob() -> None:
    """As a dict of BlobEntry tuples a blob cost ~400 B (a restore of 200,000 small files held
    80 MB of trailers)."""
    n = 8000
    blobs = [BlobEntry(os.urandom(32), 0, 1200 + 3000 * i, 2900, 2048 + i, os.urandom(WRAPPED_SIZE)) for i in range(n)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        op = OpenPack(blobs, [])
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # the chunk ids are shared with the trailer's entries here; in a restore they are all that
    # stays of them
    assert kept < 160 * n, f"{kept / n:.0f} B per blob"
    assert op.get(blobs[-1].chunk_id) == blobs[-1]
