"""Receipts (docs/hierarchy.md, "Receipts"): what a node signs about objects it received.

- A *hop receipt* says "I hold these" (and "a snapshot I stage lacks these"): the sender stops
  resending what it names, and resends what it lists as missing. It frees nothing.
- A *record receipt* is issued by a node with the ``record`` capability once the objects were
  written to the repository of record and read back; it is relayed down unchanged, and only it
  lets a node evict. It binds the repository, the issuer, the downstream node, the objects and
  link pieces it covers, what was refused, the chain heads the top holds, the config version,
  and its own sequence number and the hash of the issuer's previous receipt to that downstream
  node: a receiver that sees a number again with other bytes knows the issuer was rolled back.

A receipt is ``BKRC`` || msgpack {"body": bytes, "sig": Ed25519 by the issuer's node key over
(domain "bunker receipt v1", body)}; it travels inside bundles as an object named
``receipts/<BLAKE3 of its bytes>`` (never stored in a repository).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import blake3

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys, NodePublic
from bunker.crypto.sign import BadSignature
from bunker.node.node_dir import NodeDir, read_json, write_json

MAGIC_RECEIPT = b"BKRC"
DOMAIN = b"bunker receipt v1"
KINDS = ("hop", "record")
PREFIX = "receipts/"
MAX_RECEIPT = 32 << 20


@dataclass(frozen=True)
class Receipt:
    kind: str
    repo: str
    issuer: str  # node id
    downstream: str  # node id of the node it was issued to
    seq: int
    prev: str  # hex hash of the issuer's previous receipt of this kind to ``downstream`` ("" first)
    covers: tuple[str, ...]  # object names held (hop) or recorded at the top (record)
    pieces: tuple[int, ...] = ()  # link piece numbers whose every object it covers
    missing: tuple[str, ...] = ()  # hop: what staged snapshots still lack (to resend)
    refused: tuple[tuple[str, str], ...] = ()  # (object, why) the issuer refused
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)  # cert -> (seq, snapshot) at the top
    config_version: int = 0
    time: float = 0.0
    raw: bytes = b""

    @property
    def hash(self) -> str:
        return blake3.blake3(self.raw).hexdigest()

    @property
    def object_name(self) -> str:
        return PREFIX + self.hash


def make_receipt(keys: NodeKeys, **fields: Any) -> Receipt:
    """Sign a receipt with the node's key; ``fields`` are Receipt's (without raw)."""
    body = {
        "kind": fields["kind"],
        "repo": fields["repo"],
        "issuer": keys.node_id,
        "downstream": fields["downstream"],
        "seq": fields["seq"],
        "prev": fields.get("prev", ""),
        "covers": sorted(fields.get("covers", ())),
        "pieces": sorted(fields.get("pieces", ())),
        "missing": sorted(fields.get("missing", ())),
        "refused": sorted([n, w] for n, w in fields.get("refused", ())),
        "heads": {c: [s, n] for c, (s, n) in sorted(fields.get("heads", {}).items())},
        "config_version": fields.get("config_version", 0),
        "time": time.time(),
    }
    body_bytes = encoding.pack(body)
    raw = MAGIC_RECEIPT + encoding.pack({"body": body_bytes, "sig": keys.sign(DOMAIN, body_bytes)})
    return parse_receipt(raw)


def parse_receipt(raw: bytes) -> Receipt:
    """Decode a receipt (its signature is checked by :func:`verify_receipt`)."""
    if len(raw) > MAX_RECEIPT or not raw.startswith(MAGIC_RECEIPT):
        raise encoding.FormatError("not a receipt")
    outer = encoding.expect_map(encoding.unpack(raw[len(MAGIC_RECEIPT) :]), "body", "sig")
    b = encoding.unpack(encoding.field_bytes(outer, "body"))
    if not isinstance(b, dict):
        raise encoding.FormatError("a receipt's body is not a map")
    kind = encoding.field(b, "kind", str)
    if kind not in KINDS:
        raise encoding.FormatError(f"unknown receipt kind {kind!r}")
    names = [encoding.field(b, k, list) for k in ("covers", "missing")]
    if not all(isinstance(n, str) for ns in names for n in ns):
        raise encoding.FormatError("a receipt names objects by text")
    heads_raw = encoding.field(b, "heads", dict)
    heads: dict[str, tuple[int, str]] = {}
    for cert, value in heads_raw.items():
        if not (isinstance(cert, str) and isinstance(value, list) and len(value) == 2):
            raise encoding.FormatError("bad chain head in a receipt")
        heads[cert] = (int(value[0]), str(value[1]))
    refused = tuple((str(x[0]), str(x[1])) for x in encoding.field(b, "refused", list))
    pieces = tuple(int(x) for x in encoding.field(b, "pieces", list))
    return Receipt(
        kind=kind,
        repo=encoding.field(b, "repo", str),
        issuer=encoding.field(b, "issuer", str),
        downstream=encoding.field(b, "downstream", str),
        seq=encoding.field(b, "seq", int),
        prev=encoding.field(b, "prev", str),
        covers=tuple(names[0]),
        pieces=pieces,
        missing=tuple(names[1]),
        refused=refused,
        heads=heads,
        config_version=encoding.field(b, "config_version", int),
        time=float(encoding.field(b, "time", (int, float))),
        raw=raw,
    )


def verify_receipt(receipt: Receipt, issuer: NodePublic) -> None:
    """Raise encoding.FormatError unless ``issuer`` signed ``receipt``."""
    outer = encoding.expect_map(encoding.unpack(receipt.raw[len(MAGIC_RECEIPT) :]), "body", "sig")
    if issuer.node_id != receipt.issuer:
        raise encoding.FormatError("the receipt names another issuer")
    try:
        issuer.verify(DOMAIN, encoding.field_bytes(outer, "body"), encoding.field_bytes(outer, "sig", 64))
    except BadSignature:
        raise encoding.FormatError("the receipt's signature does not verify") from None


class IssuedChain:
    """The issuer's side: the sequence number and previous hash of its receipts of one kind to
    one downstream node, per repository."""

    def __init__(self, nd: NodeDir, repo_id: str, kind: str, downstream: str) -> None:
        self.path = os.path.join(nd.state_dir(repo_id, "receipts-out"), f"{kind}-{downstream}.json")
        doc = read_json(self.path, {})
        self.seq: int = int(doc.get("seq", 0))
        self.prev: str = str(doc.get("prev", ""))

    def advance(self, receipt: Receipt) -> None:
        self.seq, self.prev = receipt.seq, receipt.hash
        write_json(self.path, {"seq": self.seq, "prev": self.prev})


class ReceivedChain:
    """The receiver's side: every receipt number of one issuer and kind with its hash and its
    ``prev``, so a number seen again with other bytes, or a receipt that does not link to its
    known neighbours (an issuer rolled back, or a forgery), is caught. Receipts may arrive out of
    order (media travel separately): that alone is no fault."""

    def __init__(self, nd: NodeDir, repo_id: str, kind: str, issuer: str) -> None:
        self.path = os.path.join(nd.state_dir(repo_id, "receipts-in"), f"{kind}-{issuer}.json")
        self.known: dict[str, list[str]] = read_json(self.path, {})  # seq -> [hash, prev]

    def judge(self, receipt: Receipt) -> str | None:
        """None when ``receipt`` is new and fits the chain as far as this node knows it;
        "duplicate" when it was accepted before; "rollback" when it contradicts the chain."""
        same = self.known.get(str(receipt.seq))
        if same is not None:
            return "duplicate" if same[0] == receipt.hash else "rollback"
        before = self.known.get(str(receipt.seq - 1))
        if before is not None and receipt.prev != before[0]:
            return "rollback"
        after = self.known.get(str(receipt.seq + 1))
        if after is not None and after[1] != receipt.hash:
            return "rollback"
        return None

    def accept(self, receipt: Receipt) -> None:
        self.known[str(receipt.seq)] = [receipt.hash, receipt.prev]
        write_json(self.path, self.known)
