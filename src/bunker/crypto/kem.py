"""The data key pair: HPKE (RFC 9180) with the hybrid KEM ML-KEM-768 + X25519 (X-Wing).

The public key object of pyca/cryptography has no serialization, so the ML-KEM (1184 B) and
X25519 (32 B) public keys are stored separately. HPKE has no AAD argument: context is bound
through ``info``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bunker.crypto.derive import CTX_DATA_MLKEM, CTX_DATA_X25519, derive
from bunker.errors import BunkerError, ExitCode

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
except ImportError as exc:  # pragma: no cover - depends on the installed wheel
    raise BunkerError(
        f"this cryptography package lacks HPKE with ML-KEM ({exc})",
        "install cryptography>=50 from its official wheel (pip install -U 'cryptography>=50')",
        exit_code=ExitCode.FATAL,
    ) from None

SEALED_OVERHEAD = 1088 + 32 + 16  # ML-KEM-768 ciphertext + X25519 share + AEAD tag
MLKEM_PUBLIC_SIZE = 1184
X25519_PUBLIC_SIZE = 32

_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class OpenFailed(ValueError):
    """A sealed box that does not open with this private key and info."""


@dataclass(frozen=True)
class DataPublicKey:
    """The public half of the data key pair, as stored in ``config``."""

    mlkem: bytes
    x25519: bytes

    def __post_init__(self) -> None:
        if len(self.mlkem) != MLKEM_PUBLIC_SIZE or len(self.x25519) != X25519_PUBLIC_SIZE:
            raise ValueError("data public key has the wrong size")

    def seal(self, plaintext: bytes, info: bytes) -> bytes:
        """HPKE single-shot seal of ``plaintext`` to this key, bound to ``info``."""
        pub = hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(self.mlkem),
            x25519.X25519PublicKey.from_public_bytes(self.x25519),
        )
        return _SUITE.encrypt(plaintext, pub, info=info)


class DataPrivateKey:
    """The private half; derived from the master seed, held only with the master key."""

    def __init__(self, seed: bytes) -> None:
        self._mlkem = mlkem.MLKEM768PrivateKey.from_seed_bytes(derive(CTX_DATA_MLKEM, seed, 64))
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(derive(CTX_DATA_X25519, seed))
        self._key = hpke.MLKEM768X25519PrivateKey(self._mlkem, self._x25519)

    def public(self) -> DataPublicKey:
        """The matching public key."""
        return DataPublicKey(self._mlkem.public_key().public_bytes_raw(), self._x25519.public_key().public_bytes_raw())

    def open(self, sealed: bytes, info: bytes) -> bytes:
        """Open a sealed box; raise OpenFailed if it was not sealed to this key with ``info``."""
        try:
            return _SUITE.decrypt(sealed, self._key, info=info)
        except (InvalidTag, ValueError):
            raise OpenFailed("sealed key does not open with the master key") from None
