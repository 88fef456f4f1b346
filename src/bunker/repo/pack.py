"""Packs: key groups of encrypted blobs plus an encrypted, signed trailer (DESIGN.md §3).

Layout (all integers little-endian)::

    "BKPK" 0x01                                   header
    per key group: sealed group key (HPKE, 1168 B), then its blobs
    footer: msgpack {"body_hash", "salt", "trailer", "signer", "sig"}
    u32 footer length, "BKPE"

``body_hash`` is BLAKE3 of everything before the footer. The trailer is AES-256-GCM under
keyed BLAKE3(S_index, "trailer" || salt) with ``body_hash`` as associated data; it lists the key
groups and, per blob: chunk id, group, offset, length, raw length and K_blob wrapped under the
group key. The writer signs (body_hash, salt, BLAKE3(trailer)), so a keyless check verifies
authorship and a pack can never be spliced with another pack's trailer.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import blake3

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash
from bunker.crypto.kem import DataPrivateKey, DataPublicKey, OpenFailed
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import ObjectMissing
from bunker.repo.objects import MAGIC_PACK, check_ref
from bunker.storage.backend import Backend

HEADER = MAGIC_PACK + b"\x01"
TAIL_MAGIC = b"BKPE"
TAIL = struct.Struct("<I4s")
MAX_FOOTER = 64 << 20
FOOTER_FIRST_READ = 64 << 10
GROUP_INFO = b"bunker group key v1\x00"
WRAPPED_SIZE = aead.NONCE_SIZE + 32 + aead.TAG_SIZE
KIND_DATA = "data"
KIND_META = "meta"


@dataclass(frozen=True)
class BlobEntry:
    """One blob of a pack as listed by its trailer."""

    chunk_id: bytes
    group: int
    offset: int
    length: int
    raw_length: int
    wrapped_key: bytes


@dataclass(frozen=True)
class Trailer:
    """A decrypted pack trailer."""

    kind: str
    domain: str
    writer: str  # certificate name
    body_hash: bytes
    groups: list[tuple[int, int]]
    blobs: list[BlobEntry]


@dataclass(frozen=True)
class PackFooter:
    """The plaintext footer: verifiable without any key."""

    body_hash: bytes
    salt: bytes
    trailer_ct: bytes
    signer: str
    sig: bytes
    body_length: int

    def signed_message(self) -> bytes:
        return signed_message(self.body_hash, self.salt, self.trailer_ct)


def signed_message(body_hash: bytes, salt: bytes, trailer_ct: bytes) -> bytes:
    return encoding.pack({"body_hash": body_hash, "salt": salt, "trailer_hash": blake3.blake3(trailer_ct).digest()})


def trailer_key(secrets: PutSecrets, salt: bytes) -> bytes:
    return keyed_hash(secrets.index_key, b"trailer\x00" + salt)


def group_info(domain_id: str) -> bytes:
    return GROUP_INFO + domain_id.encode()


class PackWriter:
    """Builds one pack in memory as a list of parts (no copying while it grows); the body hash is
    computed incrementally. Not thread-safe: the caller serializes ``add``."""

    def __init__(
        self, kind: str, secrets: PutSecrets, data_public: DataPublicKey, signer: SigningKey, cert_name: str
    ) -> None:
        self.kind = kind
        self._secrets = secrets
        self._signer = signer
        self._cert = cert_name
        group_key = os.urandom(32)
        self._group = aead.Cipher(group_key)
        sealed = data_public.seal(group_key, group_info(secrets.domain_id))
        self._parts: list[bytes | bytearray] = [HEADER, sealed]
        self._size = len(HEADER) + len(sealed)
        self._groups = [(len(HEADER), len(sealed))]
        self._hasher = blake3.blake3(HEADER)
        self._hasher.update(sealed)
        self.entries: list[BlobEntry] = []

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, cid: bytes, blob: bytes | bytearray, raw_length: int, k_blob: bytes) -> BlobEntry:
        """Append an encrypted blob; its key is wrapped under this pack's group key."""
        wrapped = self._group.encrypt(k_blob, cid)
        entry = BlobEntry(cid, len(self._groups) - 1, self._size, len(blob), raw_length, wrapped)
        self._parts.append(blob)
        self._size += len(blob)
        self.entries.append(entry)
        return entry

    def finish(self) -> tuple[str, bytes]:
        """Seal the trailer, sign, and return (hex name, pack bytes)."""
        for part in self._parts[2:]:
            self._hasher.update(part)  # large parts are hashed with the GIL released
        body_hash = self._hasher.digest()
        salt = os.urandom(16)
        trailer = {  # keys in sorted order: encoded as is (canonical without a recursive pass)
            "blobs": [[e.chunk_id, e.group, e.offset, e.length, e.raw_length, e.wrapped_key] for e in self.entries],
            "domain": self._secrets.domain_id,
            "groups": [list(g) for g in self._groups],
            "kind": self.kind,
            "v": 1,
            "writer": self._cert,
        }
        trailer_ct = aead.encrypt(trailer_key(self._secrets, salt), encoding.pack_ordered(trailer), body_hash)
        sig = self._signer.sign(MAGIC_PACK, signed_message(body_hash, salt, trailer_ct))
        footer = encoding.pack(
            {"body_hash": body_hash, "salt": salt, "trailer": trailer_ct, "signer": self._cert, "sig": sig}
        )
        tail = footer + TAIL.pack(len(footer), TAIL_MAGIC)
        self._hasher.update(tail)
        name = self._hasher.hexdigest()
        self._parts.append(tail)
        data = b"".join(self._parts)
        self._parts = []
        return name, data


