"""Checkpoint roots (``gc/<hash>``, magic ``BKCR``; docs/format.md section 24): a dead session's
last checkpoint, forwarded up by the node that holds it, so that a prune at the repository of
record keeps what the checkpoint names.

A client killed on a node leaves its last lease (with its checkpoint) in the node's store; its
next run through that node turns it into an incomplete snapshot (docs/format.md section 17). The
packs it names reach the top like any others, where no snapshot names them yet: without a root a
prune there would condemn and delete them, and the adopted snapshot would arrive with holes. The
record carries the client-signed lease bytes (verified as a lease is), signed by the node; it
protects the checkpoint's packs until an envelope at the top names its session (committed or
adopted), and a prune then removes it.

The client's next run through its node adopts the checkpoint. A client that never runs there again:
once the lease is older than the node's ``abandon_after`` the node takes it out of its store and,
when no run of a client there adopted it, signs a new record for the same lease with ``abandoned``
set (node/abandon.py). A prune at the top adopts an abandoned checkpoint as it adopts a dead
session's lease (backup/adoption.py); a record without the flag is never adopted there. The flag is
inside the node's signature: a record altered to carry it, or signed by a node the repository does
not certify, is not read at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.crypto.sign import BadSignature
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.leases import lease_problem
from bunker.repo.node_certs import trusted_node
from bunker.repo.objects import MAGIC_CKROOT
from bunker.repo.records import ChainBase, lease_base, parse_lease
from bunker.repo.repository import Repository

DOMAIN = b"bunker checkpoint root v1"
MAX_ROOT = 1 << 20


@dataclass(frozen=True)
class CheckpointRoot:
    name: str  # gc/<hex>
    node: str
    session: str
    lease_name: str  # sessions/<session>.<counter>
    cert: str  # the client certificate that signed the lease
    checkpoint: dict[str, Any]
    abandoned: bool = False  # the node signed that no client run there adopts it (node/abandon.py)
    node_name: str = ""  # the node's name in its certificate
    base: ChainBase | None = None  # the chain head the dead run started from
    counter: int = 0  # of the lease


def make_checkpoint_root(
    keys: NodeKeys, repo_id: str, lease_name: str, lease: bytes, *, abandoned: bool = False
) -> bytes:
    """A node-signed record of the lease ``lease_name`` (its exact bytes); ``abandoned``: the node
    took the lease out of its store and no run of a client there adopted it."""
    fields: dict[str, Any] = {
        "repo": repo_id,
        "node": keys.node_id,
        "lease_name": lease_name,
        "lease": lease,
        "time": time.time(),
    }
    if abandoned:  # absent otherwise: a plain record keeps the bytes it always had
        fields["abandoned"] = True
    body = encoding.pack(fields)
    return MAGIC_CKROOT + encoding.pack({"body": body, "sig": keys.sign(DOMAIN, body)})


def read_checkpoint_root(repo: Repository, name: str, data: bytes) -> CheckpointRoot:
    """Verify a checkpoint root: the node's signature (a node certified for the repository, not
    revoked) and the lease it carries (named as it says, signed by a client that is not revoked,
    with a checkpoint). ``abandoned`` is read from inside the signed body: absent is False, anything
    but a boolean is refused. Raises FormatError."""
    if not data.startswith(MAGIC_CKROOT) or len(data) > MAX_ROOT:
        raise encoding.FormatError("not a checkpoint root")
    outer = encoding.expect_map(encoding.unpack(data[len(MAGIC_CKROOT) :]), "body", "sig")
    body_bytes = encoding.field_bytes(outer, "body")
    b = encoding.expect_map(encoding.unpack(body_bytes), "repo", "node", "lease_name", "lease", "time")
    if encoding.field(b, "repo", str) != repo.repo_id:
        raise encoding.FormatError("a checkpoint root of another repository")
    node = encoding.field(b, "node", str)
    cert = trusted_node(repo, node)
    if cert is None:
        raise encoding.FormatError(f"no trusted certificate of node {node[:16]}")
    try:
        cert.public.verify(DOMAIN, body_bytes, encoding.field_bytes(outer, "sig", 64))
    except BadSignature:
        raise encoding.FormatError("the checkpoint root's signature does not verify") from None
    abandoned = b.get("abandoned", False)
    if not isinstance(abandoned, bool):
        raise encoding.FormatError("the checkpoint root's abandoned field is not a boolean")
    lease_name = encoding.field(b, "lease_name", str)
    lease = encoding.field_bytes(b, "lease")
    lease_body, signer = parse_lease(lease, lease_name)
    why = lease_problem(repo, lease, signer)
    if why:
        raise encoding.FormatError(why)
    cp = lease_body.get("checkpoint")
    if not isinstance(cp, dict):
        raise encoding.FormatError("the lease holds no checkpoint")
    counter = lease_body.get("counter", 0)
    return CheckpointRoot(
        name,
        node,
        str(lease_body["session"]),
        lease_name,
        signer,
        cp,
        abandoned,
        cert.node,
        lease_base(lease_body),
        counter if type(counter) is int else 0,
    )


def checkpoint_roots(repo: Repository) -> list[CheckpointRoot]:
    """Every valid checkpoint root in ``gc/`` (invalid ones are skipped: `check` reports them)."""
    out = []
    for info in repo.backend.list("gc/"):
        try:
            data = repo.get_object(info.name)
            if not data.startswith(MAGIC_CKROOT):
                continue
            out.append(read_checkpoint_root(repo, info.name, data))
        except (encoding.FormatError, CorruptObject, ObjectMissing):
            continue
    return out
