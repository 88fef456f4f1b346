"""Reading blobs back with the master key: locate through the index, open the pack's trailer
and key group once per pack, then fetch and decrypt single blobs with range reads.

A pack whose writer's signature does not verify (a flipped bit in the footer's signature or
signer) is still read: its trailer is authenticated by its AEAD tag (keyed with the dedup
domain's secret, bound to the body hash) and every blob by its own tag and its chunk id, so no
wrong byte can be restored from it; only who wrote it is lost (docs/security.md, "A pack whose
signature fails"). Such packs are listed in ``damaged`` for the reader to report.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets
from bunker.crypto.kem import DataPrivateKey
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.repo import blob
from bunker.repo.index import Location, LocationMap
from bunker.repo.pack import (
    WRAPPED_SIZE,
    BlobEntry,
    decrypt_trailer,
    fetch_footer,
    open_group_key,
    unwrap_blob_key,
    verify_footer,
)
from bunker.repo.repository import Repository
from bunker.storage.backend import Backend


class OpenPack:
    """A pack's decrypted trailer and opened group keys. A restore keeps every pack it opens, so
    the trailer is kept as columns with a dict from chunk id to row: ~200 B per blob, where a
    dict of BlobEntry tuples took ~400 (80 MB for a restore of 200,000 small files)."""

    __slots__ = ("_rows", "_groups", "_cols", "_wrapped", "group_keys")

    def __init__(self, blobs: list[BlobEntry], group_keys: list[aead.Cipher]) -> None:
        self._rows = {b.chunk_id: i for i, b in enumerate(blobs)}  # (the last of a repeated id)
        self._groups = array("I", [b.group for b in blobs])
        self._cols = array("Q", [x for b in blobs for x in (b.offset, b.length, b.raw_length)])
        self._wrapped = b"".join(b.wrapped_key for b in blobs)  # WRAPPED_SIZE each (the decoder checks)
        self.group_keys = group_keys

    def get(self, cid: bytes) -> BlobEntry | None:
        """The trailer's entry of chunk ``cid``, or None if the pack does not hold it."""
        i = self._rows.get(cid)
        if i is None:
            return None
        c, k = self._cols, i * WRAPPED_SIZE
        wrapped = self._wrapped[k : k + WRAPPED_SIZE]
        return BlobEntry(cid, self._groups[i], c[3 * i], c[3 * i + 1], c[3 * i + 2], wrapped)

    def span(self) -> tuple[int, int]:
        """(start, end) of the bytes that hold all the pack's blobs ((0, 0): none)."""
        c = self._cols
        if not c:
            return 0, 0
        return min(c[0::3]), max(off + length for off, length in zip(c[0::3], c[1::3], strict=True))


def read_trailer(
    repo: Repository, pack: str, secrets: PutSecrets, *, verify_writer: bool = True
) -> tuple[list[BlobEntry], list[tuple[int, int]], str]:
    """Fetch, verify (writer's signature) and decrypt a pack's trailer: (blobs, groups, writer)."""
    name = f"packs/{pack}"
    try:
        footer = fetch_footer(repo.backend, name)
        if verify_writer:
            verify_footer(footer, repo.certificate(footer.signer).verify_key)
        trailer = decrypt_trailer(footer, secrets)
    except encoding.FormatError as exc:
        raise CorruptObject(name, str(exc)) from None
    return trailer.blobs, trailer.groups, footer.signer


def read_trailer_unsigned(
    repo: Repository, pack: str, secrets: PutSecrets
) -> tuple[list[BlobEntry], list[tuple[int, int]], str]:
    """The trailer of a pack whose writer's signature failed (``read_trailer`` raised): decrypted
    and authenticated by its AEAD tag alone. Returns (blobs, groups, why the signature failed);
    raises CorruptObject when the trailer does not authenticate either."""
    name = f"packs/{pack}"
    try:
        footer = fetch_footer(repo.backend, name)
        trailer = decrypt_trailer(footer, secrets)
    except encoding.FormatError as exc:
        raise CorruptObject(name, str(exc)) from None
    try:
        verify_footer(footer, repo.certificate(footer.signer).verify_key)
        why = "its writer's signature verified on a second reading"
    except (CorruptObject, ObjectMissing) as exc:
        why = f"its writer's certificate {footer.signer} is not usable ({exc.message})"
    except encoding.FormatError as exc:
        why = str(exc)
    return trailer.blobs, trailer.groups, why


