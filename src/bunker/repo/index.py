"""Index objects (``index/<hash>``): which chunk lives where in which pack.

An index object is signed by its writer and holds ``{"domain", "salt", "ct"}``; ``ct`` is
AES-256-GCM under keyed BLAKE3(S_index, "index" || salt), associated data the domain id, of
``{"packs": [hex names], "entries": [[chunk id, pack no, offset, length, raw length], ...]}``.
Indexes are a cache of the pack trailers: they can always be rebuilt from the packs.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable

import msgpack

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash
from bunker.crypto.sign import SigningKey
from bunker.repo.location_arrays import ID, LocationColumns, LocationRow, check_columns
from bunker.repo.location_map import Location, LocationMap
from bunker.repo.objects import MAGIC_INDEX, SignedObject, make_signed, parse_signed

__all__ = ["Location", "LocationMap", "decrypt_index", "decrypt_index_ct", "make_index", "parse_index_frame"]


def _key(secrets: PutSecrets, salt: bytes) -> bytes:
    return keyed_hash(secrets.index_key, b"index\x00" + salt)


# entries per index object a writer puts at most (~5 MB): readers refuse any signed object over
# MAX_SIGNED_OBJECT (64 MiB, ~1.3 M entries), so a repack or a fast backup of millions of small
# chunks writes several
INDEX_BATCH = 100_000


def make_index(
    entries: Iterable[tuple[bytes, LocationRow]] | LocationColumns,
    secrets: PutSecrets,
    signer: SigningKey,
    cert_name: str,
) -> bytes:
    """Encode, encrypt and sign one index object (of at most INDEX_BATCH entries: split more)."""
    columns = entries if isinstance(entries, LocationColumns) else LocationColumns.from_entries(list(entries))
    salt = os.urandom(16)
    ct = aead.encrypt(_key(secrets, salt), memoryview(_plaintext(columns)), secrets.domain_id.encode())
    return make_signed(MAGIC_INDEX, {"domain": secrets.domain_id, "salt": salt, "ct": ct}, signer, cert_name)


def _plaintext(columns: LocationColumns) -> bytearray:
    """``{"entries": [[chunk id, pack no, offset, length, raw length], ...], "packs": [...]}``
    (keys sorted), encoded one entry at a time: a list per entry, all held until the end, took
    ~150 B an entry (15 MB for a full object) besides the encoding."""
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    out = bytearray(packer.pack_map_header(2))
    out += pack("entries")
    out += packer.pack_array_header(len(columns))
    ids, cols = columns.ids, columns.cols
    for i, pno in enumerate(columns.pack_numbers):
        out += pack([ids[ID * i : ID * (i + 1)], pno, cols[3 * i], cols[3 * i + 1], cols[3 * i + 2]])
    out += pack("packs")
    out += pack(columns.packs)
    return out


def parse_index_frame(data: bytes) -> SignedObject:
    """Decode the signed frame of an index object (no key needed)."""
    obj = parse_signed(data, MAGIC_INDEX)
    encoding.field(obj.body, "domain", str)
    encoding.field_bytes(obj.body, "salt", 16)
    encoding.field_bytes(obj.body, "ct")
    if not obj.signer:
        raise encoding.FormatError("index must be signed by a client")
    return obj


def decrypt_index(obj: SignedObject, secrets: PutSecrets) -> LocationColumns:
    """Decrypt an index object's entries (with S of its domain) into columns. The entries are
    decoded one at a time, so none stays a Python object: decoded whole, the 100,000 entries of
    a full object took ~75 MB for a moment and three times as long (docs/performance.md)."""
    return decrypt_index_ct(obj.body["salt"], obj.body["ct"], secrets)


def decrypt_index_ct(salt: bytes, ct: bytes, secrets: PutSecrets) -> LocationColumns:
    """:func:`decrypt_index` of an object's salt and ciphertext alone (whose signature the
    caller verified): a caller that holds no other reference to ``ct`` has it freed once it is
    decrypted, before the entries are decoded (~5 MB for a full object)."""
    try:
        plain = aead.decrypt(_key(secrets, salt), ct, secrets.domain_id.encode())
    except aead.DecryptionFailed:
        raise encoding.FormatError("index does not decrypt (altered, or another dedup domain)") from None
    del ct
    with encoding.malformed():
        packs, entries_at = _index_fields(plain)
        columns = _entry_columns(plain, entries_at, packs)
    check_columns(columns)
    return columns


def _index_fields(plain: bytes) -> tuple[list[str], int]:
    """The pack names of an index object's plaintext, and where its entries start (they are
    read in a second pass: the map's keys are sorted, so the entries come before the packs)."""
    u = encoding.stream(plain)
    packs: object = None
    entries_at = -1
    for _ in range(u.read_map_header()):
        key = u.unpack()
        if key == "packs":
            packs = u.unpack()
        elif key == "entries":
            entries_at = u.tell()
            u.skip()
        else:
            u.skip()
    if u.tell() != len(plain):
        raise encoding.FormatError("not valid msgpack (extra data after the index)")
    missing = [k for k, absent in (("packs", packs is None), ("entries", entries_at < 0)) if absent]
    if missing:
        raise encoding.FormatError(f"missing field(s): {', '.join(missing)}")
    if not isinstance(packs, list):
        raise encoding.FormatError("field 'packs' has the wrong type")
    for p in packs:
        if not (isinstance(p, str) and len(p) == 64 and all(c in "0123456789abcdef" for c in p)):
            raise encoding.FormatError("bad pack name in index")
    return packs, entries_at


def _entry_columns(plain: bytes, entries_at: int, packs: list[str]) -> LocationColumns:
    u = encoding.stream(plain, entries_at)
    try:
        count = u.read_array_header()
    except ValueError:
        raise encoding.FormatError("field 'entries' has the wrong type") from None
    ids = bytearray()
    numbers, cols = array("I"), array("Q")
    add_number, add_cols, row_of, known = numbers.append, cols.extend, u.unpack, len(packs)
    for _ in range(count):
        row = row_of()
        if type(row) is not list or len(row) != 5:
            raise encoding.FormatError("bad index entry")
        cid, pno, off, length, raw = row
        if not (
            type(cid) is bytes
            and len(cid) == ID
            and type(pno) is int
            and type(off) is int
            and type(length) is int
            and type(raw) is int
            and 0 <= pno < known
            and off >= 0
            and length >= 0
            and raw >= 0
        ):
            raise encoding.FormatError("bad index entry")
        ids += cid
        add_number(pno)
        add_cols((off, length, raw))
    return LocationColumns(bytes(ids), packs, numbers, cols)
