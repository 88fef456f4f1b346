"""Index objects (``index/<hash>``): which chunk lives where in which pack.

An index object is signed by its writer and holds ``{"domain", "salt", "ct"}``; ``ct`` is
AES-256-GCM under keyed BLAKE3(S_index, "index" || salt), associated data the domain id, of
``{"packs": [hex names], "entries": [[chunk id, pack no, offset, length, raw length], ...]}``.
Indexes are a cache of the pack trailers: they can always be rebuilt from the packs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple, TypeVar, overload

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash
from bunker.crypto.sign import SigningKey
from bunker.repo.objects import MAGIC_INDEX, SignedObject, make_signed, parse_signed


class Location(NamedTuple):
    """Where a chunk's blob is stored."""

    pack: str  # hex name (without "packs/")
    offset: int
    length: int
    raw_length: int


_T = TypeVar("_T")
_FIELD = 40  # bits per field of a packed location: offsets and lengths below 1 TiB
_MASK = (1 << _FIELD) - 1
_SHIFT_PACK, _SHIFT_OFFSET = 3 * _FIELD, 2 * _FIELD


class LocationMap(Mapping[bytes, Location]):
    """chunk id -> Location in about half the memory of a dict of Location tuples (which cost
    ~150 B per chunk beyond the key: the tuple and three ints): each value is one int packing
    pack number, offset, length and raw length, and each pack name is stored once. The first
    location added for a chunk wins."""

    __slots__ = ("_map", "_numbers", "_packs")

    def __init__(self) -> None:
        self._map: dict[bytes, int] = {}
        self._packs: list[str] = []
        self._numbers: dict[str, int] = {}

    def add(self, cid: bytes, loc: Location) -> None:
        """Record ``loc`` for ``cid`` unless the chunk already has a location."""
        self.update([(cid, loc)])

    def update(self, entries: Iterable[tuple[bytes, Location]]) -> None:
        """Record many locations (first one per chunk wins); one call per index object keeps
        loading 200k entries cheap."""
        m, numbers, packs = self._map, self._numbers, self._packs
        for cid, (pack, offset, length, raw) in entries:
            if cid in m:
                continue
            pno = numbers.get(pack)
            if pno is None:
                pno = numbers[pack] = len(packs)
                packs.append(pack)
            if (offset | length | raw) >> _FIELD:  # also true for a negative value
                raise encoding.FormatError(f"index location out of range for chunk {cid.hex()[:16]}")
            m[cid] = (pno << _SHIFT_PACK) | (offset << _SHIFT_OFFSET) | (length << _FIELD) | raw

    def _unpack(self, v: int) -> Location:
        return Location(self._packs[v >> (3 * _FIELD)], (v >> (2 * _FIELD)) & _MASK, (v >> _FIELD) & _MASK, v & _MASK)

    def __getitem__(self, cid: bytes) -> Location:
        return self._unpack(self._map[cid])

    @overload
    def get(self, cid: bytes, /) -> Location | None: ...
    @overload
    def get(self, cid: bytes, default: Location, /) -> Location: ...
    @overload
    def get(self, cid: bytes, default: _T, /) -> Location | _T: ...
    def get(self, cid: bytes, default: object = None, /) -> object:
        v = self._map.get(cid)
        return default if v is None else self._unpack(v)

    def __contains__(self, cid: object) -> bool:
        return cid in self._map

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def packs(self) -> set[str]:
        """The packs that hold at least one chunk of the map."""
        return {self._packs[v >> (3 * _FIELD)] for v in self._map.values()}


def _key(secrets: PutSecrets, salt: bytes) -> bytes:
    return keyed_hash(secrets.index_key, b"index\x00" + salt)


def make_index(
    entries: Iterable[tuple[bytes, Location]], secrets: PutSecrets, signer: SigningKey, cert_name: str
) -> bytes:
    """Encode, encrypt and sign one index object."""
    packs: dict[str, int] = {}
    rows = []
    for cid, loc in entries:
        pno = packs.setdefault(loc.pack, len(packs))
        rows.append([cid, pno, loc.offset, loc.length, loc.raw_length])
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
