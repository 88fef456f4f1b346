"""Bundles: the sealed container every node-to-node message travels in (docs/format.md,
"Bundles (node links)").

A piece on disk is ``salt (32) || masked sealed key (1168) || STREAM ciphertext`` under a name
that is the keyed BLAKE3 of its bytes. The sealed key is the HPKE seal of a fresh piece key to
the receiver's KEM key, masked with the direction's mask key so that no byte position is
distinguishable from random. The STREAM plaintext is ``u32 BE header length || header ||
Ed25519 signature || objects || zero padding``, padded so that the piece's size is a Padmé
bucket. Writing and reading stream: memory stays a few segments whatever the piece's size.

The caller (the node's forward and import) chooses sequence numbers and applies the replay
rules; this module only seals, names, verifies and opens.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import blake3

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys, NodePublic
from bunker.node.bundle_format import (
    HEADER_DOMAIN,
    KINDS,
    MAX_HEADER_SIZE,
    PIECE_KEY_SIZE,
    PREFIX_SIZE,
    SALT_SIZE,
    SET_ID_SIZE,
    LinkKeys,
    ManifestEntry,
    ObjectChanged,
    ObjectTooLarge,
    PieceBadSender,
    PieceDamaged,
    PieceError,
    PieceHeader,
    PieceNotForUs,
    content_size,
    key_mask,
    piece_key_info,
    piece_size_for,
    plan_pieces,
    xor,
)
from bunker.node.bundle_reader import OpenedPiece, identify, open_piece
from bunker.node.stream_aead import StreamEncryptor, plain_size
from bunker.private_files import fsync_dir

__all__ = [
    "BundleObject",
    "KINDS",
    "LinkKeys",
    "ManifestEntry",
    "ObjectChanged",
    "ObjectTooLarge",
    "OpenedPiece",
    "PieceBadSender",
    "PieceDamaged",
    "PieceError",
    "PieceHeader",
    "PieceNotForUs",
    "PieceWriter",
    "ReadableInto",
    "WrittenPiece",
    "identify",
    "open_piece",
    "plan_pieces",
    "write_bundle",
]


class ReadableInto(Protocol):
    """A binary file (what ``open(path, "rb")`` returns)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


ObjectSource = bytes | ReadableInto
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _readinto(source: ObjectSource) -> Callable[[memoryview], int]:
    """``readinto`` over bytes or a binary file (0 at the end)."""
    if not isinstance(source, bytes):
        return lambda buf: source.readinto(buf) or 0
    view = memoryview(source)
    pos = 0

    def from_bytes(buf: memoryview) -> int:
        nonlocal pos
        n = min(len(buf), len(view) - pos)
        buf[:n] = view[pos : pos + n]
        pos += n
        return n

    return from_bytes


@dataclass(frozen=True)
class WrittenPiece:
    """A piece written into its directory under its final name."""

    name: str
    path: str
    size: int


