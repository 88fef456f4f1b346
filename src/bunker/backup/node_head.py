"""A client's chain head as its node knows it (docs/hierarchy.md, "A client without a chain head").

A client links each snapshot to the newest one of its chain: the head it remembers (its state
directory) or the newest the repository lists. Behind a node, the listing holds only what that
node holds: a client whose state directory is lost, or a new machine with the old put key, that
backs up through a node it never used before sees none of its snapshots, and a snapshot numbered
from there would take a place the repository of record already holds (a fork, which the node
keeps back).

A node knows more than its store: the newest snapshot per client that it saw the repository of
record hold, by reading its direct upstream or from record receipts (node/witnessed.py). It
gives that as a signed witness statement; the client verifies it with the node's certificate
(repo/witnesses.py) and continues its chain from the head it names when that is newer than
anything else it knows.
"""

from __future__ import annotations

from dataclasses import dataclass

from bunker import encoding
from bunker.errors import BunkerError
from bunker.repo.certs import Certificate
from bunker.repo.repository import Repository
from bunker.repo.witnesses import read_statement


@dataclass(frozen=True)
class NodeHead:
    """The newest snapshot of a client that its node saw the repository of record hold."""

    node: str  # the node's name, from its certificate
    seq: int
    name: str  # snapshots/<hex>
    how: str  # how the node knows, for a message


def node_head(repo: Repository, cert: Certificate) -> NodeHead | None:
    """The head of ``cert``'s chain that the node serving ``repo`` witnessed at the repository of
    record; None when no node serves it, the node knows none, or its statement does not verify
    (a statement that does not verify counts for nothing: the listing alone decides then)."""
    fetch = None
    for backend in (repo.backend, getattr(repo.backend, "upstream", None)):
        node: object = getattr(backend, "server_node", "")
        if node:
            fetch = getattr(backend, "witness_statement", None)
            break
    if fetch is None:
        return None
    try:
        data = fetch()
        if data is None:
            return None
        statement = read_statement(repo, data)
    except (BunkerError, encoding.FormatError):
        return None
    for h in statement.heads:
        if h.cert == cert.name:
            return NodeHead(statement.node, h.seq, h.snapshot, h.describe())
    return None
