"""Versioned, master-signed repository configuration (``config/<hash>``).

The highest valid version wins. "Valid" means signed by the master verify key whose fingerprint
is the repository id the caller expects; a substituted config signed by another key is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.crypto.kem import DataPublicKey
from bunker.crypto.sign import BadSignature, SigningKey, fingerprint, verify
from bunker.repo.objects import MAGIC_CONFIG, make_signed, parse_signed

FORMAT_VERSION = 1

DEFAULT_CHUNKER = {"min": 256 << 10, "avg": 512 << 10, "max": 4 << 20}
DEFAULT_PACKS = {"target": 16 << 20, "flush_seconds": 10}


@dataclass(frozen=True)
class Revocation:
    """A revoked client: snapshots after ``last_seq`` and its packs are no longer trusted."""

    client: str  # certificate name clients/<hex>
    last_seq: int


@dataclass(frozen=True)
class RepoConfig:
    """One decoded config version."""

    version: int
    repo_id: str
    master_verify: bytes
    data_public: DataPublicKey
    chunker: dict[str, int]
    packs: dict[str, int]
    revoked: tuple[Revocation, ...] = ()
    created: float = field(default=0.0)

    def to_body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "version": self.version,
            "repo": self.repo_id,
            "master_verify": self.master_verify,
            "data_mlkem": self.data_public.mlkem,
            "data_x25519": self.data_public.x25519,
            "chunker": dict(self.chunker),
            "packs": dict(self.packs),
            "revoked": [[r.client, r.last_seq] for r in self.revoked],
            "created": self.created,
        }

    def revoked_clients(self) -> dict[str, int]:
        """Certificate name -> last trusted sequence number."""
        return {r.client: r.last_seq for r in self.revoked}


def make_config(cfg: RepoConfig, master: SigningKey) -> bytes:
    """Sign a config version with the master signing key."""
    return make_signed(MAGIC_CONFIG, cfg.to_body(), master, "")


def parse_config(data: bytes) -> RepoConfig:
    """Decode and verify one config object against its own master verify key.

    Returns the config; the caller must still compare ``repo_id`` with the id it expects.
    """
    obj = parse_signed(data, MAGIC_CONFIG)
    b = obj.body
    if obj.signer != "":
        raise encoding.FormatError("config must be signed by the master key")
    fmt = encoding.field(b, "format", int)
    if fmt != FORMAT_VERSION:
        raise encoding.FormatError(f"format version {fmt} is not supported (this bunker reads {FORMAT_VERSION})")
    mv = encoding.field_bytes(b, "master_verify", 32)
    try:
        verify(mv, MAGIC_CONFIG, obj.body_bytes, obj.sig)
    except BadSignature:
        raise encoding.FormatError("config signature does not verify") from None
    repo_id = encoding.field(b, "repo", str)
    if fingerprint(mv) != repo_id:
        raise encoding.FormatError("config repository id is not the fingerprint of its master verify key")
    chunker = encoding.expect_map(encoding.field(b, "chunker", dict), "min", "avg", "max")
    packs = encoding.expect_map(encoding.field(b, "packs", dict), "target", "flush_seconds")
    if not all(type(v) is int for v in (chunker["min"], chunker["avg"], chunker["max"], packs["target"])):
        raise encoding.FormatError("chunker or pack parameters are not integers")
    if type(packs["flush_seconds"]) not in (int, float):
        raise encoding.FormatError("pack flush interval is not a number")
    if not (
        64 <= chunker["min"] <= 1 << 20
        and 256 <= chunker["avg"] <= 4 << 20
        and 1024 <= chunker["max"] <= 16 << 20
        and chunker["min"] <= chunker["avg"] <= chunker["max"]
    ):
        raise encoding.FormatError("chunker parameters out of range")
    if not (1 << 16 <= packs["target"] <= 1 << 30):
        raise encoding.FormatError("pack parameters out of range")
    revoked = []
    for item in encoding.field(b, "revoked", list):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)):
            raise encoding.FormatError("bad revocation entry")
        revoked.append(Revocation(item[0], item[1]))
    try:
        data_public = DataPublicKey(encoding.field_bytes(b, "data_mlkem"), encoding.field_bytes(b, "data_x25519"))
    except ValueError as exc:
        raise encoding.FormatError(str(exc)) from None
    return RepoConfig(
        version=encoding.field(b, "version", int),
        repo_id=repo_id,
        master_verify=mv,
        data_public=data_public,
        chunker={k: int(chunker[k]) for k in ("min", "avg", "max")},
        packs={k: int(packs[k]) for k in ("target", "flush_seconds")},
        revoked=tuple(revoked),
        created=float(encoding.field(b, "created", (int, float))),
    )


def new_config(master_verify: bytes, data_public: DataPublicKey) -> RepoConfig:
    """Version 1 of a new repository's config, with default parameters."""
    return RepoConfig(
        version=1,
        repo_id=fingerprint(master_verify),
        master_verify=master_verify,
        data_public=data_public,
        chunker=dict(DEFAULT_CHUNKER),
        packs=dict(DEFAULT_PACKS),
        created=time.time(),
    )
