"""Packs: key groups of encrypted blobs plus an encrypted, signed trailer (docs/format.md section 10).

Layout (all integers little-endian)::

    "BKPK" 0x01                                   header
    per key group: sealed group key (HPKE, 1168 B), then its blobs
    footer: msgpack {"body_hash", "salt", "trailer", "signer", "sig"}
    u32 footer length, "BKPE"

``body_hash`` is BLAKE3 of everything before the footer. The trailer is AES-256-GCM under
keyed BLAKE3(S_index, "trailer" || salt) with ``body_hash`` as associated data; it lists per key
group its sealed key's offset and length and its blobs in pack order, each as chunk id, length,
raw length and K_blob wrapped under the group key with AES Key Wrap (RFC 3394, 40 bytes). A
group's blobs lie back to back right after its sealed key, so their offsets are not stored: the
reader computes them. The writer signs (body_hash, salt, BLAKE3(trailer)), so a keyless check
verifies authorship and a pack can never be spliced with another pack's trailer.

The wrapped key is deterministic and not bound to the chunk id: none is needed, because the blob
itself is AES-GCM under K_blob with the chunk id as associated data, so a wrapped key moved to
another entry opens nothing. The group key is used for nothing but key wrapping.
"""

from __future__ import annotations

import itertools
import operator
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

import blake3

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash
from bunker.crypto.kem import DataPrivateKey, DataPublicKey, OpenFailed
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import ObjectMissing
from bunker.repo.objects import MAGIC_PACK, check_ref
from bunker.repo.pack_body import FinishedPack, PackBody
from bunker.storage.backend import Backend
from bunker.storage.staged import StagedFile

HEADER = MAGIC_PACK + b"\x01"
TAIL_MAGIC = b"BKPE"
TAIL = struct.Struct("<I4s")
MAX_FOOTER = 64 << 20
FOOTER_FIRST_READ = 64 << 10
GROUP_INFO = b"bunker group key v1\x00"
WRAPPED_SIZE = 32 + aead.KEY_WRAP_OVERHEAD  # AES Key Wrap (RFC 3394) of a 32-byte K_blob
MAX_RAW_LENGTH = 1 << 30
KIND_DATA = "data"
KIND_META = "meta"


class BlobEntry(NamedTuple):
    """One blob of a pack as listed by its trailer (``group`` and ``offset`` are implied by the
    blob's place in the trailer: the reader computes them). A tuple: a trailer makes one per
    blob, and a frozen dataclass costs several times as much to make."""

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


class KeyGroup:
    """A random group key and its HPKE seal to the data public key (FORMAT.md 10.4): blob keys
    wrapped under it open only with the master key."""

    __slots__ = ("_cipher", "sealed")

    def __init__(self, secrets: PutSecrets, data_public: DataPublicKey) -> None:
        group_key = os.urandom(32)
        self._cipher = aead.Cipher(group_key)
        self.sealed = data_public.seal(group_key, group_info(secrets.domain_id))

    def wrap(self, k_blob: bytes) -> bytes:
        """A blob key wrapped under the group key (AES Key Wrap, 40 bytes)."""
        return self._cipher.wrap_key(k_blob)