class BlobReader:
    """Decrypts chunks of one dedup domain (thread-safe)."""

    def __init__(
        self, repo: Repository, data_private: DataPrivateKey, secrets: PutSecrets, locations: Mapping[bytes, Location]
    ) -> None:
        self.repo = repo
        self.data_private = data_private
        self.secrets = secrets
        self.locations = locations
        self._packs: dict[str, OpenPack] = {}
        self._lock = threading.Lock()
        self._pack_locks: dict[str, threading.Lock] = {}
        self._spans: dict[str, tuple[int, memoryview] | None] = {}  # insertion order = age
        self.damaged: dict[str, str] = {}  # packs read although their signature failed: pack -> why

    def open_pack(self, pack: str) -> OpenPack:
        op = self._packs.get(pack)
        if op is not None:
            return op
        with self._lock:
            lock = self._pack_locks.setdefault(pack, threading.Lock())
        with lock:
            op = self._packs.get(pack)
            if op is None:
                try:
                    blobs, groups, _ = read_trailer(self.repo, pack, self.secrets)
                except (CorruptObject, ObjectMissing) as exc:
                    if isinstance(exc, ObjectMissing) and exc.object_name == f"packs/{pack}":
                        raise
                    # the signature failed: the blobs still authenticate one by one (module docstring)
                    blobs, groups, why = read_trailer_unsigned(self.repo, pack, self.secrets)
                    self.damaged[pack] = why
                name = f"packs/{pack}"
                keys = []
                for off, length in groups:
                    sealed = self.repo.backend.get(name, off, length)
                    try:
                        keys.append(aead.Cipher(open_group_key(sealed, self.data_private, self.secrets.domain_id)))
                    except encoding.FormatError as exc:
                        raise CorruptObject(name, str(exc)) from None
                op = OpenPack(blobs, keys)
                self._packs[pack] = op
        return op

    def blob_key(self, pack: str, cid: bytes) -> tuple[BlobEntry, bytes]:
        op = self.open_pack(pack)
        entry = op.get(cid)
        if entry is None:
            raise CorruptObject(f"packs/{pack}", f"it does not hold chunk {cid.hex()[:16]} that the index places there")
        try:
            return entry, unwrap_blob_key(op.group_keys[entry.group], entry)
        except encoding.FormatError as exc:
            raise CorruptObject(f"packs/{pack}", str(exc)) from None

    def ref(self, cid: bytes) -> BlobRef:
        """Where chunk ``cid`` is and its key: everything needed to fetch it without the master key."""
        loc = self.locations.get(cid)
        if loc is None:
            raise _unlocated(cid)
        entry, k_blob = self.blob_key(loc.pack, cid)
        return BlobRef(loc.pack, entry.offset, entry.length, entry.raw_length, cid, k_blob)

    def packs_of(self, cids: Sequence[bytes]) -> list[str | None]:
        """The pack the index places each of ``cids`` in (None: not located), all at once."""
        locations = self.locations
        if isinstance(locations, LocationMap):
            return locations.packs_of(cids)
        return [loc.pack if (loc := locations.get(cid)) is not None else None for cid in cids]

    def refs(self, cids: Sequence[bytes]) -> list[BlobRef | BunkerError]:
        """:meth:`ref` of each of ``cids``, or the error that stops it: the chunks located all
        at once (a restore resolves a file's chunks together)."""
        out: list[BlobRef | BunkerError] = []
        for cid, pack in zip(cids, self.packs_of(cids), strict=True):
            try:
                if pack is None:
                    raise _unlocated(cid)
                entry, k_blob = self.blob_key(pack, cid)
            except BunkerError as exc:
                out.append(exc)
                continue
            out.append(BlobRef(pack, entry.offset, entry.length, entry.raw_length, cid, k_blob))
        return out

    def read(self, cid: bytes, max_raw: int | None = None) -> bytes:
        """The plaintext of chunk ``cid``, verified against its id. Meant for trees: the blobs of
        the few packs they live in are read with one range read per pack and kept (see
        :meth:`_pack_span`), so walking a snapshot of many directories costs a handful of requests
        on an object store instead of one per directory. A blob whose raw length (from its pack's
        trailer) exceeds ``max_raw`` is refused before anything is fetched or decompressed."""
        ref = self.ref(cid)
        if max_raw is not None and ref.raw_length > max_raw:
            raise CorruptObject(
                f"packs/{ref.pack}",
                f"chunk {cid.hex()[:16]} is {ref.raw_length} bytes, more than the {max_raw} such an object may have "
                "(FORMAT.md section 14): not read",
            )
        span = self._pack_span(ref.pack)
        if span is not None:
            start, data = span
            if start <= ref.offset and ref.offset + ref.length - start <= len(data):
                return open_blob(self.secrets, ref, data[ref.offset - start : ref.offset + ref.length - start])
        return self.fetch(ref)

    SPAN_CACHE_PACKS = 4
    SPAN_MAX = 64 << 20

    def _pack_span(self, pack: str) -> tuple[int, memoryview] | None:
        """(offset, bytes) of the range of ``pack`` that holds all its blobs, read once and kept for
        the last few packs; None if it is too large to keep or cannot be read."""
        with self._lock:
            hit = self._spans.get(pack)
            if hit is not None or pack in self._spans:
                return hit
        start, end = self.open_pack(pack).span()
        span: tuple[int, memoryview] | None = None
        if 0 < end - start <= self.SPAN_MAX:
            try:
                span = (start, memoryview(self.repo.backend.get(f"packs/{pack}", start, end - start)))
            except BunkerError:
                span = None
        with self._lock:
            while len(self._spans) >= self.SPAN_CACHE_PACKS:
                self._spans.pop(next(iter(self._spans)))
            self._spans[pack] = span
        return span

    def fetch(self, ref: BlobRef) -> bytes:
        """The plaintext of a located blob, verified against its id."""
        return fetch_blob(self.repo.backend, self.secrets, ref)


