"""Chunked AEAD for bundle pieces: the STREAM construction over AES-256-GCM (docs/format.md,
"Bundles").

The plaintext is cut into segments of SEGMENT_SIZE bytes (the last one 1 to SEGMENT_SIZE bytes;
only an empty plaintext has an empty segment). Segment ``i`` is AES-256-GCM under the piece key
with the nonce ``u64 BE i || 00 00 00 || last`` (``last`` is 1 on the final segment, else 0) and
no associated data. A reordered, dropped, added or cut segment fails its tag, and so does a
stream cut at a segment boundary: its new final segment was sealed with ``last`` = 0.

Both directions hold at most two ciphertext segments and one plaintext segment in memory,
whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEGMENT_SIZE = 1 << 20
TAG_SIZE = 16
SEGMENT_CIPHERTEXT_SIZE = SEGMENT_SIZE + TAG_SIZE


class SegmentFailed(ValueError):
    """A segment that does not authenticate (altered, reordered, cut short or missing)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"segment {index} does not authenticate")
        self.index = index


def segment_nonce(index: int, last: bool) -> bytes:
    """The 12-byte nonce of segment ``index``."""
    return index.to_bytes(8, "big") + b"\x00\x00\x00" + (b"\x01" if last else b"\x00")


def segment_count(plain_size: int) -> int:
    """How many segments a plaintext of ``plain_size`` bytes has (at least one)."""
    return max(1, -(-plain_size // SEGMENT_SIZE))


def ciphertext_size(plain_size: int) -> int:
    """The size of the STREAM ciphertext of ``plain_size`` bytes of plaintext."""
    return plain_size + TAG_SIZE * segment_count(plain_size)


def plain_size(ciphertext: int) -> int | None:
    """The plaintext size whose ciphertext is exactly ``ciphertext`` bytes, or None when no
    plaintext has that size (a final segment of 1 to 16 bytes, or 16 after full segments)."""
    if ciphertext < TAG_SIZE:
        return None
    n = -(-ciphertext // SEGMENT_CIPHERTEXT_SIZE)
    last = ciphertext - (n - 1) * SEGMENT_CIPHERTEXT_SIZE
    if last < TAG_SIZE or (last == TAG_SIZE and n > 1):
        return None
    return ciphertext - TAG_SIZE * n


def _discard(_data: memoryview) -> None:
    pass


class StreamEncryptor:
    """Encrypts a plaintext of a size known in advance, segment by segment, into ``sink``.

    The caller fills :meth:`space` (a view of the free part of the current segment, never more
    than what remains of the plaintext) and calls :meth:`advance`; full segments are sealed and
    handed to ``sink`` as they fill, the final one by :meth:`finish`.
    """

    def __init__(self, key: bytes, total: int, sink: Callable[[memoryview], None]) -> None:
        self._aes = AESGCM(key)
        self._total = total
        self._sink = sink
        self._buf = bytearray(min(SEGMENT_SIZE, max(total, 1)))
        self._out = bytearray(len(self._buf) + TAG_SIZE)
        self._pos = 0  # bytes filled in the current segment
        self._done = 0  # plaintext bytes taken so far
        self._index = 0

    @property
    def remaining(self) -> int:
        """Plaintext bytes still to come."""
        return self._total - self._done

    def space(self) -> memoryview:
        """The free part of the current segment, at most :attr:`remaining` bytes."""
        end = min(len(self._buf), self._pos + self.remaining)
        return memoryview(self._buf)[self._pos : end]

    def advance(self, n: int) -> None:
        """Take ``n`` bytes just written into :meth:`space`."""
        if n < 0 or n > len(self.space()):
            raise ValueError("advance past the space given")
        self._pos += n
        self._done += n
        if self._pos == len(self._buf) and self._done < self._total:
            self._seal(last=False)

    def write(self, data: bytes | memoryview) -> None:
        """Copy ``data`` into the stream."""
        view = memoryview(data)
        while view:
            space = self.space()
            if not space:
                raise ValueError("more plaintext than the stream's size")
            n = min(len(space), len(view))
            space[:n] = view[:n]
            self.advance(n)
            view = view[n:]

    def write_zeros(self, n: int) -> None:
        """Append ``n`` zero bytes."""
        while n:
            space = self.space()
            if not space:
                raise ValueError("more plaintext than the stream's size")
            k = min(len(space), n)
            space[:k] = bytes(k)
            self.advance(k)
            n -= k

    def finish(self) -> None:
        """Seal the final segment; the whole plaintext must have been written."""
        if self._done != self._total:
            raise ValueError(f"stream ended after {self._done} of {self._total} bytes")
        self._seal(last=True)

    def close(self) -> None:
        """Drop the segment buffers and the sink (the writer holds this object in a cycle
        through its sink: release the memory at once rather than at the next collection)."""
        self._buf = bytearray()
        self._out = bytearray()
        self._sink = _discard

    def _seal(self, last: bool) -> None:
        n = self._pos
        out = memoryview(self._out)[: n + TAG_SIZE]
        self._aes.encrypt_into(segment_nonce(self._index, last), memoryview(self._buf)[:n], None, out)
        self._sink(out)
        self._index += 1
        self._pos = 0


class StreamDecryptor:
    """Decrypts a STREAM ciphertext read through ``readinto`` (a file's), segment by segment.

    ``observe`` sees every ciphertext byte read, in order (the piece name's hash). A segment's
    plaintext is released only after its tag verified.
    """

    def __init__(
        self, key: bytes, readinto: Callable[[memoryview], int | None], observe: Callable[[memoryview], None]
    ) -> None:
        self._aes = AESGCM(key)
        self._readinto = readinto
        self._observe = observe
        self._cur = bytearray(SEGMENT_CIPHERTEXT_SIZE)
        self._next = bytearray(SEGMENT_CIPHERTEXT_SIZE)
        self._plain = bytearray(SEGMENT_SIZE)
        self._cur_len = self._fill(self._cur)
        self._index = 0
        self._ended = False
        self._closed = False

    def close(self) -> None:
        """Drop the segment buffers."""
        self._cur = bytearray()
        self._next = bytearray()
        self._plain = bytearray()
        self._closed = True

    @property
    def ended(self) -> bool:
        """True once the final segment was returned."""
        return self._ended

    def _fill(self, buf: bytearray) -> int:
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = self._readinto(view[got:])
            if not n:
                break
            got += n
        self._observe(view[:got])
        return got

    def next_segment(self) -> memoryview | None:
        """The next segment's plaintext (valid until the next call), or None after the final
        one; raise SegmentFailed if it does not authenticate."""
        if self._closed:
            raise ValueError("the stream was closed")
        if self._ended:
            return None
        n = self._cur_len
        last = n < SEGMENT_CIPHERTEXT_SIZE
        next_len = 0
        if not last:
            next_len = self._fill(self._next)
            last = next_len == 0
        if n < TAG_SIZE:
            raise SegmentFailed(self._index)
        plain = memoryview(self._plain)[: n - TAG_SIZE]
        try:
            self._aes.decrypt_into(segment_nonce(self._index, last), memoryview(self._cur)[:n], None, plain)
        except InvalidTag:
            raise SegmentFailed(self._index) from None
        self._index += 1
        self._ended = last
        self._cur, self._next = self._next, self._cur
        self._cur_len = next_len
        return plain
