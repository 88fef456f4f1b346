"""Client certificates (``clients/<hash>``): a client's name, verify key and capabilities,
signed by the master key.

A certificate may bind its client to a host (docs/security.md): the host name sealed to the
data key (only the master key reads it, so hosts stay secret) and a salted commitment to it
(the salt is in the client's put key, so the client can show which host it is bound to). A host
bound here by the master key cannot be claimed by another client; a host named only in a
snapshot body is a claim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import blake3

from bunker import encoding
from bunker.crypto.kem import DataPrivateKey, DataPublicKey, OpenFailed
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.repo.objects import MAGIC_CLIENT, make_signed, name_for, parse_signed

CAPABILITIES = ("backup", "prune")
HOST_INFO = b"bunker client host v2\x00"
MAX_HOST = 255


@dataclass(frozen=True)
class HostBinding:
    """A certificate's host: sealed to the data key, and committed to with the put key's salt."""

    sealed: bytes
    commit: bytes


def host_commitment(salt: bytes, host: str) -> bytes:
    """The salted commitment a certificate carries for its host."""
    return blake3.blake3(HOST_INFO + host.encode(), key=salt).digest()


def bind_host(data_public: DataPublicKey, repo_id: str, verify_key: bytes, host: str, salt: bytes) -> HostBinding:
    """Seal ``host`` for a certificate of ``verify_key`` (the seal opens only for that key)."""
    if not host or len(host.encode()) > MAX_HOST or not host.isprintable():
        raise ValueError(f"host name {host!r} is empty, too long or not printable")
    sealed = data_public.seal(host.encode(), HOST_INFO + repo_id.encode() + verify_key)
    return HostBinding(sealed, host_commitment(salt, host))


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
    host: HostBinding | None = None

    def open_host(self, data_private: DataPrivateKey) -> str | None:
        """The bound host (master key); None when the certificate binds none or its seal does
        not open (then it binds nothing either)."""
        if self.host is None:
            return None
        try:
            host = data_private.open(self.host.sealed, HOST_INFO + self.repo_id.encode() + self.verify_key)
            return host.decode()
        except (OpenFailed, UnicodeDecodeError):
            return None


def make_certificate(
    master: SigningKey,
    repo_id: str,
    client: str,
    verify_key: bytes,
    domain_name: str,
    domain_id: str,
    capabilities: tuple[str, ...],
    host: HostBinding | None = None,
) -> bytes:
    """Issue a certificate (needs the master key)."""
    body: dict[str, object] = {
        "repo": repo_id,
        "client": client,
        "key": verify_key,
        "caps": sorted(capabilities),
        "domain": domain_id,
        "domain_name": domain_name,
        "issued": time.time(),
    }
    if host is not None:
        body["host"] = {"sealed": host.sealed, "commit": host.commit}
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
    host = None
    if b.get("host") is not None:
        h = encoding.expect_map(b["host"], "sealed", "commit")
        host = HostBinding(encoding.field_bytes(h, "sealed"), encoding.field_bytes(h, "commit", 32))
    return Certificate(
        name=name_for("clients", data),
        client=encoding.field(b, "client", str),
        verify_key=encoding.field_bytes(b, "key", 32),
        capabilities=tuple(caps),
        domain=encoding.field(b, "domain", str),
        domain_name=encoding.field(b, "domain_name", str),
        repo_id=repo_id,
        issued=float(encoding.field(b, "issued", (int, float))),
        host=host,
    )
