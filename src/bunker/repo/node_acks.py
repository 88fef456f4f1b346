"""Session acknowledgements of nodes (``gc/<hash>``, magic ``BKAK``; docs/hierarchy.md, "Garbage
collection across the hierarchy", and docs/format.md section 24).

A node signs: "every session that started before ``before`` on this node has ended, and every
object it wrote is held by my upstream". Acknowledgements travel up behind the data they cover
(a node passes its downstream nodes' acknowledgements on only once it holds nothing it has not
delivered), so when one reaches the repository of record, what it covers is there.

`bunker prune` at the top deletes a condemned pack only once every node certified for the
repository (and not revoked) has acknowledged a time after the condemnation record was stored.
A node's ``before`` is its own clock; it is never trusted beyond the time the repository of record
stored the acknowledgement (an acknowledgement cannot speak of the future), so a node's clock
that runs ahead can only make it cover less than it says, while one that runs behind by more
than the grace period delays deletions; node clocks must be kept within the grace period
(default 24 h) of the repository's storage clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.crypto.sign import BadSignature
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.node_certs import NodeCertificate, node_certificates, revoked_nodes
from bunker.repo.objects import MAGIC_ACK
from bunker.repo.repository import Repository

DOMAIN = b"bunker session acknowledgement v1"


@dataclass(frozen=True)
class Ack:
    name: str  # gc/<hex>
    node: str  # node id
    before: float  # the node's statement, clamped to the storage time of the object
    stored: float


def make_ack(keys: NodeKeys, repo_id: str, before: float) -> bytes:
    """A signed acknowledgement of ``keys``'s node for ``repo_id``."""
    body = encoding.pack({"repo": repo_id, "node": keys.node_id, "before": float(before), "time": time.time()})
    return MAGIC_ACK + encoding.pack({"body": body, "sig": keys.sign(DOMAIN, body)})


def parse_ack(data: bytes) -> tuple[str, str, float, bytes, bytes]:
    """(repository, node id, before, body, signature) of an acknowledgement, unverified."""
    if not data.startswith(MAGIC_ACK) or len(data) > 4096:
        raise encoding.FormatError("not a session acknowledgement")
    outer = encoding.expect_map(encoding.unpack(data[len(MAGIC_ACK) :]), "body", "sig")
    body_bytes = encoding.field_bytes(outer, "body")
    b = encoding.expect_map(encoding.unpack(body_bytes), "repo", "node", "before", "time")
    return (
        encoding.field(b, "repo", str),
        encoding.field(b, "node", str),
        float(encoding.field(b, "before", (int, float))),
        body_bytes,
        encoding.field_bytes(outer, "sig", 64),
    )


def verify_ack(data: bytes, repo_id: str, signer: NodeCertificate) -> float:
    """``before`` of an acknowledgement signed by ``signer``; raise FormatError otherwise."""
    repo, node, before, body, sig = parse_ack(data)
    if repo != repo_id or node != signer.node_id:
        raise encoding.FormatError("the acknowledgement is of another repository or node")
    try:
        signer.public.verify(DOMAIN, body, sig)
    except BadSignature:
        raise encoding.FormatError("the acknowledgement's signature does not verify") from None
    return before


def newest_acks(repo: Repository) -> tuple[dict[str, Ack], list[Ack]]:
    """The newest valid acknowledgement of each node (by node id), and the older ones (which a
    prune may remove)."""
    certs = {c.node_id: c for c in node_certificates(repo) if c.name not in revoked_nodes(repo)}
    newest: dict[str, Ack] = {}
    older: list[Ack] = []
    for info in repo.backend.list("gc/"):
        try:
            data = repo.get_object(info.name)
            if not data.startswith(MAGIC_ACK):
                continue
            _, node, _, _, _ = parse_ack(data)
            cert = certs.get(node)
            if cert is None:
                continue
            before = min(verify_ack(data, repo.repo_id, cert), info.mtime)
        except (encoding.FormatError, CorruptObject, ObjectMissing):
            continue
        ack = Ack(info.name, node, before, info.mtime)
        have = newest.get(node)
        if have is None or ack.before > have.before:
            if have is not None:
                older.append(have)
            newest[node] = ack
        else:
            older.append(ack)
    return newest, older


class AckView:
    """The nodes a prune must hear from, and what each acknowledged (read once per prune)."""

    def __init__(self, repo: Repository) -> None:
        self.newest, self.older = newest_acks(repo)
        revoked = revoked_nodes(repo)
        self.nodes = {c.node_id: c for c in node_certificates(repo) if c.name not in revoked}

    def blockers(self, stored: float) -> list[tuple[NodeCertificate, Ack | None]]:
        """The nodes whose newest acknowledgement does not cover a record stored at ``stored``."""
        out = []
        for node_id, cert in sorted(self.nodes.items(), key=lambda kv: kv[1].node):
            ack = self.newest.get(node_id)
            if ack is None or ack.before < stored:
                out.append((cert, ack))
        return out
