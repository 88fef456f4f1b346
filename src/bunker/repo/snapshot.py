"""Snapshots (``snapshots/<hash>``): a signed, public envelope and a sealed body.

The envelope (readable by anyone holding the repository) says: client, certificate, sequence
number, previous envelope's object name, time, level, complete or not, statistics, the pack set
(plaintext) and chunk set references, the hash of the body ciphertext, the session whose run it
holds (and which checkpoint of it), the path-set id of its run (a keyed hash of its paths, so
every put key of the domain groups retention by path set: ``path_set_id``), and, for an
incomplete snapshot that ``bunker prune`` made from a dead client's last checkpoint, whose run it
was (``adopted``). The body (host, paths,
tags, root tree, log) is AES-256-GCM under a random key that is HPKE-sealed to the data public
key: only the master key opens it. The writer's signature covers the envelope, which includes
the body hash.

A body is sealed to what never changes when a snapshot is adopted or renumbered (docs/format.md
section 13, docs/security.md): the repository id, the certificate of the client whose run it is,
that client's dedup domain, the session and the checkpoint counter. A body moved under another
envelope (another client's chain, another session) does not open.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import blake3

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash
from bunker.crypto.kem import DataPrivateKey, DataPublicKey, OpenFailed
from bunker.crypto.sign import SigningKey
from bunker.repo.objects import MAGIC_SNAPSHOT, check_ref

LEVELS = ("ok", "note", "warn", "err", "fatal")
BODY_INFO_V1 = b"bunker snapshot body v1\x00"
BODY_INFO = b"bunker snapshot body v2\x00"
ENVELOPE_VERSIONS = (1, 2)  # 1: written before format 2, trusted only on chains `bunker migrate` recorded
MAX_CLIENT_NAME = 256  # longer names in an ``adopted`` field are refused (no certificate has one)
FINAL = 0  # the counter of a finished run's own snapshot; checkpoints are counted from 1
MAX_COUNTER = 1 << 40
PATH_SET_ID_BYTES = 16  # 32 hex digits: ids of distinct path sets never collide in practice


def is_session_id(value: object) -> bool:
    """A session id: 24 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 24 and all(c in "0123456789abcdef" for c in value)


def is_path_set_id(value: object) -> bool:
    """A path-set id: 32 lowercase hex digits."""
    return (
        isinstance(value, str) and len(value) == 2 * PATH_SET_ID_BYTES and all(c in "0123456789abcdef" for c in value)
    )


