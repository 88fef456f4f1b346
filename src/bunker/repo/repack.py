"""Repack (part of ``bunker prune``): copy the live blobs of packs that are mostly garbage, and
of small packs, into new packs, with the put key only (docs/format.md sections 10.4 and 15).

A put key cannot decrypt a blob (its key is wrapped under a group key sealed to the master), so
a repack copies blob ciphertext as is, together with its key group's sealed key and the wrapped
keys: the new pack holds one key group per source group (FORMAT.md 10.4). The new pack is
signed by the pruner; the source pack's own signature and body hash are checked before anything
is copied, and packs of revoked writers are never copied (that would launder them under the
pruner's signature).

"Live" is decided per pack: a chunk held by pack P is live in P if a live snapshot (or a
checkpoint) whose pack set, resolved through the move records, names P needs it. That is what
restore relies on: it looks for a snapshot's chunks only in the packs its pack set resolves to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import SigningKey
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo import index as index_objects
from bunker.repo.index import Location, make_index
from bunker.repo.pack import (
    HEADER,
    BlobEntry,
    decrypt_trailer,
    parse_footer,
    seal_tail,
    verify_footer,
)
from bunker.repo.repository import Repository

if TYPE_CHECKING:
    from bunker.repo.liveness import Liveness

DEFAULT_THRESHOLD = 0.5  # repack a pack when less than this share of it is live
SMALL_SHARE = 8  # a pack under 1/8 of the target size is small
MIN_SMALL = 4  # small packs are merged once there are this many


class PackCopier:
    """Builds one pack out of copied key groups: for each, the sealed group key as stored, then
    the copied blobs back to back. Offsets follow from the layout (FORMAT.md 10.1)."""

    def __init__(self, kind: str, secrets: PutSecrets, signer: SigningKey, cert_name: str) -> None:
        self.kind, self._secrets, self._signer, self._cert = kind, secrets, signer, cert_name
        self._parts: list[bytes] = [HEADER]
        self.size = len(HEADER)
        self._groups: list[list[object]] = []
        self.entries: list[tuple[bytes, int, int, int]] = []  # chunk id, offset, length, raw length
        self.chunk_ids: set[bytes] = set()

    def add_group(self, sealed_key: bytes, blobs: list[tuple[BlobEntry, bytes]]) -> None:
        offset = self.size
        self._parts.append(sealed_key)
        self.size += len(sealed_key)
        rows: list[list[object]] = []
        for entry, data in blobs:
            if len(data) != entry.length:
                raise ValueError("copied blob has the wrong length")
            self.entries.append((entry.chunk_id, self.size, entry.length, entry.raw_length))
            self.chunk_ids.add(entry.chunk_id)
            rows.append([entry.chunk_id, entry.length, entry.raw_length, entry.wrapped_key])
            self._parts.append(data)
            self.size += len(data)
        self._groups.append([offset, len(sealed_key), rows])

    def finish(self) -> tuple[str, bytes]:
        """Seal the trailer, sign, and return (hex name, pack bytes)."""
        body = b"".join(self._parts)
        tail = seal_tail(blake3.blake3(body).digest(), self.kind, self._groups, self._secrets, self._signer, self._cert)
        data = body + tail
        return blake3.blake3(data).hexdigest(), data


@dataclass
class SourcePack:
    """A pack to repack, read and verified: its kind and its key groups with their live blobs."""

    name: str
    kind: str
    groups: list[tuple[bytes, list[tuple[BlobEntry, bytes]]]]


def read_source(repo: Repository, pack: str, secrets: PutSecrets, live: set[bytes]) -> SourcePack:
    """Fetch a whole pack, check its writer's signature, its body hash and that its writer is
    not revoked, and pick its live blobs per key group. Raises CorruptObject/ObjectMissing."""
    name = f"packs/{pack}"
    data = repo.backend.get(name)
    try:
        footer = parse_footer(data, len(data))
        verify_footer(footer, repo.certificate(footer.signer).verify_key)
        if blake3.blake3(memoryview(data)[: footer.body_length]).digest() != footer.body_hash:
            raise encoding.FormatError("its body does not match the hash its writer signed")
        if footer.signer in repo.revoked:
            raise encoding.FormatError("its writer was revoked: its blobs are not copied under a new signature")
        trailer = decrypt_trailer(footer, secrets)
    except encoding.FormatError as exc:
        raise CorruptObject(name, str(exc)) from None
    if trailer.domain != secrets.domain_id:
        raise CorruptObject(name, "its trailer names another dedup domain")
    groups = []
    for gi, (g_off, g_len) in enumerate(trailer.groups):
        blobs = [
            (b, bytes(data[b.offset : b.offset + b.length]))
            for b in trailer.blobs
            if b.group == gi and b.chunk_id in live
        ]
        if blobs:
            groups.append((bytes(data[g_off : g_off + g_len]), blobs))
    return SourcePack(pack, trailer.kind, groups)


@dataclass
class RepackResult:
    moves: dict[str, list[str]] = field(default_factory=dict)  # old pack -> new packs
    written: list[tuple[str, int]] = field(default_factory=list)  # (new pack, size)
    copied_bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (pack, why)


def choose(
    liveness: Liveness, sizes: dict[str, int], eligible: Iterable[str], threshold: float, target: int
) -> list[str]:
    """Packs worth repacking: those with less than ``threshold`` of their blob bytes live, and
    the small ones once there are at least MIN_SMALL of them."""
    wasteful, small = [], []
    for p in sorted(eligible):
        size = sizes.get(p)
        if not size:
            continue
        if liveness.live_bytes(p) < threshold * liveness.blob_bytes(p):
            wasteful.append(p)
        elif size < target // SMALL_SHARE:
            small.append(p)
    return wasteful + (small if len(small) >= MIN_SMALL else [])


def repack(
    repo: Repository,
    secrets: PutSecrets,
    signer: SigningKey,
    cert_name: str,
    packs: list[str],
    liveness: Liveness,
    target: int,
    tick: Callable[[], None] = lambda: None,
) -> RepackResult:
    """Copy the live blobs of ``packs`` into new packs (one kind per pack, about ``target``
    bytes each) and write their index object. The caller writes the move record."""
    result = RepackResult()
    open_packs: dict[str, PackCopier] = {}
    receivers: dict[str, list[str]] = {}  # kind -> sources whose blobs the open pack holds
    index_entries: list[tuple[bytes, Location]] = []

    def flush(kind: str) -> None:
        copier = open_packs.pop(kind)
        name, data = copier.finish()
        repo.backend.put(f"packs/{name}", data)
        result.written.append((name, len(data)))
        index_entries.extend((cid, Location(name, off, ln, raw)) for cid, off, ln, raw in copier.entries)
        for src in receivers.pop(kind, []):
            result.moves[src].append(name)
        if len(index_entries) >= index_objects.INDEX_BATCH:  # (whole packs per index object)
            repo.put_object("index", make_index(index_entries, secrets, signer, cert_name))
            index_entries.clear()
        tick()

    for pack in packs:
        try:
            src = read_source(repo, pack, secrets, liveness.live_ids(pack))
        except (CorruptObject, ObjectMissing) as exc:
            result.skipped.append((pack, str(exc)))
            continue
        result.moves[pack] = []
        for sealed, group_blobs in src.groups:
            copier = open_packs.get(src.kind)
            size = len(sealed) + sum(len(d) for _, d in group_blobs)
            if copier is not None and copier.size + size > target:
                flush(src.kind)
                copier = None
            if copier is None:
                copier = open_packs[src.kind] = PackCopier(src.kind, secrets, signer, cert_name)
            # a chunk stored twice (two writers at once) is copied once per new pack
            blobs = [(e, d) for e, d in group_blobs if e.chunk_id not in copier.chunk_ids]
            if blobs:
                copier.add_group(sealed, blobs)
                result.copied_bytes += sum(len(d) for _, d in blobs)
            if pack not in receivers.setdefault(src.kind, []):
                receivers[src.kind].append(pack)
    for kind in list(open_packs):
        flush(kind)
    if index_entries:
        repo.put_object("index", make_index(index_entries, secrets, signer, cert_name))
    return result
