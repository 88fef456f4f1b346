"""Key derivation from the 32-byte master seed (docs/format.md section 3).

Every secret comes from BLAKE3 ``derive_key`` with a distinct, versioned context string, so the
seed alone recovers a repository. Changing a context string changes the format: never do it
without a new format version.
"""

from __future__ import annotations

import blake3

SEED_SIZE = 32
_CTX = "bunker 2026-11 v1 "
CTX_DATA_MLKEM = _CTX + "data key ML-KEM-768 seed"
CTX_DATA_X25519 = _CTX + "data key X25519"
CTX_MASTER_SIGN = _CTX + "master signing key Ed25519"
CTX_PUT_SECRET = _CTX + "put secret of a dedup domain"
CTX_CHUNK_ID = _CTX + "chunk id key"
CTX_BLOB = _CTX + "convergent blob key"
CTX_CHUNKER = _CTX + "chunker gear seed"
CTX_INDEX = _CTX + "index, trailer and reference key"
CTX_DOMAIN_ID = _CTX + "dedup domain id"
CTX_PATH_SET = _CTX + "path set id key"
# a node's keys, from its own 32-byte node seed (crypto/node_keys.py), and the keys of a link
# between two nodes, from their link keys' X25519 agreement (node/bundle.py)
CTX_NODE_SIGN = _CTX + "node signing key Ed25519"
CTX_NODE_MLKEM = _CTX + "node KEM key ML-KEM-768 seed"
CTX_NODE_X25519 = _CTX + "node KEM key X25519"
CTX_NODE_LINK = _CTX + "node link key X25519"
CTX_LINK_MASK = _CTX + "link mask key"
CTX_LINK_NAME = _CTX + "link name key"


def derive(context: str, material: bytes, length: int = 32) -> bytes:
    """BLAKE3 derive_key(context, material) with ``length`` bytes of output."""
    return blake3.blake3(material, derive_key_context=context).digest(length)


def keyed_hash(key: bytes, data: bytes | memoryview, length: int = 32) -> bytes:
    """Keyed BLAKE3 of ``data``, on the calling thread: chunks are hashed by several threads of a
    backup, restore or check at once, where BLAKE3's own threads only added CPU (a third more to
    hash the chunks of 1.1 GB: docs/performance.md)."""
    return blake3.blake3(data, key=key).digest(length)


def chunker_seed_from(secret: bytes) -> int:
    """The FastCDC gear seed rule of docs/format.md section 16: 8 bytes as u64, top bit cleared, low bit set.

    pyfastcdc raises on seeds >= 2**63 and treats 0 as the unkeyed table.
    """
    x = int.from_bytes(secret[:8], "little")
    return (x & (2**63 - 1)) | 1


class PutSecrets:
    """The put secret S of one dedup domain and the keys derived from it (derived once)."""

    __slots__ = ("blob_key", "chunk_id_key", "chunker_seed", "domain_id", "index_key", "path_set_key", "secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SEED_SIZE:
            raise ValueError("put secret must be 32 bytes")
        self.secret = secret  # S
        self.chunk_id_key = derive(CTX_CHUNK_ID, secret)  # S_id
        self.blob_key = derive(CTX_BLOB, secret)  # S_blob
        self.index_key = derive(CTX_INDEX, secret)  # S_index
        self.chunker_seed = chunker_seed_from(derive(CTX_CHUNKER, secret, 8))  # from S_chunk
        # S_paths: names a snapshot's path set in its public envelope (repo/snapshot.py path_set_id),
        # so every put key of the domain groups retention by path set while paths stay sealed
        self.path_set_key = derive(CTX_PATH_SET, secret)
        # public 16-hex-digit name of the dedup domain (says nothing about S)
        self.domain_id = derive(CTX_DOMAIN_ID, secret, 8).hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PutSecrets) and other.secret == self.secret

    def __hash__(self) -> int:
        return hash(self.secret)


def put_secret_for_domain(seed: bytes, domain: str) -> PutSecrets:
    """S for ``domain`` (a short public name, "default" unless clients must not share dedup)."""
    return PutSecrets(derive(CTX_PUT_SECRET, seed + b"\x00" + domain.encode()))
