"""Versioned, master-signed repository configuration (``config/<hash>``).

The highest valid version wins. "Valid" means signed by the master verify key whose fingerprint
is the repository id the caller expects; a substituted config signed by another key is refused.
In format 2 the versions form a hash chain (``prev``, and ``merges`` for a version that joins
two branches), revocations name a client's last trusted snapshot object, and ``legacy`` records
the format-1 chain heads that `bunker migrate` found (docs/format.md section 8). Choosing among
versions, forks and the reader's floor: repo/config_chain.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.crypto.kem import DataPublicKey
from bunker.crypto.sign import BadSignature, SigningKey, fingerprint, verify
from bunker.repo.objects import MAGIC_CONFIG, check_ref, make_signed, parse_signed

FORMAT_VERSION = 2
LEGACY_FORMAT = 1  # read only to migrate (`bunker migrate`) and as the ancestors of a migrated chain

DEFAULT_CHUNKER = {"min": 256 << 10, "avg": 512 << 10, "max": 4 << 20}
DEFAULT_PACKS = {"target": 16 << 20, "flush_seconds": 10}


@dataclass(frozen=True)
class Revocation:
    """A revoked client: only its snapshots on the chain ending at ``last`` stay trusted (none
    when ``last`` is ""), and nobody deduplicates against its packs."""

    client: str  # certificate name clients/<hex>
    last_seq: int  # the sequence number of ``last`` (0: none); in format 1 the only field
    last: str | None = None  # snapshots/<hex> of the last trusted snapshot; None only in format-1 configs


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
    format: int = FORMAT_VERSION
    prev: str = ""  # config/<hex> of the version this one follows ("" for the first)
    merges: tuple[str, ...] = ()  # config/<hex> of other branches' heads this version joins
    legacy: dict[str, tuple[str, ...]] = field(default_factory=dict)  # cert -> format-1 chain heads (snapshots/<hex>)
    revoked_nodes: tuple[str, ...] = ()  # node certificates (nodes/<hex>) no longer trusted

    def to_body(self) -> dict[str, Any]:
        if self.format != FORMAT_VERSION:
            raise ValueError("bunker writes only format-2 configs")
        body: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "version": self.version,
            "prev": self.prev,
            "merges": sorted(self.merges),
            "repo": self.repo_id,
            "master_verify": self.master_verify,
            "data_mlkem": self.data_public.mlkem,
            "data_x25519": self.data_public.x25519,
            "chunker": dict(self.chunker),
            "packs": dict(self.packs),
            "revoked": sorted([r.client, r.last or "", r.last_seq] for r in self.revoked),
            "legacy": {cert: sorted(heads) for cert, heads in sorted(self.legacy.items())},
            "created": self.created,
        }
        if self.revoked_nodes:  # optional: configs without revoked nodes keep their old shape
            body["revoked_nodes"] = sorted(self.revoked_nodes)
        return body


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
    if fmt not in (LEGACY_FORMAT, FORMAT_VERSION):
        raise encoding.FormatError(
            f"format version {fmt} is not supported (this bunker reads {FORMAT_VERSION}, and {LEGACY_FORMAT} to "
            "migrate it); use a newer bunker"
        )
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
    revoked = [_parse_revocation(item, fmt) for item in encoding.field(b, "revoked", list)]
    prev: str = ""
    merges: tuple[str, ...] = ()
    legacy: dict[str, tuple[str, ...]] = {}
    revoked_nodes: tuple[str, ...] = ()
    if fmt >= 2:
        if "revoked_nodes" in b:
            revoked_nodes = tuple(check_ref(n, "nodes") for n in encoding.field(b, "revoked_nodes", list))
        prev = encoding.field(b, "prev", str)
        if prev:
            check_ref(prev, "config")
        merges = tuple(check_ref(m, "config") for m in encoding.field(b, "merges", list))
        raw_legacy = encoding.field(b, "legacy", dict)
        legacy = {
            check_ref(k, "clients"): tuple(check_ref(h, "snapshots") for h in encoding.field(raw_legacy, k, list))
            for k in raw_legacy
        }
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
        format=fmt,
        prev=prev,
        merges=merges,
        legacy=legacy,
        revoked_nodes=revoked_nodes,
    )


def _parse_revocation(item: object, fmt: int) -> Revocation:
    """One entry of ``revoked``: ``[cert, last seq]`` in format 1, ``[cert, last snapshot or "",
    last seq]`` in format 2."""
    if not isinstance(item, list) or len(item) != (2 if fmt == LEGACY_FORMAT else 3):
        raise encoding.FormatError("bad revocation entry")
    cert = check_ref(item[0], "clients")
    seq = item[-1]
    if type(seq) is not int or seq < 0:
        raise encoding.FormatError("bad revocation entry")
    if fmt == LEGACY_FORMAT:
        return Revocation(cert, seq)
    last = item[1]
    if not isinstance(last, str) or (last and check_ref(last, "snapshots") != last) or (not last) != (seq == 0):
        raise encoding.FormatError("bad revocation entry")
    return Revocation(cert, seq, last)


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
