"""Node certificates (``nodes/<hash>``): a node's name, public keys and capabilities, signed by
the master key (docs/format.md section 23, docs/hierarchy.md).

A node is trusted because the master key signed its certificate, as a client is; it holds no put
key and no master key. Its capabilities say what others may believe of it:

- ``relay``: it may carry a repository's objects upstream and records down (every node has it);
- ``record``: its *record receipts* (docs/hierarchy.md, "Receipts") let nodes below it evict
  what it says the repository of record holds; a receipt from a node without it frees nothing;
- ``mirror``: it may keep a verified copy of the whole repository.

The certificate also records the config version current when it was issued: a fresh node
refuses any config below it (the same floor a put key carries).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bunker import encoding
from bunker.crypto.node_keys import NodePublic
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.objects import MAGIC_NODE, make_signed, name_for, parse_signed

if TYPE_CHECKING:
    from bunker.repo.repository import Repository

NODE_CAPABILITIES = ("relay", "record", "mirror")
MAX_NODE_NAME = 64


def node_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a node (None when it can): it is shown in listings and used as a
    directory name in state, so printable, short, no slash, no leading dot."""
    if not name or len(name) > MAX_NODE_NAME:
        return f"a node name has 1 to {MAX_NODE_NAME} characters"
    if not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        return "a node name holds only letters, digits, '-', '_' and '.', and does not start with '.'"
    return None


@dataclass(frozen=True)
class NodeCertificate:
    """A verified node certificate."""

    name: str  # object name nodes/<hex>
    node: str  # the node's name
    public: NodePublic
    capabilities: tuple[str, ...]
    repo_id: str
    issued: float
    config_version: int  # the config version current at issue: the node's floor

    @property
    def node_id(self) -> str:
        return self.public.node_id

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def make_node_certificate(
    master: SigningKey,
    repo_id: str,
    node: str,
    public: NodePublic,
    capabilities: tuple[str, ...],
    config_version: int,
) -> bytes:
    """Issue a node certificate (needs the master key)."""
    unknown = sorted(set(capabilities) - set(NODE_CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown node capabilities {', '.join(unknown)}")
    body: dict[str, object] = {
        "repo": repo_id,
        "node": node,
        "id": public.node_id,
        "public": public.to_bytes(),
        "caps": sorted(set(capabilities) | {"relay"}),
        "config_version": config_version,
        "issued": time.time(),
    }
    return make_signed(MAGIC_NODE, body, master, "")


def parse_node_certificate(data: bytes, master_verify: bytes, repo_id: str) -> NodeCertificate:
    """Decode and verify a node certificate against the master verify key; raise FormatError."""
    obj = parse_signed(data, MAGIC_NODE)
    if obj.signer != "":
        raise encoding.FormatError("a node certificate must be signed by the master key")
    try:
        verify(master_verify, MAGIC_NODE, obj.body_bytes, obj.sig)
    except BadSignature:
        raise encoding.FormatError("node certificate is not signed by this repository's master key") from None
    b = obj.body
    if encoding.field(b, "repo", str) != repo_id:
        raise encoding.FormatError("node certificate belongs to another repository")
    try:
        public = NodePublic.from_bytes(encoding.field_bytes(b, "public"))
    except ValueError as exc:
        raise encoding.FormatError(f"node certificate holds malformed keys: {exc}") from None
    if encoding.field(b, "id", str) != public.node_id:
        raise encoding.FormatError("node certificate's id is not the fingerprint of its keys")
    caps = encoding.field(b, "caps", list)
    if not all(isinstance(c, str) for c in caps):
        raise encoding.FormatError("bad capability list")
    node = encoding.field(b, "node", str)
    if node_name_problem(node):
        raise encoding.FormatError(f"bad node name {node!r}")
    return NodeCertificate(
        name=name_for("nodes", data),
        node=node,
        public=public,
        capabilities=tuple(caps),
        repo_id=repo_id,
        issued=float(encoding.field(b, "issued", (int, float))),
        config_version=encoding.field(b, "config_version", int),
    )


def node_certificates(repo: Repository) -> list[NodeCertificate]:
    """Every valid node certificate of ``repo`` (damaged ones are skipped: `check` reports them)."""
    out = []
    for info in repo.backend.list("nodes/"):
        try:
            out.append(parse_node_certificate(repo.get_object(info.name), repo.config.master_verify, repo.repo_id))
        except (encoding.FormatError, CorruptObject, ObjectMissing):
            continue
    return sorted(out, key=lambda c: (c.node, c.issued))


def revoked_nodes(repo: Repository) -> set[str]:
    """Node certificates revoked by any config version the repository holds (revocation is
    never undone, and a fork's branches all count)."""
    return {n for cfg in repo.configs.values() for n in cfg.revoked_nodes}


def trusted_node(repo: Repository, node_id: str) -> NodeCertificate | None:
    """The newest non-revoked certificate of the node with ``node_id``, or None."""
    revoked = revoked_nodes(repo)
    found = [c for c in node_certificates(repo) if c.node_id == node_id and c.name not in revoked]
    return max(found, key=lambda c: c.issued) if found else None
