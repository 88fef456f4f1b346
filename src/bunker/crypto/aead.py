"""Symmetric authenticated encryption: AES-256-GCM with random or synthetic nonces, and AES Key
Wrap (RFC 3394) for wrapping 32-byte keys.

AES-GCM releases the GIL in pyca/cryptography, so several worker threads encrypt in parallel.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from bunker.crypto.derive import keyed_hash

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_WRAP_OVERHEAD = 8  # RFC 3394: a wrapped key is 8 bytes longer than the key (40 for 32)


class DecryptionFailed(ValueError):
    """Ciphertext that does not authenticate under the given key and associated data."""


class Cipher:
    """AES-256-GCM under one key, for many messages (the key schedule is done once); also AES Key
    Wrap of 32-byte keys under the same key (:meth:`wrap_key`, :meth:`unwrap_key`)."""

    __slots__ = ("_aes", "_key")

    def __init__(self, key: bytes) -> None:
        self._aes = AESGCM(key)
        self._key = bytes(key)

    @property
    def key(self) -> bytes:
        """The raw 32-byte key (read-only)."""
        return self._key

    def wrap_key(self, key: bytes) -> bytes:
        """AES Key Wrap (RFC 3394) of ``key`` (a multiple of 8 bytes, at least 16): deterministic,
        8 bytes longer than ``key``, with its own integrity check but no associated data."""
        return aes_key_wrap(self._key, key)

    def unwrap_key(self, wrapped: bytes) -> bytes:
        """Undo :meth:`wrap_key`; raise DecryptionFailed if the integrity check fails."""
        try:
            return aes_key_unwrap(self._key, wrapped)
        except InvalidUnwrap:
            raise DecryptionFailed("wrapped key does not unwrap") from None

    def encrypt(self, plaintext: bytes | memoryview, aad: bytes = b"") -> bytes:
        """nonce || ciphertext || tag, with a random 96-bit nonce."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aes.encrypt(nonce, plaintext, aad)

    def decrypt(self, data: bytes | memoryview, aad: bytes = b"") -> bytes:
        """Open nonce || ciphertext; raise DecryptionFailed if it does not authenticate."""
        if len(data) < OVERHEAD:
            raise DecryptionFailed("ciphertext too short")
        view = memoryview(data)
        try:
            return self._aes.decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise DecryptionFailed("ciphertext does not authenticate") from None


def encrypt(key: bytes, plaintext: bytes | memoryview, aad: bytes = b"") -> bytes:
    """Return nonce || AES-256-GCM(key, plaintext, aad) with a random 96-bit nonce."""
    return Cipher(key).encrypt(plaintext, aad)


def encrypt_with_prefix(key: bytes, prefix: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytearray:
    """Return prefix || nonce || ciphertext || tag in one buffer (no intermediate copies: the
    encryption writes straight into it, with the GIL released)."""
    nonce = os.urandom(NONCE_SIZE)
    p = len(prefix)
    buf = bytearray(p + NONCE_SIZE + len(plaintext) + TAG_SIZE)
    buf[:p] = prefix
    buf[p : p + NONCE_SIZE] = nonce
    AESGCM(key).encrypt_into(nonce, plaintext, aad, memoryview(buf)[p + NONCE_SIZE :])
    return buf


def encrypt_deterministic(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """Like :func:`encrypt` but the nonce is a keyed hash of key, aad and plaintext (SIV-style),
    so equal inputs give equal ciphertext: used for objects that must deduplicate."""
    nonce = keyed_hash(key, aad + b"\x00" + plaintext, NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, data: bytes | memoryview, aad: bytes = b"") -> bytes:
    """Open nonce || ciphertext; raise DecryptionFailed if it does not authenticate. (One
    message under a key: no :class:`Cipher` is kept, as for every blob a restore opens.)"""
    if len(data) < OVERHEAD:
        raise DecryptionFailed("ciphertext too short")
    view = memoryview(data)
    try:
        return AESGCM(key).decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionFailed("ciphertext does not authenticate") from None
