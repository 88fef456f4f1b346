"""A node's keys, all derived from its own random 32-byte node seed (docs/format.md, "Bundles").

A node has three key pairs: an Ed25519 signing key (signs bundle headers, receipts and records),
a hybrid KEM key ML-KEM-768 + X25519 (what other nodes seal bundle piece keys to), and a separate
X25519 *link key* whose static-static agreement with a peer's link key gives the two nodes the
keys only they share (node/bundle.py ``LinkKeys``). The node id is a hash over the four public
keys, so a node card that names an id cannot be paired with other keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import blake3
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from bunker import encoding
from bunker.crypto.derive import CTX_NODE_LINK, CTX_NODE_MLKEM, CTX_NODE_SIGN, CTX_NODE_X25519, SEED_SIZE, derive
from bunker.crypto.kem import (
    MLKEM_PUBLIC_SIZE,
    MLKEM_SEED_SIZE,
    X25519_PUBLIC_SIZE,
    KemPrivateKey,
    KemPublicKey,
)
from bunker.crypto.sign import PUBLIC_SIZE, SigningKey, verify

NODE_ID_PREFIX = b"bunker node id v1\x00"
NODE_PUBLIC_VERSION = 1


@dataclass(frozen=True)
class NodePublic:
    """The public keys of a node: what its card carries and what a peer pairs with."""

    sign: bytes  # Ed25519 verify key (32)
    mlkem: bytes  # ML-KEM-768 encapsulation key (1184)
    x25519: bytes  # X25519 half of the KEM key (32)
    link: bytes  # X25519 link key (32)

    def __post_init__(self) -> None:
        sizes = {"sign": PUBLIC_SIZE, "mlkem": MLKEM_PUBLIC_SIZE, "x25519": X25519_PUBLIC_SIZE, "link": 32}
        for name, size in sizes.items():
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"node public key {name!r} must be {size} bytes")

    @cached_property
    def node_id(self) -> str:
        """The node's fingerprint: 64 hex digits of BLAKE3 over a prefix and the four keys."""
        return blake3.blake3(NODE_ID_PREFIX + self.sign + self.mlkem + self.x25519 + self.link).hexdigest()

    def kem_public(self) -> KemPublicKey:
        """The KEM public key bundles to this node are sealed to."""
        return KemPublicKey(self.mlkem, self.x25519)

    def verify(self, domain: bytes, message: bytes, signature: bytes) -> None:
        """Raise crypto.sign.BadSignature unless the node signed ``message`` in ``domain``."""
        verify(self.sign, domain, message, signature)

    def to_bytes(self) -> bytes:
        """Canonical msgpack map ``{"link", "mlkem", "sign", "v": 1, "x25519"}``."""
        return encoding.pack(
            {"v": NODE_PUBLIC_VERSION, "sign": self.sign, "mlkem": self.mlkem, "x25519": self.x25519, "link": self.link}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> NodePublic:
        """Parse :meth:`to_bytes` output; raise encoding.FormatError on anything else."""
        m = encoding.expect_map(encoding.unpack(data), "v", "sign", "mlkem", "x25519", "link")
        if encoding.field(m, "v", int) != NODE_PUBLIC_VERSION:
            raise encoding.FormatError(f"node public keys of version {m['v']} (this bunker reads version 1)")
        mlkem_bytes = encoding.field_bytes(m, "mlkem", MLKEM_PUBLIC_SIZE)
        try:
            mlkem.MLKEM768PublicKey.from_public_bytes(mlkem_bytes)
        except ValueError:
            raise encoding.FormatError("node ML-KEM-768 public key is not valid") from None
        return cls(
            sign=encoding.field_bytes(m, "sign", PUBLIC_SIZE),
            mlkem=mlkem_bytes,
            x25519=encoding.field_bytes(m, "x25519", X25519_PUBLIC_SIZE),
            link=encoding.field_bytes(m, "link", X25519_PUBLIC_SIZE),
        )


class NodeKeys:
    """A node's private keys, derived from its node seed (held only by the node)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"a node seed is {SEED_SIZE} bytes")
        self._signing = SigningKey(derive(CTX_NODE_SIGN, seed))
        self._kem = KemPrivateKey(derive(CTX_NODE_MLKEM, seed, MLKEM_SEED_SIZE), derive(CTX_NODE_X25519, seed))
        self._link = x25519.X25519PrivateKey.from_private_bytes(derive(CTX_NODE_LINK, seed))
        mlkem_public, x25519_public = self._kem.public_halves()
        self._public = NodePublic(
            sign=self._signing.public_bytes,
            mlkem=mlkem_public,
            x25519=x25519_public,
            link=self._link.public_key().public_bytes_raw(),
        )

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKeys:
        """The node's keys from its 32-byte seed."""
        return cls(seed)

    def public(self) -> NodePublic:
        """The node's public keys."""
        return self._public

    @property
    def node_id(self) -> str:
        """The node's id (its public keys' fingerprint)."""
        return self._public.node_id

    def sign(self, domain: bytes, message: bytes) -> bytes:
        """Ed25519 signature over ``domain || 0x00 || message`` (crypto/sign.py)."""
        return self._signing.sign(domain, message)

    def open_sealed(self, sealed: bytes, info: bytes) -> bytes:
        """Open an HPKE box sealed to this node's KEM key; raise crypto.kem.OpenFailed if it was
        not sealed to this node with ``info``."""
        return self._kem.open(sealed, info)

    def agree(self, peer_link_public: bytes) -> bytes:
        """X25519 agreement of this node's link key with a peer's (32 bytes); raise ValueError
        on a key of the wrong size or one that gives the all-zero secret (a low-order point)."""
        if len(peer_link_public) != X25519_PUBLIC_SIZE:
            raise ValueError("a link key is 32 bytes")
        try:
            return self._link.exchange(x25519.X25519PublicKey.from_public_bytes(peer_link_public))
        except ValueError:
            raise ValueError("the peer's link key is a low-order point: no shared secret") from None

    def __repr__(self) -> str:
        return f"NodeKeys(node_id={self.node_id!r})"