class NeedMoreBytes(encoding.FormatError):
    """The bytes given end with a valid tail but do not hold the whole footer."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"need the last {needed} bytes")
        self.needed = needed


def fetch_footer(backend: Backend, name: str) -> PackFooter:
    """Read a pack's footer with range reads: one small read, a second one only for big trailers.
    Raises ObjectMissing, or FormatError if the footer is malformed."""
    info = backend.stat(name)
    if info is None:
        raise ObjectMissing(name)
    try:
        return parse_footer(backend.get(name, -min(FOOTER_FIRST_READ, info.size)), info.size)
    except NeedMoreBytes as more:
        return parse_footer(backend.get(name, -min(more.needed, info.size)), info.size)


def parse_footer(tail_and_footer: bytes, total_size: int) -> PackFooter:
    """Decode the footer from the pack's last bytes (must include the whole footer and tail)."""
    if len(tail_and_footer) < TAIL.size:
        raise encoding.FormatError("pack is too short")
    flen, magic = TAIL.unpack(tail_and_footer[-TAIL.size :])
    if magic != TAIL_MAGIC:
        raise encoding.FormatError("pack tail magic is wrong (truncated or not a pack)")
    if flen > MAX_FOOTER or flen + TAIL.size + len(HEADER) > total_size:
        raise encoding.FormatError(f"pack footer length {flen} is impossible")
    if len(tail_and_footer) < flen + TAIL.size:
        raise NeedMoreBytes(flen + TAIL.size)
    raw = tail_and_footer[-(flen + TAIL.size) : -TAIL.size]
    m = encoding.expect_map(encoding.unpack(raw), "body_hash", "salt", "trailer", "signer", "sig")
    return PackFooter(
        body_hash=encoding.field_bytes(m, "body_hash", 32),
        salt=encoding.field_bytes(m, "salt", 16),
        trailer_ct=encoding.field_bytes(m, "trailer"),
        signer=check_ref(m["signer"], "clients"),
        sig=encoding.field_bytes(m, "sig", 64),
        body_length=total_size - flen - TAIL.size,
    )


def verify_footer(footer: PackFooter, writer_verify_key: bytes) -> None:
    """Raise FormatError unless the writer's signature over the footer verifies."""
    try:
        verify(writer_verify_key, MAGIC_PACK, footer.signed_message(), footer.sig)
    except BadSignature:
        raise encoding.FormatError("pack signature does not verify") from None


def decrypt_trailer(footer: PackFooter, secrets: PutSecrets) -> Trailer:
    """Decrypt and validate a trailer (with S of the pack's domain)."""
    try:
        plain = aead.decrypt(trailer_key(secrets, footer.salt), footer.trailer_ct, footer.body_hash)
    except aead.DecryptionFailed:
        raise encoding.FormatError("pack trailer does not decrypt (altered, or another dedup domain)") from None
    m = encoding.expect_map(encoding.unpack(plain), "kind", "domain", "writer", "groups", "blobs")
    body_len = footer.body_length
    groups: list[tuple[int, int]] = []
    for g in encoding.field(m, "groups", list):
        if not (isinstance(g, list) and len(g) == 2 and all(type(x) is int for x in g)):
            raise encoding.FormatError("bad key group entry")
        if g[0] < len(HEADER) or g[1] <= 0 or g[0] + g[1] > body_len:
            raise encoding.FormatError("key group outside the pack body")
        groups.append((g[0], g[1]))
    blobs = []
    for b in encoding.field(m, "blobs", list):
        if not (isinstance(b, list) and len(b) == 6):
            raise encoding.FormatError("bad blob entry")
        cid, grp, off, length, raw, wrapped = b
        if not (isinstance(cid, bytes) and len(cid) == 32 and isinstance(wrapped, bytes)):
            raise encoding.FormatError("bad blob entry")
        if not all(type(x) is int for x in (grp, off, length, raw)) or not 0 <= grp < len(groups):
            raise encoding.FormatError("bad blob entry")
        if off < len(HEADER) or length < aead.OVERHEAD or off + length > body_len or raw < 0 or raw > 1 << 30:
            raise encoding.FormatError("blob outside the pack body")
        blobs.append(BlobEntry(cid, grp, off, length, raw, wrapped))
    return Trailer(
        kind=encoding.field(m, "kind", str),
        domain=encoding.field(m, "domain", str),
        writer=encoding.field(m, "writer", str),
        body_hash=footer.body_hash,
        groups=groups,
        blobs=blobs,
    )


def open_group_key(sealed: bytes, data_private: DataPrivateKey, domain_id: str) -> bytes:
    """Open a key group's sealed key with the master's data private key."""
    try:
        key = data_private.open(sealed, group_info(domain_id))
    except OpenFailed:
        raise encoding.FormatError("key group does not open with the master key") from None
    if len(key) != 32:
        raise encoding.FormatError("key group holds a key of the wrong size")
    return key


def unwrap_blob_key(group: aead.Cipher, entry: BlobEntry) -> bytes:
    """K_blob of one blob, from its wrapped key (``group``: the cipher of its group key)."""
    try:
        return group.decrypt(entry.wrapped_key, entry.chunk_id)
    except aead.DecryptionFailed:
        raise encoding.FormatError("wrapped blob key does not open") from None
