"""Blob encryption under convergent keys (docs/format.md section 10.5).

K_blob = keyed BLAKE3(S_blob, plaintext). The blob is ``c || nonce || AES-256-GCM(K_blob, data,
aad = chunk id || c)`` where ``c`` (one byte) is 0 for stored as is and 1 for zstd; the method is
authenticated through the associated data. A put-key holder who has the
plaintext can derive K_blob and compare stored content; nobody else can read it.
"""

from __future__ import annotations

import threading

import zstandard

from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash

COMP_NONE = 0
COMP_ZSTD = 1
ZSTD_LEVEL = 3
_SAMPLE = 64 << 10
_METHOD_BYTES = {COMP_NONE: b"\x00", COMP_ZSTD: b"\x01"}
_local = threading.local()


class BlobError(ValueError):
    """A blob that does not decrypt, decompress or match its chunk id."""


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def chunk_id(secrets: PutSecrets, data: bytes | memoryview) -> bytes:
    """The chunk id: keyed BLAKE3(S_id, plaintext)."""
    return keyed_hash(secrets.chunk_id_key, data)


def compress(data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
    """zstd-compress ``data`` unless it does not pay (tested on a sample first for big chunks)."""
    n = len(data)
    if n < 64:
        return COMP_NONE, data
    zc = _compressor()
    if n > 4 * _SAMPLE:
        # The sample is the frame's first block: a chunk that compresses is not compressed
        # twice at its start (4 % of zstd's time on text).
        frame = zc.compressobj(size=n)
        head = frame.compress(data[:_SAMPLE]) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        if len(head) > _SAMPLE * 0.97:
            return COMP_NONE, data
        packed = b"".join((head, frame.compress(data[_SAMPLE:]), frame.flush()))
    else:
        packed = zc.compress(data)
    if len(packed) >= n - n // 64:
        return COMP_NONE, data
    return COMP_ZSTD, packed


def encrypt_blob(secrets: PutSecrets, cid: bytes, data: bytes | memoryview) -> tuple[bytearray, bytes]:
    """Compress and encrypt one chunk; return (blob bytes, K_blob)."""
    k_blob = keyed_hash(secrets.blob_key, data)
    method, payload = compress(data)
    m = _METHOD_BYTES[method]
    return aead.encrypt_with_prefix(k_blob, m, payload, cid + m), k_blob


def decrypt_blob(k_blob: bytes, cid: bytes, blob: bytes | memoryview, raw_length: int) -> bytes:
    """Decrypt and decompress one blob; raise BlobError if anything does not match."""
    if len(blob) < 1 + aead.OVERHEAD:
        raise BlobError("blob is too short")
    view = memoryview(blob)
    method = view[0]
    if method not in (COMP_NONE, COMP_ZSTD):
        raise BlobError(f"unknown compression method {method}")
    try:
        payload = aead.decrypt(k_blob, view[1:], cid + _METHOD_BYTES[method])
    except aead.DecryptionFailed:
        raise BlobError("blob does not decrypt (altered, or wrong key)") from None
    if method == COMP_NONE:
        data = payload
    else:
        try:
            declared = zstandard.frame_content_size(payload)
            if declared > raw_length:  # never let a hostile frame header size our allocation
                raise BlobError(f"compressed blob declares {declared} bytes, the index says {raw_length}")
            data = _decompressor().decompress(payload, max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise BlobError(f"blob does not decompress ({exc})") from None
    if len(data) != raw_length:
        raise BlobError(f"blob has {len(data)} bytes, the index says {raw_length}")
    return data


def verify_blob(secrets: PutSecrets, cid: bytes, data: bytes) -> bool:
    """True if ``data`` really is the plaintext of chunk ``cid``."""
    return chunk_id(secrets, data) == cid