def _unlocated(cid: bytes) -> ObjectMissing:
    return ObjectMissing(f"chunk {cid.hex()[:16]}", "no index entry for it: run `bunker check`")


class BlobRef(NamedTuple):
    """A located blob with its unwrapped key (picklable: worker processes fetch with it)."""

    pack: str
    offset: int
    length: int
    raw_length: int
    cid: bytes
    key: bytes


def fetch_blob(backend: Backend, secrets: PutSecrets, ref: BlobRef) -> bytes:
    """Fetch, decrypt, decompress and verify one blob; raise CorruptObject if it does not match."""
    return open_blob(secrets, ref, backend.get(f"packs/{ref.pack}", ref.offset, ref.length))


def open_blob(secrets: PutSecrets, ref: BlobRef, data: bytes | memoryview) -> bytes:
    """Decrypt, decompress and verify a blob's fetched bytes; raise CorruptObject if they do not match."""
    try:
        plain = blob.decrypt_blob(ref.key, ref.cid, data, ref.raw_length)
    except blob.BlobError as exc:
        raise CorruptObject(f"packs/{ref.pack}", f"chunk {ref.cid.hex()[:16]}: {exc}") from None
    if not blob.verify_blob(secrets, ref.cid, plain):
        raise CorruptObject(f"packs/{ref.pack}", f"chunk {ref.cid.hex()[:16]} does not match its id")
    return plain


