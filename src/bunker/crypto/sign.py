"""Ed25519 signatures and the repository fingerprint."""

from __future__ import annotations

from typing import Protocol

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bunker.crypto.derive import CTX_MASTER_SIGN, derive

SIGNATURE_SIZE = 64
PUBLIC_SIZE = 32


class BadSignature(ValueError):
    """A signature that does not verify."""


class Signer(Protocol):
    """Anything that signs in a domain as :class:`SigningKey` does (a node's keys too)."""

    def sign(self, domain: bytes, message: bytes) -> bytes: ...


class SigningKey:
    """An Ed25519 private key (a client's own, or the master's derived from the seed)."""

    def __init__(self, private_bytes: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private_bytes)
        self.private_bytes = private_bytes
        self.public_bytes = self._key.public_key().public_bytes_raw()

    @classmethod
    def master_from_seed(cls, seed: bytes) -> SigningKey:
        """The master signing key derived from the master seed."""
        return cls(derive(CTX_MASTER_SIGN, seed))

    def sign(self, domain: bytes, message: bytes) -> bytes:
        """Sign ``message`` in a domain (object kind) so a signature never verifies elsewhere."""
        return self._key.sign(domain + b"\x00" + message)


def verify(public_bytes: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    """Raise BadSignature unless ``signature`` is ``public_bytes``'s over (domain, message)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, domain + b"\x00" + message)
    except (InvalidSignature, ValueError):
        raise BadSignature("signature does not verify") from None


def fingerprint(master_verify_key: bytes) -> str:
    """The repository id: hex BLAKE3 of the master verify key (64 hex digits)."""
    return blake3.blake3(b"bunker repository id v1\x00" + master_verify_key).hexdigest()
