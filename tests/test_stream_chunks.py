"""Streams are cut by chunker.stream_chunks in a small buffer exactly as FastCDC cuts their whole
content (and as pyfastcdc's own stream cutter, which holds twice the maximum chunk, cut them
before): a different cut would break deduplication against every earlier backup."""

from __future__ import annotations

import io
import random

import pytest
from pyfastcdc import FastCDC

from bunker.backup import chunker
from bunker.backup.chunker import stream_chunks


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read (a pipe, a slow disk)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


class ReadOnly:
    """A stream with ``read`` only."""

    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self.f.read(n)


def content(rng: random.Random, n: int) -> bytes:
    """Random bytes with runs that hold no cut (zeros) and repeats, so some chunks reach the maximum."""
    parts: list[bytes] = []
    size = 0
    while size < n:
        kind = rng.random()
        k = rng.randrange(1, 300_000)
        part = bytes(k) if kind < 0.2 else (parts[-1] if kind < 0.3 and parts else rng.randbytes(k))
        parts.append(part)
        size += len(part)
    return b"".join(parts)[:n]


@pytest.mark.parametrize("seed", range(12))
def test_the_cuts_are_those_of_the_whole_content(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    lo = rng.choice([1024, 4096, 16 << 10])  # pyfastcdc's least minimum: 1 KiB
    cdc = FastCDC(lo * 4, min_size=lo, max_size=lo * rng.choice([8, 64, 256]), seed=rng.randrange(1, 1 << 62) | 1)
    data = content(rng, rng.choice([0, 1, lo - 1, lo, 3 * lo, 1 << 20, 3 << 20]))
    monkeypatch.setattr(chunker, "STREAM_BUFFER", rng.choice([1, 4 * lo, 1 << 16]))
    whole = [bytes(c.data) for c in cdc.cut_buf(data)]
    step = rng.choice([1 << 30, 7_777, 65_536])
    assert [bytes(c) for c in stream_chunks(cdc, Trickle(data, step))] == whole
    assert [bytes(c) for c in stream_chunks(cdc, ReadOnly(data))] == whole  # type: ignore[arg-type]
    assert [bytes(c.data) for c in cdc.cut_stream(io.BytesIO(data))] == whole  # pyfastcdc's, as before


def test_the_buffer_stays_small_unless_a_chunk_needs_more(monkeypatch: pytest.MonkeyPatch) -> None:
    cdc = FastCDC(1 << 12, min_size=1 << 10, max_size=1 << 16, seed=12345)
    sizes: list[int] = []
    real = bytearray

    def counting(*args: object) -> bytearray:
        b = real(*args)
        sizes.append(len(b))
        return b

    monkeypatch.setattr(chunker, "bytearray", counting, raising=False)
    monkeypatch.setattr(chunker, "STREAM_BUFFER", 1 << 15)
    rng = random.Random(5)
    data = rng.randbytes(1 << 20)
    assert [bytes(c) for c in stream_chunks(cdc, io.BytesIO(data))] == [bytes(c.data) for c in cdc.cut_buf(data)]
    assert sizes == [1 << 15]  # random data is cut every few KiB: one buffer of 32 KiB for all 1 MiB
    sizes.clear()
    zeros = bytes(1 << 18)  # no cut before the maximum: the buffer grows to it, no further
    assert [len(c) for c in stream_chunks(cdc, io.BytesIO(zeros))] == [1 << 16] * 4
    assert max(sizes) == 1 << 16