def path_set_id(secrets: PutSecrets, paths: Iterable[str | bytes]) -> str:
    """The public id of a snapshot's path set (docs/format.md section 13, ``path_set``): a keyed
    BLAKE3 under ``S_paths`` of the canonical msgpack array of the distinct paths of the body's
    ``paths`` field, each as its bytes (UTF-8; the bytes themselves where the OS gave undecodable
    ones), sorted bytewise. Without ``S`` the id says nothing about the paths; two snapshots of
    one domain with equal path sets have equal ids, which anyone holding the repository sees."""
    items = sorted({p if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape") for p in paths})
    return keyed_hash(secrets.path_set_key, encoding.pack(items), PATH_SET_ID_BYTES).hex()


@dataclass(frozen=True)
class BodyBinding:
    """What a snapshot body is sealed to (format 2): the repository, the certificate and dedup
    domain of the client whose run it holds, the session and the checkpoint counter (FINAL for
    the finished run's own snapshot). Not the sequence number: a checkpoint is sealed before its
    sequence is known, and adoption and renumbering sign it under another one."""

    repo_id: str
    cert: str
    domain: str
    session: str
    counter: int

    def aad(self) -> bytes:
        return BODY_INFO + encoding.pack(
            {
                "cert": self.cert,
                "counter": self.counter,
                "domain": self.domain,
                "repo": self.repo_id,
                "session": self.session,
            }
        )


@dataclass(frozen=True)
class Adoption:
    """Whose run an adopted snapshot holds: ``bunker prune`` turned the last checkpoint of a session
    of another client (dead for longer than the prune's grace period) into an incomplete snapshot
    in the pruner's own chain, because only a client's own key can extend its chain."""

    cert: str  # clients/<hex> of the client whose run it was
    client: str  # that certificate's client name
    session: str  # the dead session's id (24 hex digits)

    def to_body(self) -> dict[str, str]:
        return {"cert": self.cert, "client": self.client, "session": self.session}


@dataclass(frozen=True)
class Envelope:
    """The public part of a snapshot."""

    repo_id: str
    client: str
    cert: str
    seq: int
    prev: str  # snapshots/<hex> of the previous envelope of this client, "" for the first
    time: float
    level: str
    complete: bool
    stats: dict[str, int]
    packset: str
    chunkset: str
    domain: str
    body_hash: bytes
    sealed_key: bytes
    master_on_client: bool = False
    adopted: Adoption | None = None  # set only on a snapshot made by prune from another run
    session: str = ""  # the session whose run this is ("" only in format-1 envelopes)
    counter: int = FINAL  # which checkpoint of it (FINAL: the finished run)
    version: int = 2  # envelope version; 1 for snapshots written before format 2
    path_set: str = ""  # path_set_id of the run's paths ("" in snapshots written before it existed)

    @property
    def original_cert(self) -> str:
        """The certificate of the client whose run the snapshot holds (its body is sealed to it)."""
        return self.adopted.cert if self.adopted is not None else self.cert

    def binding(self) -> BodyBinding:
        """What this envelope says the body is sealed to (format 2)."""
        return BodyBinding(self.repo_id, self.original_cert, self.domain, self.session, self.counter)

    @property
    def owner(self) -> str:
        """The client whose run this snapshot holds as it claims it (listings and retention use
        the claim only once repo/selection.py ``owner`` has checked it)."""
        return self.adopted.client if self.adopted is not None else self.client

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": self.version,
            "repo": self.repo_id,
            "client": self.client,
            "cert": self.cert,
            "seq": self.seq,
            "prev": self.prev,
            "time": self.time,
            "level": self.level,
            "complete": self.complete,
            "stats": self.stats,
            "packset": self.packset,
            "chunkset": self.chunkset,
            "domain": self.domain,
            "body_hash": self.body_hash,
            "sealed_key": self.sealed_key,
            "master_on_client": self.master_on_client,
        }
        if self.adopted is not None:  # absent otherwise: older snapshots keep their bytes
            body["adopted"] = self.adopted.to_body()
        if self.version >= 2:
            body["session"] = self.session
            body["counter"] = self.counter
        if self.path_set:  # optional: older snapshots keep their bytes
            body["path_set"] = self.path_set
        return body


def seal_body(body: dict[str, Any], data_public: DataPublicKey, binding: BodyBinding) -> tuple[bytes, bytes]:
    """Encrypt a body under a fresh key sealed to ``binding``; return (sealed key, body ciphertext)."""
    key = os.urandom(32)
    sealed = data_public.seal(key, BODY_INFO + binding.repo_id.encode())
    return sealed, aead.encrypt(key, encoding.pack(body), binding.aad())


def make_snapshot(env: Envelope, body_ct: bytes, signer: SigningKey) -> bytes:
    """Encode and sign a snapshot object."""
    env_bytes = encoding.pack(env.to_body())
    sig = signer.sign(MAGIC_SNAPSHOT, env_bytes)
    return MAGIC_SNAPSHOT + encoding.pack({"env": env_bytes, "body": body_ct, "signer": env.cert, "sig": sig})


@dataclass(frozen=True)
class ParsedSnapshot:
    """A decoded snapshot; the signature must be verified by the caller (see Repository)."""

    env: Envelope
    env_bytes: bytes
    body_ct: bytes
    sig: bytes


def parse_snapshot(data: bytes) -> ParsedSnapshot:
    """Decode a snapshot object and check the body hash; raise FormatError if malformed."""
    if data[:4] != MAGIC_SNAPSHOT:
        raise encoding.FormatError("not a snapshot object")
    outer = encoding.expect_map(encoding.unpack(data[4:]), "env", "body", "signer", "sig")
    env_bytes = encoding.field_bytes(outer, "env")
    body_ct = encoding.field_bytes(outer, "body")
    sig = encoding.field_bytes(outer, "sig", 64)
    e = encoding.expect_map(encoding.unpack(env_bytes))
    version = encoding.field(e, "v", int)
    if version not in ENVELOPE_VERSIONS:
        raise encoding.FormatError(f"envelope version {version} is not known (this bunker reads 1 and 2)")
    session, counter = "", FINAL
    if version >= 2:
        session = encoding.field(e, "session", str)
        counter = encoding.field(e, "counter", int)
        if not is_session_id(session):
            raise encoding.FormatError("envelope names no valid session")
        if not 0 <= counter <= MAX_COUNTER:
            raise encoding.FormatError("envelope has an invalid checkpoint counter")
    level = encoding.field(e, "level", str)
    if level not in LEVELS:
        raise encoding.FormatError(f"unknown level {level!r}")
    prev = encoding.field(e, "prev", str)
    if prev:
        check_ref(prev, "snapshots")
    path_set = e.get("path_set", "")
    if path_set != "" and not is_path_set_id(path_set):
        raise encoding.FormatError("envelope names no valid path-set id")
    stats = encoding.field(e, "stats", dict)
    if not all(isinstance(k, str) and type(v) is int for k, v in stats.items()):
        raise encoding.FormatError("bad statistics")
    env = Envelope(
        repo_id=encoding.field(e, "repo", str),
        client=encoding.field(e, "client", str),
        cert=check_ref(e.get("cert"), "clients"),
        seq=encoding.field(e, "seq", int),
        prev=prev,
        time=float(encoding.field(e, "time", (int, float))),
        level=level,
        complete=encoding.field(e, "complete", bool),
        stats=stats,
        packset=check_ref(e.get("packset"), "refs"),
        chunkset=check_ref(e.get("chunkset"), "refs"),
        domain=encoding.field(e, "domain", str),
        body_hash=encoding.field_bytes(e, "body_hash", 32),
        sealed_key=encoding.field_bytes(e, "sealed_key"),
        master_on_client=bool(e.get("master_on_client", False)),
        adopted=_parse_adoption(e.get("adopted")),
        session=session,
        counter=counter,
        version=version,
        path_set=path_set,
    )
    if env.adopted is not None and env.complete:
        raise encoding.FormatError("an adopted snapshot (made from a dead run's checkpoint) must be incomplete")
    if counter != FINAL and env.complete:
        raise encoding.FormatError("a snapshot made from a checkpoint must be incomplete")
    if version >= 2 and env.adopted is not None and (env.adopted.session != session or counter == FINAL):
        raise encoding.FormatError("an adopted run must be the envelope's session and one of its checkpoints")
    if env.seq < 1 or (env.seq == 1) != (env.prev == ""):
        raise encoding.FormatError("sequence number and previous snapshot do not agree")
    if outer["signer"] != env.cert:
        raise encoding.FormatError("snapshot signer is not the envelope's certificate")
    if blake3.blake3(body_ct).digest() != env.body_hash:
        raise encoding.FormatError("snapshot body does not match the signed body hash")
    return ParsedSnapshot(env, env_bytes, body_ct, sig)


def _parse_adoption(raw: object) -> Adoption | None:
    """The optional ``adopted`` field (untrusted input): nil/absent, or a map with the
    certificate, client name and session of the run."""
    if raw is None:
        return None
    a = encoding.expect_map(raw, "cert", "client", "session")  # other keys: ignored (later versions)
    client = encoding.field(a, "client", str)
    session = encoding.field(a, "session", str)
    if not client or len(client) > MAX_CLIENT_NAME or not client.isprintable():
        raise encoding.FormatError("adopted field has an invalid client name")
    if not is_session_id(session):
        raise encoding.FormatError("adopted field has an invalid session id")
    return Adoption(check_ref(a.get("cert"), "clients"), client, session)


def open_body(snap: ParsedSnapshot, data_private: DataPrivateKey) -> dict[str, Any]:
    """Decrypt a snapshot's body with the master key. A format-2 body opens only under the
    envelope it was sealed for (same repository, original client, domain, session, counter)."""
    env = snap.env
    try:
        if env.version >= 2:
            key = data_private.open(env.sealed_key, BODY_INFO + env.repo_id.encode())
        else:
            key = data_private.open(env.sealed_key, BODY_INFO_V1 + env.repo_id.encode())
    except OpenFailed:
        raise encoding.FormatError("snapshot body key does not open with the master key") from None
    try:
        plain = aead.decrypt(key, snap.body_ct, env.binding().aad() if env.version >= 2 else b"snapshot body")
    except aead.DecryptionFailed:
        raise encoding.FormatError(
            "snapshot body was not sealed for this envelope (moved from another client's, session's or checkpoint's "
            "snapshot, or altered)"
            if env.version >= 2
            else "snapshot body does not decrypt with the master key"
        ) from None
    body = encoding.expect_map(encoding.unpack(plain), "host", "paths", "tags", "root", "log")
    root = body["root"]
    if not (isinstance(root, bytes) and len(root) == 32):
        raise encoding.FormatError("snapshot body has no valid root tree")
    return body
