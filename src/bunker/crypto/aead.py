"""Symmetric authenticated encryption: AES-256-GCM with random or synthetic nonces.

AES-GCM releases the GIL in pyca/cryptography, so several worker threads encrypt in parallel.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bunker.crypto.derive import keyed_hash

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE


class DecryptionFailed(ValueError):
    """Ciphertext that does not authenticate under the given key and associated data."""


def encrypt(key: bytes, plaintext: bytes | memoryview, aad: bytes = b"") -> bytes:
    """Return nonce || AES-256-GCM(key, plaintext, aad) with a random 96-bit nonce."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def encrypt_deterministic(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """Like :func:`encrypt` but the nonce is a keyed hash of key, aad and plaintext (SIV-style),
    so equal inputs give equal ciphertext: used for objects that must deduplicate."""
    nonce = keyed_hash(key, aad + b"\x00" + plaintext, NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, data: bytes | memoryview, aad: bytes = b"") -> bytes:
    """Open nonce || ciphertext; raise DecryptionFailed if it does not authenticate."""
    if len(data) < OVERHEAD:
        raise DecryptionFailed("ciphertext too short")
    view = memoryview(data)
    try:
        return AESGCM(key).decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionFailed("ciphertext does not authenticate") from None
