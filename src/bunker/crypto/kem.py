"""Hybrid KEM key pairs: HPKE (RFC 9180) with ML-KEM-768 + X25519 (X-Wing).

One implementation serves two kinds of key: the repository's data key pair (derived from the
master seed) and a node's KEM key pair (derived from the node seed, crypto/node_keys.py). Each
pair is built from two seeds, one per half.

The public key object of pyca/cryptography has no serialization, so the ML-KEM (1184 B) and
X25519 (32 B) public keys are stored separately. HPKE has no AAD argument: context is bound
through ``info``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bunker import interrupt
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

ENC_SIZE = 1088 + 32  # HPKE encapsulation: ML-KEM-768 ciphertext + ephemeral X25519 share
SEALED_OVERHEAD = ENC_SIZE + 16  # encapsulation + AEAD tag
MLKEM_PUBLIC_SIZE = 1184
MLKEM_SEED_SIZE = 64  # FIPS 203 seed d || z
X25519_PUBLIC_SIZE = 32
X25519_PRIVATE_SIZE = 32

_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class OpenFailed(ValueError):
    """A sealed box that does not open with this private key and info."""


@dataclass(frozen=True)
class KemPublicKey:
    """The public half of a hybrid KEM key pair: what a sender seals to."""

    _what: ClassVar[str] = "KEM public key"
    mlkem: bytes
    x25519: bytes

    def __post_init__(self) -> None:
        if len(self.mlkem) != MLKEM_PUBLIC_SIZE or len(self.x25519) != X25519_PUBLIC_SIZE:
            raise ValueError(f"{self._what} has the wrong size")

    def seal(self, plaintext: bytes, info: bytes) -> bytes:
        """HPKE single-shot seal of ``plaintext`` to this key, bound to ``info``: the
        encapsulation (1120 bytes) || AEAD ciphertext || tag (16)."""
        pub = hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(self.mlkem),
            x25519.X25519PublicKey.from_public_bytes(self.x25519),
        )
        return _SUITE.encrypt(plaintext, pub, info=info)


@dataclass(frozen=True)
class DataPublicKey(KemPublicKey):
    """The public half of the data key pair, as stored in ``config``."""

    _what: ClassVar[str] = "data public key"


class KemPrivateKey:
    """The private half of a hybrid KEM key pair, from an ML-KEM-768 seed (64 bytes) and an
    X25519 private key (32 bytes)."""

    _who: ClassVar[str] = "this key"

    def __init__(self, mlkem_seed: bytes, x25519_private: bytes) -> None:
        if len(mlkem_seed) != MLKEM_SEED_SIZE or len(x25519_private) != X25519_PRIVATE_SIZE:
            raise ValueError("KEM private key seeds have the wrong size")
        self._mlkem = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed)
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(x25519_private)
        self._key = hpke.MLKEM768X25519PrivateKey(self._mlkem, self._x25519)

    def public_halves(self) -> tuple[bytes, bytes]:
        """The raw ML-KEM (1184 bytes) and X25519 (32 bytes) public keys."""
        return self._mlkem.public_key().public_bytes_raw(), self._x25519.public_key().public_bytes_raw()

    def public(self) -> KemPublicKey:
        """The matching public key."""
        return KemPublicKey(*self.public_halves())

    def open(self, sealed: bytes, info: bytes) -> bytes:
        """Open a sealed box; raise OpenFailed if it was not sealed to this key with ``info``."""
        signals = interrupt.raised_count()
        try:
            return _SUITE.decrypt(sealed, self._key, info=info)
        except (InvalidTag, ValueError):
            # the decryption reports an exception a signal handler raised inside it as InvalidTag:
            # that is the command being stopped, never a box that does not open
            interrupt.raise_if_raised_since(signals)
            raise OpenFailed(f"sealed key does not open with {self._who}") from None


class DataPrivateKey(KemPrivateKey):
    """The private half of the data key pair; derived from the master seed, held only with the
    master key."""

    _who: ClassVar[str] = "the master key"

    def __init__(self, seed: bytes) -> None:
        super().__init__(derive(CTX_DATA_MLKEM, seed, MLKEM_SEED_SIZE), derive(CTX_DATA_X25519, seed))

    def public(self) -> DataPublicKey:
        """The matching public key."""
        return DataPublicKey(*self.public_halves())
