"""Index objects (``index/<hash>``): which chunk lives where in which pack.

An index object is signed by its writer and holds ``{"domain", "salt", "ct"}``; ``ct`` is
AES-256-GCM under keyed BLAKE3(S_index, "index" || salt), associated data the domain id, of
``{"packs": [hex names], "entries": [[chunk id, pack no, offset, length, raw length], ...]}``.
Indexes are a cache of the pack trailers: they can always be rebuilt from the packs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash
from bunker.crypto.sign import SigningKey
from bunker.repo.location_arrays import LocationRow
from bunker.repo.location_map import Location, LocationMap
from bunker.repo.objects import MAGIC_INDEX, SignedObject, make_signed, parse_signed

__all__ = ["Location", "LocationMap", "decrypt_index", "make_index", "parse_index_frame"]


def _key(secrets: PutSecrets, salt: bytes) -> bytes:
    return keyed_hash(secrets.index_key, b"index\x00" + salt)


# entries per index object a writer puts at most (~5 MB): readers refuse any signed object over
# MAX_SIGNED_OBJECT (64 MiB, ~1.3 M entries), so a repack or a fast backup of millions of small
# chunks writes several
INDEX_BATCH = 100_000


def make_index(
    entries: Iterable[tuple[bytes, LocationRow]], secrets: PutSecrets, signer: SigningKey, cert_name: str
) -> bytes:
    """Encode, encrypt and sign one index object (of at most INDEX_BATCH entries: split more)."""
    packs: dict[str, int] = {}
    rows = []
    for cid, (pack, offset, length, raw_length) in entries:
        pno = packs.setdefault(pack, len(packs))
        rows.append([cid, pno, offset, length, raw_length])
    salt = os.urandom(16)
    plain = encoding.pack_ordered({"entries": rows, "packs": list(packs)})  # keys sorted
    ct = aead.encrypt(_key(secrets, salt), plain, secrets.domain_id.encode())
    return make_signed(MAGIC_INDEX, {"domain": secrets.domain_id, "salt": salt, "ct": ct}, signer, cert_name)


def parse_index_frame(data: bytes) -> SignedObject:
    """Decode the signed frame of an index object (no key needed)."""
    obj = parse_signed(data, MAGIC_INDEX)
    encoding.field(obj.body, "domain", str)
    encoding.field_bytes(obj.body, "salt", 16)
    encoding.field_bytes(obj.body, "ct")
    if not obj.signer:
        raise encoding.FormatError("index must be signed by a client")
    return obj


def decrypt_index(obj: SignedObject, secrets: PutSecrets) -> list[tuple[bytes, Location]]:
    """Decrypt an index object's entries (with S of its domain)."""
    b = obj.body
    try:
        plain = aead.decrypt(_key(secrets, b["salt"]), b["ct"], secrets.domain_id.encode())
    except aead.DecryptionFailed:
        raise encoding.FormatError("index does not decrypt (altered, or another dedup domain)") from None
    m = encoding.expect_map(encoding.unpack(plain), "packs", "entries")
    packs = encoding.field(m, "packs", list)
    for p in packs:
        if not (isinstance(p, str) and len(p) == 64 and all(c in "0123456789abcdef" for c in p)):
            raise encoding.FormatError("bad pack name in index")
    out = []
    for row in encoding.field(m, "entries", list):
        if not (isinstance(row, list) and len(row) == 5 and isinstance(row[0], bytes) and len(row[0]) == 32):
            raise encoding.FormatError("bad index entry")
        _, pno, off, length, raw = row
        if not all(type(x) is int and x >= 0 for x in (pno, off, length, raw)) or pno >= len(packs):
            raise encoding.FormatError("bad index entry")
        out.append((row[0], Location(packs[pno], off, length, raw)))
    return out