class PackWriter:
    """Builds one pack with one key group, blob by blob: in ``staged`` (a file from
    Backend.stage, see repo/pack_body.py) or in memory as a list of parts (no copying while it
    grows). Not thread-safe: the caller serializes ``add``."""

    def __init__(
        self,
        kind: str,
        secrets: PutSecrets,
        data_public: DataPublicKey,
        signer: SigningKey,
        cert_name: str,
        staged: StagedFile | None = None,
    ) -> None:
        self.kind = kind
        self._secrets = secrets
        self._signer = signer
        self._cert = cert_name
        self._group = KeyGroup(secrets, data_public)
        sealed = self._group.sealed
        self._body = PackBody(staged)
        self._body.append(HEADER)
        self._body.append(sealed)
        self._groups = [(len(HEADER), len(sealed))]
        self.entries: list[BlobEntry] = []

    @property
    def size(self) -> int:
        return self._body.size

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, cid: bytes, blob: bytes | bytearray, raw_length: int, k_blob: bytes) -> BlobEntry:
        """Append an encrypted blob right after the previous one (or the group's sealed key); its
        key is wrapped under this pack's group key with AES Key Wrap."""
        wrapped = self._group.wrap(k_blob)
        entry = BlobEntry(cid, len(self._groups) - 1, self._body.size, len(blob), raw_length, wrapped)
        self._body.append(blob)
        self.entries.append(entry)
        return entry

    def locations(self) -> list[tuple[bytes, int, int, int]]:
        """(chunk id, offset, length, raw length) of each blob, in pack order."""
        return [(e.chunk_id, e.offset, e.length, e.raw_length) for e in self.entries]

    def seal(self) -> FinishedPack:
        """Seal the trailer and sign: the pack's name and its bytes or its sealed file."""
        groups = self._encode_groups()
        return self._body.seal(
            lambda body_hash: seal_tail(body_hash, self.kind, groups, self._secrets, self._signer, self._cert)
        )

    def discard(self) -> None:
        """Drop the pack (nothing of it is stored)."""
        self._body.discard()

    def _encode_groups(self) -> list[list[object]]:
        """The trailer's ``groups``: ``[offset, length, [[cid, length, raw length, wrapped], ...]]``
        per key group. Offsets of blobs are implied (back to back after the sealed key): check that
        this is how they were laid out, since a reader would compute them that way."""
        groups: list[list[object]] = []
        entries = self.entries
        i = 0
        for g, (offset, length) in enumerate(self._groups):
            end = offset + length
            blobs = []
            while i < len(entries) and entries[i].group == g:
                e = entries[i]
                if e.offset != end:
                    raise RuntimeError(f"blob {i} of the pack is at {e.offset}, not right after the previous one")
                blobs.append([e.chunk_id, e.length, e.raw_length, e.wrapped_key])
                end += e.length
                i += 1
            groups.append([offset, length, blobs])
        if i != len(entries):
            raise RuntimeError("pack entries are not in key-group order")
        return groups


def seal_tail(
    body_hash: bytes, kind: str, groups: list[list[object]], secrets: PutSecrets, signer: SigningKey, cert_name: str
) -> bytes:
    """What follows a pack's body: the footer with the encrypted trailer (``groups`` as in
    FORMAT.md 10.3) and the writer's signature, then the tail (footer length, magic)."""
    salt = os.urandom(16)
    trailer = {  # keys in sorted order: encoded as is (canonical without a recursive pass)
        "domain": secrets.domain_id,
        "groups": groups,
        "kind": kind,
        "v": 1,
        "writer": cert_name,
    }
    trailer_ct = aead.encrypt(trailer_key(secrets, salt), encoding.pack_ordered(trailer), body_hash)
    sig = signer.sign(MAGIC_PACK, signed_message(body_hash, salt, trailer_ct))
    footer = encoding.pack(
        {"body_hash": body_hash, "salt": salt, "trailer": trailer_ct, "signer": cert_name, "sig": sig}
    )
    return footer + TAIL.pack(len(footer), TAIL_MAGIC)


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
    # offsets from the start, the size being known: an object store needs no second stat for them
    n = min(FOOTER_FIRST_READ, info.size)
    try:
        return parse_footer(backend.get(name, info.size - n, n), info.size)
    except NeedMoreBytes as more:
        n = min(more.needed, info.size)
        return parse_footer(backend.get(name, info.size - n, n), info.size)


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


class WrongTrailerKey(encoding.FormatError):
    """A trailer that does not open with the secret tried: written under another secret (another
    dedup domain, or a damaged put key when its writer's signature holds), or altered."""


def decrypt_trailer(footer: PackFooter, secrets: PutSecrets) -> Trailer:
    """Decrypt and validate a trailer (with S of the pack's domain)."""
    try:
        plain = aead.decrypt(trailer_key(secrets, footer.salt), footer.trailer_ct, footer.body_hash)
    except aead.DecryptionFailed:
        raise WrongTrailerKey("pack trailer does not decrypt (altered, or another dedup domain)") from None
    m = encoding.expect_map(encoding.unpack(plain), "kind", "domain", "writer", "groups")
    groups, blobs = _decode_groups(encoding.field(m, "groups", list), footer.body_length)
    return Trailer(
        kind=encoding.field(m, "kind", str),
        domain=encoding.field(m, "domain", str),
        writer=encoding.field(m, "writer", str),
        body_hash=footer.body_hash,
        groups=groups,
        blobs=blobs,
    )