# A range read covers at most this much (bounds the memory of a read-ahead, which holds its
# range until every blob in it is written): over a network, a request per 16 MiB; from a local
# disk, where a read costs a system call, 4 MiB (three threads restoring large files held 16 MiB
# each: docs/performance.md).
MAX_RANGE = 16 << 20
LOCAL_RANGE = 4 << 20


def max_range(backend: Backend) -> int:
    """The longest range read of ``backend`` that merges neighbouring blobs."""
    return MAX_RANGE if backend.capabilities().remote else LOCAL_RANGE


def prefetch_blobs(backend: Backend, refs: list[BlobRef]) -> dict[tuple[str, int], memoryview]:
    """Fetch the ciphertext of many blobs with few range reads: per pack, sorted by offset, neighbours
    merged. Returns (pack, offset) -> bytes; blobs whose read failed are left out (a later
    :func:`fetch_blob` of them reports why)."""
    gap = backend.capabilities().range_merge_gap  # neighbours closer than this: one range read
    longest = max_range(backend)
    by_pack: dict[str, list[tuple[int, int]]] = {}
    for r in refs:
        by_pack.setdefault(r.pack, []).append((r.offset, r.length))
    out: dict[tuple[str, int], memoryview] = {}
    for pack, spans in by_pack.items():
        spans = sorted(set(spans))
        i = 0
        while i < len(spans):
            start, end, j = spans[i][0], spans[i][0] + spans[i][1], i + 1
            while j < len(spans) and spans[j][0] - end <= gap and spans[j][0] + spans[j][1] - start <= longest:
                end = max(end, spans[j][0] + spans[j][1])
                j += 1
            try:
                data = memoryview(backend.get(f"packs/{pack}", start, end - start))
            except BunkerError:
                i = j
                continue
            for off, length in spans[i:j]:
                if off - start + length <= len(data):  # a short read leaves the rest to fetch_blob
                    out[(pack, off)] = data[off - start : off - start + length]
            i = j
    return out


class ReadAhead:
    """Fetch a file's blobs in order with few requests: on a miss, one range read covers the
    requested blob and the following ones of the same pack (up to :func:`max_range` bytes), so a
    large file restored from an object store costs a request per ~16 MiB instead of one per chunk."""

    def __init__(self, backend: Backend, secrets: PutSecrets, pieces: list[BlobRef]) -> None:
        self._backend, self._secrets = backend, secrets
        self._order = {(r.pack, r.offset): i for i, r in reversed(list(enumerate(pieces)))}
        self._pieces = pieces
        self._cache: dict[tuple[str, int], memoryview] = {}
        self._gap = backend.capabilities().range_merge_gap
        self._longest = max_range(backend)

    def __call__(self, ref: BlobRef) -> bytes:
        key = (ref.pack, ref.offset)
        data = self._cache.pop(key, None)
        if data is None:
            self._cache = {}  # what was read ahead and not used is dropped: memory stays bounded
            i = self._order.get(key)
            if i is not None:
                ahead = [r for r in self._pieces[i:] if r.pack == ref.pack][: self._longest // max(ref.length, 1) + 1]
                self._cache = prefetch_blobs(self._backend, _contiguous(ahead, self._gap, self._longest))
                data = self._cache.pop(key, None)
        if data is None:
            return fetch_blob(self._backend, self._secrets, ref)
        return open_blob(self._secrets, ref, data)


def _contiguous(refs: list[BlobRef], gap: int, longest: int) -> list[BlobRef]:
    """The leading run of ``refs`` that one range read of at most ``longest`` bytes covers."""
    if not refs:
        return refs
    start, end, n = refs[0].offset, refs[0].offset + refs[0].length, 1
    for r in refs[1:]:
        if r.offset < start or r.offset - end > gap or r.offset + r.length - start > longest:
            break
        end = max(end, r.offset + r.length)
        n += 1
    return refs[:n]
