"""Reading blobs back with the master key: locate through the index, open the pack's trailer
and key group once per pack, then fetch and decrypt single blobs with range reads."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets
from bunker.crypto.kem import DataPrivateKey
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.repo import blob
from bunker.repo.index import Location
from bunker.repo.pack import BlobEntry, decrypt_trailer, fetch_footer, open_group_key, unwrap_blob_key, verify_footer
from bunker.repo.repository import Repository
from bunker.storage.backend import Backend


@dataclass
class OpenPack:
    """A pack's decrypted trailer and opened group keys."""

    entries: dict[bytes, BlobEntry]
    group_keys: list[aead.Cipher]


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


class BlobReader:
    """Decrypts chunks of one dedup domain (thread-safe)."""

    def __init__(
        self, repo: Repository, data_private: DataPrivateKey, secrets: PutSecrets, locations: dict[bytes, Location]
    ) -> None:
        self.repo = repo
        self.data_private = data_private
        self.secrets = secrets
        self.locations = locations
        self._packs: dict[str, OpenPack] = {}
        self._lock = threading.Lock()
        self._pack_locks: dict[str, threading.Lock] = {}

    def open_pack(self, pack: str) -> OpenPack:
        op = self._packs.get(pack)
        if op is not None:
            return op
        with self._lock:
            lock = self._pack_locks.setdefault(pack, threading.Lock())
        with lock:
            op = self._packs.get(pack)
            if op is None:
                blobs, groups, _ = read_trailer(self.repo, pack, self.secrets)
                name = f"packs/{pack}"
                keys = []
                for off, length in groups:
                    sealed = self.repo.backend.get(name, off, length)
                    try:
                        keys.append(aead.Cipher(open_group_key(sealed, self.data_private, self.secrets.domain_id)))
                    except encoding.FormatError as exc:
                        raise CorruptObject(name, str(exc)) from None
                op = OpenPack({b.chunk_id: b for b in blobs}, keys)
                self._packs[pack] = op
        return op

    def blob_key(self, pack: str, cid: bytes) -> tuple[BlobEntry, bytes]:
        op = self.open_pack(pack)
        entry = op.entries.get(cid)
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
            raise ObjectMissing(f"chunk {cid.hex()[:16]}", "no index entry for it: run `bunker check`")
        entry, k_blob = self.blob_key(loc.pack, cid)
        return BlobRef(loc.pack, entry.offset, entry.length, entry.raw_length, cid, k_blob)

    def read(self, cid: bytes) -> bytes:
        """The plaintext of chunk ``cid``, verified against its id."""
        return self.fetch(self.ref(cid))

    def fetch(self, ref: BlobRef) -> bytes:
        """The plaintext of a located blob, verified against its id."""
        return fetch_blob(self.repo.backend, self.secrets, ref)


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


# Blobs closer than this in one pack are fetched with one range read (the gap is read and dropped).
MERGE_GAP = 256 << 10
MAX_RANGE = 16 << 20


def prefetch_blobs(backend: Backend, refs: list[BlobRef]) -> dict[tuple[str, int], memoryview]:
    """Fetch the ciphertext of many blobs with few range reads: per pack, sorted by offset, neighbours
    merged. Returns (pack, offset) -> bytes; blobs whose read failed are left out (a later
    :func:`fetch_blob` of them reports why)."""
    by_pack: dict[str, list[tuple[int, int]]] = {}
    for r in refs:
        by_pack.setdefault(r.pack, []).append((r.offset, r.length))
    out: dict[tuple[str, int], memoryview] = {}
    for pack, spans in by_pack.items():
        spans = sorted(set(spans))
        i = 0
        while i < len(spans):
            start, end, j = spans[i][0], spans[i][0] + spans[i][1], i + 1
            while j < len(spans) and spans[j][0] - end <= MERGE_GAP and spans[j][0] + spans[j][1] - start <= MAX_RANGE:
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
