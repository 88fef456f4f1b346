"""Successor records (docs/format.md, "Successor records"): a node's old key naming its new one.

When a node rotates its key (`bunker node rotate-key`, node/rotation.py) it signs a successor
record with the old key and with the new one. The record travels in the node's bundles to the
nodes it shares links with; a far node pins the new keys only once the record verifies against
the keys it pinned for the link (the old key: a key that is not the node's current one is
refused) and a master-signed certificate of the new keys, under the same node name, is in its
store. The old key's signature says "this is still the node you paired with"; the master's
certificate says the new keys are trusted for the repository; the new key's signature shows the
rotating node holds it.

A record is ``BKSU`` || msgpack {"body": bytes, "old_sig": Ed25519 by the old key, "new_sig":
Ed25519 by the new key}, both over (domain "bunker node successor v1", body); body is msgpack
{"v": 1, "node": name, "old": old node id, "new": new NodePublic bytes, "time": float}. In a
bundle it is the object ``successors/<BLAKE3 of its bytes>`` (never stored in a repository).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import blake3

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys, NodePublic
from bunker.crypto.sign import SIGNATURE_SIZE, BadSignature

MAGIC_SUCCESSOR = b"BKSU"
DOMAIN = b"bunker node successor v1"
PREFIX = "successors/"
VERSION = 1
MAX_SUCCESSOR = 16 << 10


@dataclass(frozen=True)
class Successor:
    """A parsed successor record (its signatures are checked by :func:`verify_successor`)."""

    node: str  # the node's name
    old: str  # the node id of the keys that signed it first
    new: NodePublic  # the keys it hands over to
    time: float
    body: bytes
    old_sig: bytes
    new_sig: bytes
    raw: bytes

    @property
    def new_id(self) -> str:
        return self.new.node_id

    @property
    def hash(self) -> str:
        return blake3.blake3(self.raw).hexdigest()

    @property
    def object_name(self) -> str:
        return PREFIX + self.hash


def make_successor(old: NodeKeys, new: NodeKeys, node: str) -> Successor:
    """Sign a record saying the node ``node`` moved from ``old`` to ``new``."""
    body = encoding.pack(
        {"v": VERSION, "node": node, "old": old.node_id, "new": new.public().to_bytes(), "time": time.time()}
    )
    raw = MAGIC_SUCCESSOR + encoding.pack(
        {"body": body, "old_sig": old.sign(DOMAIN, body), "new_sig": new.sign(DOMAIN, body)}
    )
    return parse_successor(raw)


def parse_successor(raw: bytes) -> Successor:
    """Decode a successor record; raise encoding.FormatError on anything malformed."""
    if len(raw) > MAX_SUCCESSOR or not raw.startswith(MAGIC_SUCCESSOR):
        raise encoding.FormatError("not a successor record")
    outer = encoding.expect_map(encoding.unpack(raw[len(MAGIC_SUCCESSOR) :]), "body", "old_sig", "new_sig")
    body = encoding.field_bytes(outer, "body")
    b = encoding.expect_map(encoding.unpack(body), "v", "node", "old", "new", "time")
    if encoding.field(b, "v", int) != VERSION:
        raise encoding.FormatError(f"successor record of version {b['v']} (this bunker reads version {VERSION})")
    try:
        new = NodePublic.from_bytes(encoding.field_bytes(b, "new"))
    except ValueError as exc:
        raise encoding.FormatError(f"a successor record's new keys are malformed: {exc}") from None
    return Successor(
        node=encoding.field(b, "node", str),
        old=encoding.field(b, "old", str),
        new=new,
        time=float(encoding.field(b, "time", (int, float))),
        body=body,
        old_sig=encoding.field_bytes(outer, "old_sig", SIGNATURE_SIZE),
        new_sig=encoding.field_bytes(outer, "new_sig", SIGNATURE_SIZE),
        raw=raw,
    )


def verify_successor(record: Successor, pinned: NodePublic) -> str | None:
    """Why ``record`` is not a successor of the keys ``pinned`` (None when it is): it must name
    them as its old keys, be signed by them and by the new keys it names."""
    if record.old != pinned.node_id:
        return f"it is signed by node key {record.old[:16]}, not by the far node's current key {pinned.node_id[:16]}"
    if record.new_id == pinned.node_id:
        return "it names the same keys as old and new"
    try:
        pinned.verify(DOMAIN, record.body, record.old_sig)
    except BadSignature:
        return f"its signature does not verify with the far node's current key {pinned.node_id[:16]}"
    try:
        record.new.verify(DOMAIN, record.body, record.new_sig)
    except BadSignature:
        return "it is not signed by the new keys it names"
    return None