class PieceWriter:
    """Writes one piece to ``dest_dir``, streaming: the manifest (names, sizes, digests) is
    given first, then each object's bytes in manifest order (:meth:`write_object`, checked
    against its digest as they pass), then :meth:`finish` renames the temporary file to the
    piece's name. Use it as a context manager, or call :meth:`abort` on failure."""

    def __init__(
        self,
        my_keys: NodeKeys,
        link: LinkKeys,
        peer: NodePublic,
        dest_dir: str,
        *,
        kind: str,
        seq: int,
        manifest: Sequence[ManifestEntry],
        set_id: bytes | None = None,
        piece: tuple[int, int] = (0, 1),
        extra: dict[str, Any] | None = None,
        created: float | None = None,
    ) -> None:
        if link.my_id != my_keys.node_id or link.peer_id != peer.node_id:
            raise ValueError("the link keys are not this node's link to this peer")
        self.header = PieceHeader(
            kind=kind,
            repo=link.repo_id,
            sender=link.my_id,
            receiver=peer.node_id,
            seq=seq,
            set_id=os.urandom(SET_ID_SIZE) if set_id is None else set_id,
            index=piece[0],
            count=piece[1],
            created=time.time() if created is None else created,
            manifest=tuple(manifest),
            extra=dict(extra or {}),
        )
        self.header.check()
        header_bytes = encoding.pack(self.header.to_map())
        if len(header_bytes) > MAX_HEADER_SIZE:
            raise ValueError(f"a piece header is at most {MAX_HEADER_SIZE} bytes; split the objects into more pieces")
        content = content_size(len(header_bytes), sum(e.size for e in manifest))
        self.size = piece_size_for(content)
        total = plain_size(self.size - PREFIX_SIZE)
        assert total is not None and total >= content  # piece_size_for picks a fillable bucket
        self._padding = total - content
        self._dir = dest_dir
        self._next = 0
        self._name_hash = blake3.blake3(key=link.send_name)
        self._fd, self._tmp = self._create_temp(dest_dir)
        try:
            piece_key = os.urandom(PIECE_KEY_SIZE)
            salt = os.urandom(SALT_SIZE)
            sealed = peer.kem_public().seal(piece_key, piece_key_info(peer.node_id))
            self._emit(memoryview(salt + xor(sealed, key_mask(link.send_mask, salt))))
            self._stream = StreamEncryptor(piece_key, total, self._emit)
            self._stream.write(struct.pack(">I", len(header_bytes)) + header_bytes)
            self._stream.write(my_keys.sign(HEADER_DOMAIN, header_bytes))
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _create_temp(directory: str) -> tuple[int, str]:
        while True:
            tmp = os.path.join(directory, f".tmp-{os.urandom(8).hex()}")
            try:
                return os.open(tmp, _CREATE_FLAGS, 0o600), tmp
            except FileExistsError:
                continue

    def _emit(self, data: memoryview) -> None:
        self._name_hash.update(data)
        while data:
            data = data[os.write(self._fd, data) :]

    def write_object(self, name: str, source: ObjectSource) -> None:
        """Stream the next object of the manifest from ``source`` (bytes, or a binary file read
        from its current position); raise ObjectChanged (and abort the piece) if its bytes do
        not match the manifest entry's size and digest."""
        try:
            if self._next >= len(self.header.manifest) or self.header.manifest[self._next].name != name:
                raise ValueError(f"object {name} is not the next one of the piece's manifest")
            entry = self.header.manifest[self._next]
            digest = blake3.blake3()
            remaining = entry.size
            readinto = _readinto(source)
            while remaining:
                space = self._stream.space()[:remaining]
                n = readinto(space)
                if not n:
                    raise ObjectChanged(name, f"it ended {remaining} bytes short of its {entry.size} bytes")
                digest.update(space[:n])
                self._stream.advance(n)
                remaining -= n
            if digest.digest() != entry.digest:
                raise ObjectChanged(name, "its bytes do not match its digest")
            self._next += 1
        except BaseException:
            self.abort()
            raise

    def finish(self) -> WrittenPiece:
        """Pad, seal the final segment, sync and rename the piece to its name."""
        try:
            if self._next != len(self.header.manifest):
                missing = self.header.manifest[self._next].name
                raise ValueError(f"object {missing} of the manifest was not written")
            self._stream.write_zeros(self._padding)
            self._stream.finish()
            self._stream.close()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            name = self._name_hash.hexdigest()
            path = os.path.join(self._dir, name)
            os.rename(self._tmp, path)
            fsync_dir(self._dir)
        except BaseException:
            self.abort()
            raise
        return WrittenPiece(name, path, self.size)

    def abort(self) -> None:
        """Remove the temporary file (nothing of the piece remains)."""
        if hasattr(self, "_stream"):
            self._stream.close()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)

    def __enter__(self) -> PieceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.abort()


@dataclass(frozen=True)
class BundleObject:
    """An object to send: its manifest entry and where its bytes come from (bytes, or a
    function that opens a binary file, called only when the object is written)."""

    entry: ManifestEntry
    source: bytes | Callable[[], AbstractContextManager[ReadableInto]]


def write_bundle(
    my_keys: NodeKeys,
    link: LinkKeys,
    peer: NodePublic,
    dest_dir: str,
    *,
    kind: str,
    first_seq: int,
    objects: Sequence[BundleObject],
    max_piece_size: int,
    extra: dict[str, Any] | None = None,
) -> list[WrittenPiece]:
    """Write ``objects`` as one bundle: pieces of at most ``max_piece_size`` bytes (plan_pieces)
    sharing a random set id, numbered ``first_seq``, ``first_seq + 1``, ...; each piece holds
    ``extra``. Raise ObjectTooLarge before writing anything if an object cannot fit."""
    plan = plan_pieces([o.entry for o in objects], max_piece_size, extra)
    by_name = {o.entry.name: o for o in objects}
    set_id = os.urandom(SET_ID_SIZE)
    written = []
    for index, entries in enumerate(plan):
        with PieceWriter(
            my_keys,
            link,
            peer,
            dest_dir,
            kind=kind,
            seq=first_seq + index,
            manifest=entries,
            set_id=set_id,
            piece=(index, len(plan)),
            extra=extra,
        ) as writer:
            for e in entries:
                source = by_name[e.name].source
                if isinstance(source, bytes):
                    writer.write_object(e.name, source)
                else:
                    with source() as f:
                        writer.write_object(e.name, f)
            written.append(writer.finish())
    return written
