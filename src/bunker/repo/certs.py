"""Client certificates (``clients/<hash>``): a client's name, verify key and capabilities,
signed by the master key."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.repo.objects import MAGIC_CLIENT, make_signed, name_for, parse_signed

CAPABILITIES = ("backup", "prune")


@dataclass(frozen=True)
class Certificate:
    """A verified client certificate."""

    name: str  # object name clients/<hex>
    client: str  # client name (may be a pseudonym)
    verify_key: bytes
    capabilities: tuple[str, ...]
    domain: str  # dedup domain id (public, derived from S)
    domain_name: str  # the name S is derived from (lets the master find S)
    repo_id: str
    issued: float


def make_certificate(
    master: SigningKey,
    repo_id: str,
    client: str,
    verify_key: bytes,
    domain_name: str,
    domain_id: str,
    capabilities: tuple[str, ...],
) -> bytes:
    """Issue a certificate (needs the master key)."""
    body = {
        "repo": repo_id,
        "client": client,
        "key": verify_key,
        "caps": sorted(capabilities),
        "domain": domain_id,
        "domain_name": domain_name,
        "issued": time.time(),
    }
    return make_signed(MAGIC_CLIENT, body, master, "")


def parse_certificate(data: bytes, master_verify: bytes, repo_id: str) -> Certificate:
    """Decode and verify a certificate against the master verify key."""
    obj = parse_signed(data, MAGIC_CLIENT)
    if obj.signer != "":
        raise encoding.FormatError("certificate must be signed by the master key")
    try:
        verify(master_verify, MAGIC_CLIENT, obj.body_bytes, obj.sig)
    except BadSignature:
        raise encoding.FormatError("certificate is not signed by this repository's master key") from None
    b = obj.body
    if encoding.field(b, "repo", str) != repo_id:
        raise encoding.FormatError("certificate belongs to another repository")
    caps = encoding.field(b, "caps", list)
    if not all(isinstance(c, str) for c in caps):
        raise encoding.FormatError("bad capability list")
    return Certificate(
        name=name_for("clients", data),
        client=encoding.field(b, "client", str),
        verify_key=encoding.field_bytes(b, "key", 32),
        capabilities=tuple(caps),
        domain=encoding.field(b, "domain", str),
        domain_name=encoding.field(b, "domain_name", str),
        repo_id=repo_id,
        issued=float(encoding.field(b, "issued", (int, float))),
    )
