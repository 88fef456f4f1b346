"""Object names and the signed-object frame shared by every signed kind.

Except for RECOVERY.md, FORMAT.md and ``sessions/`` objects, an object's name is
``<prefix>/<hex BLAKE3 of its stored bytes>``, so a copy can be checked with ``b3sum``. Which
prefixes there are and the rule of each one's names: the registry, storage/prefixes.py.

A signed object is ``MAGIC (4 bytes) || msgpack {"body": bytes, "signer": str, "sig": bytes}``;
the signature covers (MAGIC, body) so it never verifies as another kind. ``signer`` is ``""`` for
the master signing key, else the name of the client certificate (``clients/<hex>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import blake3

from bunker import encoding
from bunker.crypto.sign import Signer
from bunker.storage.prefixes import HASH_NAMED as HASH_NAMED  # the registry's, for the readers
from bunker.storage.prefixes import is_hash_name as is_hash_name

MAGIC_CONFIG = b"BKCF"
MAGIC_CLIENT = b"BKCL"
MAGIC_PACK = b"BKPK"
MAGIC_INDEX = b"BKIX"
MAGIC_REFS = b"BKRF"
MAGIC_SNAPSHOT = b"BKSN"
MAGIC_RETIRED = b"BKRT"
MAGIC_UNRETIRED = b"BKUR"  # withdrawal of a retirement (`bunker unforget`), also under retired/
MAGIC_SESSION = b"BKSS"
MAGIC_GC = b"BKGC"
MAGIC_MOVED = b"BKMV"  # a move record of a repack, also under gc/
MAGIC_NODE = b"BKND"  # a node certificate (nodes/)
MAGIC_ACK = b"BKAK"  # a node's session acknowledgement, under gc/ (repo/node_acks.py)
MAGIC_CKROOT = b"BKCR"  # a dead session's checkpoint forwarded by a node, under gc/ (repo/checkpoint_roots.py)
MAGIC_HOLDING = b"BKHO"  # snapshots a node holds for its upstream, under gc/ (repo/holding_records.py)

# the main kind of each prefix (gc/ also holds MAGIC_MOVED, retired/ also MAGIC_UNRETIRED)
MAGIC_OF_PREFIX = {
    "config": MAGIC_CONFIG,
    "clients": MAGIC_CLIENT,
    "packs": MAGIC_PACK,
    "index": MAGIC_INDEX,
    "refs": MAGIC_REFS,
    "snapshots": MAGIC_SNAPSHOT,
    "retired": MAGIC_RETIRED,
    "gc": MAGIC_GC,
    "sessions": MAGIC_SESSION,
    "nodes": MAGIC_NODE,
}
MAX_SIGNED_OBJECT = 64 << 20  # no signed object of ours is near this; larger is hostile


def content_hash(data: bytes | memoryview) -> str:
    """Hex BLAKE3 of stored bytes: the object's name within its prefix."""
    threads = blake3.blake3.AUTO if len(data) >= (1 << 22) else 1
    return blake3.blake3(data, max_threads=threads).hexdigest()


def matches_name(name: str, data: bytes | memoryview) -> bool:
    """False when ``name`` is hash-named and ``data`` does not hash to it (damaged or swapped
    bytes); names of other prefixes say nothing about their bytes."""
    return not is_hash_name(name) or content_hash(data) == name.split("/", 1)[1]


def name_for(prefix: str, data: bytes | memoryview) -> str:
    """The hash name of an object under ``prefix``."""
    return f"{prefix}/{content_hash(data)}"


def check_ref(value: Any, prefix: str) -> str:
    """Validate a reference read from an object: must be ``<prefix>/<64 hex>``."""
    if not isinstance(value, str) or not value.startswith(prefix + "/") or not is_hash_name(value):
        raise encoding.FormatError(f"bad reference {value!r} (expected {prefix}/<hash>)")
    return value


@dataclass(frozen=True)
class SignedObject:
    """A decoded signed object (signature not yet verified)."""

    magic: bytes
    body_bytes: bytes
    body: dict[str, Any]
    signer: str
    sig: bytes


def make_signed(magic: bytes, body: dict[str, Any], key: Signer, signer: str) -> bytes:
    """Encode and sign ``body`` as a signed object of kind ``magic``."""
    body_bytes = encoding.pack(body)
    return magic + encoding.pack({"body": body_bytes, "signer": signer, "sig": key.sign(magic, body_bytes)})


def parse_signed(data: bytes, magic: bytes) -> SignedObject:
    """Decode a signed object of kind ``magic``; raise FormatError if malformed."""
    if len(data) > MAX_SIGNED_OBJECT:
        raise encoding.FormatError("object is too large for its kind")
    if data[:4] != magic:
        raise encoding.FormatError(f"wrong magic {data[:4]!r}, expected {magic!r}")
    outer = encoding.expect_map(encoding.unpack(memoryview(data)[4:]), "body", "signer", "sig")
    body_bytes = encoding.field_bytes(outer, "body")
    signer = encoding.field(outer, "signer", str)
    if signer:
        check_ref(signer, "clients")
    sig = encoding.field_bytes(outer, "sig", 64)
    body = encoding.expect_map(encoding.unpack(body_bytes))
    return SignedObject(magic, body_bytes, body, signer, sig)
