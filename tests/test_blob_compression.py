"""When a blob is stored compressed (docs/format.md section 10.5): chunks under 64 bytes as is;
a chunk over 256 KiB is judged by its first 64 KiB, compressed as the first block of the frame
the whole chunk then goes into; a result that does not save 1/64 is not kept. Every stored blob
decrypts to its plaintext."""

from __future__ import annotations

import random

import pytest
import zstandard

from bunker.crypto.derive import PutSecrets
from bunker.repo import blob

SECRETS = PutSecrets(bytes(range(32)))
KIB = 1024


def _text(rng: random.Random, n: int) -> bytes:
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def _stored(data: bytes) -> tuple[int, bytearray]:
    """The compression byte of ``data``'s blob and the blob, checked to decrypt back."""
    cid = blob.chunk_id(SECRETS, data)
    ct, k_blob = blob.encrypt_blob(SECRETS, cid, data)
    assert blob.decrypt_blob(k_blob, cid, ct, len(data)) == data
    return ct[0], ct


@pytest.mark.parametrize("size", [300 * KIB, 1024 * KIB, 3 * 1024 * KIB])
def test_a_large_compressible_chunk_is_one_frame_as_small_as_one_pass_makes_it(size: int) -> None:
    data = _text(random.Random(size), size)
    method, ct = _stored(data)
    assert method == blob.COMP_ZSTD
    cid = blob.chunk_id(SECRETS, data)
    method_, payload = blob.compress(data)
    assert method_ == blob.COMP_ZSTD
    assert zstandard.frame_content_size(payload) == size  # the header declares the size
    assert zstandard.ZstdDecompressor().decompress(payload) == data
    one_pass = zstandard.ZstdCompressor(level=blob.ZSTD_LEVEL).compress(data)
    assert len(payload) <= len(one_pass) * 1.01  # the sample's block boundary costs nothing
    assert len(ct) < size // 2 and cid


def test_a_large_chunk_is_judged_by_its_first_64_kib() -> None:
    rng = random.Random(7)
    noise_first = rng.randbytes(64 * KIB) + _text(rng, 960 * KIB)
    assert _stored(noise_first)[0] == blob.COMP_NONE  # the sample does not shrink
    text_first = _text(rng, 64 * KIB) + rng.randbytes(4096 * KIB)
    assert _stored(text_first)[0] == blob.COMP_NONE  # the whole does not save 1/64
    assert _stored(_text(rng, 64 * KIB) + rng.randbytes(400 * KIB) + bytes(600 * KIB))[0] == blob.COMP_ZSTD


def test_a_chunk_up_to_256_kib_is_judged_whole() -> None:
    rng = random.Random(8)
    assert _stored(rng.randbytes(64 * KIB) + bytes(192 * KIB))[0] == blob.COMP_ZSTD  # no sample
    assert _stored(rng.randbytes(256 * KIB))[0] == blob.COMP_NONE


def test_tiny_and_incompressible_chunks_are_stored_as_is() -> None:
    assert _stored(bytes(63))[0] == blob.COMP_NONE
    assert _stored(bytes(64))[0] == blob.COMP_ZSTD
    assert _stored(b"")[0] == blob.COMP_NONE
    assert _stored(random.Random(9).randbytes(5000))[0] == blob.COMP_NONE


def test_a_compressor_left_by_a_rejected_sample_compresses_the_next_chunk_alone() -> None:
    """A sample that does not pay leaves its frame unfinished; the thread's compressor must
    start the next chunk afresh."""
    rng = random.Random(10)
    _stored(rng.randbytes(1024 * KIB))
    text = _text(rng, 512 * KIB)
    method, payload = blob.compress(text)
    assert method == blob.COMP_ZSTD
    assert zstandard.ZstdDecompressor().decompress(payload) == text
    small = _text(rng, 10 * KIB)
    method, payload = blob.compress(small)
    assert method == blob.COMP_ZSTD and zstandard.ZstdDecompressor().decompress(payload) == small