def _decode_groups(raw_groups: list[object], body_len: int) -> tuple[list[tuple[int, int]], list[BlobEntry]]:
    """Validate the trailer's ``groups`` (untrusted) and compute every blob's offset: a group's
    first blob starts right after its sealed key, each next one right after the previous one.
    Groups come in pack order; neither a sealed key nor a blob may leave the body or overlap."""
    groups: list[tuple[int, int]] = []
    blobs: list[BlobEntry] = []
    end = len(HEADER)  # where the previous group's last blob ends
    for gi, g in enumerate(raw_groups):
        if not (isinstance(g, list) and len(g) == 3):
            raise encoding.FormatError("bad key group entry")
        g_off, g_len, entries = g
        if not (type(g_off) is int and type(g_len) is int and isinstance(entries, list)):
            raise encoding.FormatError("bad key group entry")
        if g_off < len(HEADER) or g_len <= 0 or g_off + g_len > body_len:
            raise encoding.FormatError("key group outside the pack body")
        if g_off < end:
            raise encoding.FormatError("key group overlaps the previous group or its blobs")
        off = g_off + g_len
        fast = _group_blobs(entries, gi, off, body_len)
        if fast is not None:
            blobs += fast
            groups.append((g_off, g_len))
            end = fast[-1].offset + fast[-1].length if fast else off
            continue
        for b in entries:  # something is wrong in this group: find it, entry by entry
            if not (isinstance(b, list) and len(b) == 4):
                raise encoding.FormatError("bad blob entry")
            cid, length, raw, wrapped = b
            if not (isinstance(cid, bytes) and len(cid) == 32):
                raise encoding.FormatError("bad blob entry (chunk id)")
            if not (isinstance(wrapped, bytes) and len(wrapped) == WRAPPED_SIZE):
                raise encoding.FormatError("bad blob entry (wrapped key)")
            if not (type(length) is int and type(raw) is int):
                raise encoding.FormatError("bad blob entry")
            if length < aead.OVERHEAD or off + length > body_len:
                raise encoding.FormatError("blob outside the pack body")
            if raw < 0 or raw > MAX_RAW_LENGTH:
                raise encoding.FormatError("bad blob entry (raw length)")
            if length > raw + 1 + aead.OVERHEAD:  # stored as is at most: compression is kept only when it shrinks
                raise encoding.FormatError("bad blob entry (longer than its raw length allows)")
            blobs.append(BlobEntry(cid, gi, off, length, raw, wrapped))
            off += length
        groups.append((g_off, g_len))
        end = off
    return groups, blobs


def _group_blobs(entries: list[object], gi: int, off: int, body_len: int) -> list[BlobEntry] | None:
    """The blobs of one key group whose first blob starts at ``off``, checked column by column
    (a trailer lists thousands: a loop of checks per entry costs several times as much); None
    when any check fails, and :func:`_decode_groups` finds which entry breaks which rule."""
    if not all(type(b) is list and len(b) == 4 for b in entries):
        return None
    if not entries:
        return []
    cids, lengths, raws, wrapped = zip(*entries, strict=True)
    if not (
        set(map(type, cids)) == {bytes}
        and set(map(len, cids)) == {32}
        and set(map(type, wrapped)) == {bytes}
        and set(map(len, wrapped)) == {WRAPPED_SIZE}
        and set(map(type, lengths)) == {int}
        and set(map(type, raws)) == {int}
        and min(lengths) >= aead.OVERHEAD
        and min(raws) >= 0
        and max(raws) <= MAX_RAW_LENGTH
        # stored as is at most: compression is kept only when it shrinks
        and all(map(operator.le, lengths, map((1 + aead.OVERHEAD).__add__, raws)))
    ):
        return None
    offsets = list(itertools.accumulate(lengths, initial=off))  # each blob right after the previous one
    if offsets[-1] > body_len:
        return None
    return list(map(BlobEntry, cids, itertools.repeat(gi), offsets, lengths, raws, wrapped))


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
    """K_blob of one blob, from its AES-KW-wrapped key (``group``: the cipher of its group key)."""
    if len(entry.wrapped_key) != WRAPPED_SIZE:
        raise encoding.FormatError("wrapped blob key does not open")
    try:
        return group.unwrap_key(entry.wrapped_key)
    except aead.DecryptionFailed:
        raise encoding.FormatError("wrapped blob key does not open") from None
