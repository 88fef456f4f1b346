"""Reading bundle pieces (docs/format.md, "Bundles (node links)", what a reader verifies):
``identify`` tells which link a piece came over from its name alone, ``open_piece`` opens its
sealed key and verifies its header before any object is handed out, and ``OpenedPiece``
streams the objects, each verified against its digest, then the padding, the end of the stream
and the name. node/bundle.py is the public face of both halves.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Iterator, Sequence

import blake3

from bunker.crypto.kem import OpenFailed
from bunker.crypto.node_keys import NodeKeys, NodePublic
from bunker.crypto.sign import SIGNATURE_SIZE, BadSignature
from bunker.errors import BunkerError
from bunker.node.bundle_format import (
    HEADER_DOMAIN,
    LENGTH_SIZE,
    MAX_HEADER_SIZE,
    PREFIX_SIZE,
    SALT_SIZE,
    LinkKeys,
    ManifestEntry,
    PieceBadSender,
    PieceDamaged,
    PieceHeader,
    PieceNotForUs,
    is_hex64,
    key_mask,
    parse_header,
    piece_key_info,
    xor,
)
from bunker.node.stream_aead import SEGMENT_SIZE, SegmentFailed, StreamDecryptor

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class _NotAFile(Exception):
    pass


def _open_regular(path: str) -> int:
    """Open a piece for reading: never through a symlink, never a fifo or device."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if os.path.islink(path):
            raise _NotAFile("is a symbolic link, not a piece") from None
        raise BunkerError(
            f"cannot read bundle piece {path}: {exc.strerror}", "check that the link's directory is readable"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotAFile("is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _update(hasher: blake3.blake3, data: memoryview) -> None:
    hasher.update(data)


def _read_upto(fd: int, n: int) -> bytes:
    parts = []
    while n:
        b = os.read(fd, n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def identify(
    path: str, candidates: Sequence[LinkKeys], *, my_keys: NodeKeys | None = None, name: str | None = None
) -> LinkKeys | None:
    """Which of ``candidates`` (this node's links) the piece at ``path`` came over, from its name
    (the keyed hash of its bytes under each link's peer → me name key: one read, one hasher per
    candidate); None when it is not for this node. With ``my_keys``, a piece whose name matches
    no link but whose sealed key opens for one of them raises PieceDamaged (it is for this
    node, cut short or altered after it was written)."""
    name = os.path.basename(path) if name is None else name
    if not is_hex64(name) or not candidates:
        return None
    try:
        fd = _open_regular(path)
    except _NotAFile:
        return None
    try:
        prefix = _read_upto(fd, PREFIX_SIZE)
        hashers = [blake3.blake3(prefix, key=c.recv_name) for c in candidates]
        while chunk := os.read(fd, SEGMENT_SIZE):
            for h in hashers:
                h.update(chunk)
    finally:
        os.close(fd)
    for c, h in zip(candidates, hashers, strict=True):
        if h.hexdigest() == name:
            return c
    if my_keys is not None and len(prefix) == PREFIX_SIZE:
        for c in candidates:
            with contextlib.suppress(OpenFailed):
                sealed = xor(prefix[SALT_SIZE:], key_mask(c.recv_mask, prefix[:SALT_SIZE]))
                my_keys.open_sealed(sealed, piece_key_info(c.my_id))
                raise PieceDamaged(
                    name, f"its name does not match its bytes (it came from node {c.peer_id}): cut short or altered"
                )
    return None


class OpenedPiece:
    """A piece whose sealed key opened and whose header verified: ``header`` is signed by the
    peer and names this node, the peer and the link's repository. :meth:`stream` (or
    :meth:`objects`) hands out the objects, each verified against its digest; the piece as a
    whole (padding, end of stream, name) is verified only once that iteration ended."""

    def __init__(self, name: str, fd: int, header: PieceHeader, plain: _Plain, name_hash: blake3.blake3) -> None:
        self.name = name
        self.header = header
        self._fd = fd
        self._plain = plain
        self._name_hash = name_hash
        self._started = False
        self._broken: BaseException | None = None
        self.verified = False

    def stream(self) -> Iterator[tuple[ManifestEntry, Iterator[bytes]]]:
        """Each object as ``(entry, chunks)`` in manifest order. ``chunks`` yields the object's
        bytes (each chunk from a segment whose tag verified) and raises PieceDamaged after the
        last one if the digest does not match: what the caller wrote counts only once its loop
        over ``chunks`` ended without an exception. Chunks left unread are read and verified
        before the next object."""
        if self._started:
            raise RuntimeError("a piece's objects are read once")
        self._started = True
        try:
            for entry in self.header.manifest:
                chunks = self._chunks(entry)
                yield entry, chunks
                for _ in chunks:
                    pass
                if self._broken is not None:
                    raise self._broken
            self._finish()
        finally:
            self.close()

    def objects(self) -> Iterator[tuple[str, bytes]]:
        """Each object as ``(name, bytes)``, whole in memory (for small objects)."""
        for entry, chunks in self.stream():
            yield entry.name, b"".join(chunks)

    def verify(self) -> None:
        """Read and verify the whole piece without keeping its objects."""
        for _entry, chunks in self.stream():
            for _ in chunks:
                pass

    def _chunks(self, entry: ManifestEntry) -> Iterator[bytes]:
        try:
            digest = blake3.blake3()
            remaining = entry.size
            while remaining:
                view = self._plain.take(remaining)
                digest.update(view)
                remaining -= len(view)
                yield bytes(view)
            if digest.digest() != entry.digest:
                raise PieceDamaged(self.name, f"object {entry.name} does not match its digest")
        except BaseException as exc:
            # a caller that catches the error and asks for the next object gets it again
            self._broken = exc
            raise

    def _finish(self) -> None:
        while True:
            view = self._plain.take(SEGMENT_SIZE, at_end_ok=True)
            if not view:
                break
            if any(view):  # C-speed scan; a padding byte that is not zero is damage
                raise PieceDamaged(self.name, "its padding is not all zero bytes")
        if self._name_hash.hexdigest() != self.name:
            raise PieceDamaged(self.name, "its name does not match its bytes (renamed or altered)")
        self.verified = True

    def close(self) -> None:
        """Close the piece's file (reading stops) and release the buffers."""
        self._plain.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OpenedPiece:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Plain:
    """The plaintext of a piece as a sequence of bytes, decrypted one segment at a time."""

    def __init__(self, piece: str, decryptor: StreamDecryptor) -> None:
        self._piece = piece
        self._dec = decryptor
        self._view = memoryview(b"")

    def take(self, n: int, *, at_end_ok: bool = False) -> memoryview:
        """Up to ``n`` next bytes (at least one), from the current segment; an empty view at
        the end of the stream when ``at_end_ok``, else PieceDamaged."""
        while not self._view:
            try:
                segment = self._dec.next_segment()
            except SegmentFailed as exc:
                problem = f"segment {exc.index} does not authenticate (altered or cut short)"
                raise PieceDamaged(self._piece, problem) from None
            if segment is None:
                if at_end_ok:
                    return memoryview(b"")
                raise PieceDamaged(self._piece, "its plaintext ends before the objects its header lists")
            self._view = segment
        view, self._view = self._view[:n], self._view[n:]
        return view

    def close(self) -> None:
        self._view = memoryview(b"")
        self._dec.close()

    def read_exact(self, n: int) -> bytes:
        parts = []
        while n:
            view = self.take(n)
            parts.append(bytes(view))
            n -= len(view)
        return b"".join(parts)


def open_piece(
    path: str, my_keys: NodeKeys, link: LinkKeys, peer: NodePublic, *, name: str | None = None
) -> OpenedPiece:
    """Open the piece at ``path`` that came over ``link`` from ``peer``: unmask and open its
    piece key, decrypt and verify its header (signature by the peer's node key; receiver this
    node, sender the peer, repository the link's) before any object is handed out.

    Raises PieceNotForUs (not sealed to this node on this link, or its first 1200 bytes are
    damaged: the two look the same), PieceBadSender (signature, sender, receiver or repository
    not the expected ones; or sealed by the peer to a key that is not this node's), PieceDamaged
    (cut short, altered, malformed). ``name`` defaults to the file's name."""
    if link.my_id != my_keys.node_id or link.peer_id != peer.node_id:
        raise ValueError("the link keys are not this node's link to this peer")
    name = os.path.basename(path) if name is None else name
    try:
        fd = _open_regular(path)
    except _NotAFile as exc:
        raise PieceNotForUs(name, str(exc)) from None
    try:
        name_hash = blake3.blake3(key=link.recv_name)
        prefix = _read_upto(fd, PREFIX_SIZE)
        name_hash.update(prefix)
        if len(prefix) < PREFIX_SIZE:
            raise PieceDamaged(name, f"it is {len(prefix)} bytes, shorter than any piece")
        sealed = xor(prefix[SALT_SIZE:], key_mask(link.recv_mask, prefix[:SALT_SIZE]))
        try:
            piece_key = my_keys.open_sealed(sealed, piece_key_info(my_keys.node_id))
        except OpenFailed:
            while chunk := os.read(fd, SEGMENT_SIZE):
                name_hash.update(chunk)
            if name_hash.hexdigest() == name:
                raise PieceBadSender(
                    name, f"node {peer.node_id} sealed it to a key that is not this node's current KEM key"
                ) from None
            raise PieceNotForUs(
                name, f"does not open with this node's key for the link from node {peer.node_id} (or it is damaged)"
            ) from None
        plain = _Plain(name, StreamDecryptor(piece_key, lambda b: os.readv(fd, [b]), lambda b: _update(name_hash, b)))
        header = _read_header(name, plain, link, peer)
        return OpenedPiece(name, fd, header, plain, name_hash)
    except BaseException:
        os.close(fd)
        raise


def _read_header(name: str, plain: _Plain, link: LinkKeys, peer: NodePublic) -> PieceHeader:
    (length,) = struct.unpack(">I", plain.read_exact(LENGTH_SIZE))
    if not 0 < length <= MAX_HEADER_SIZE:
        raise PieceDamaged(name, f"its header length {length} is out of range")
    raw = plain.read_exact(length)
    signature = plain.read_exact(SIGNATURE_SIZE)
    try:
        peer.verify(HEADER_DOMAIN, raw, signature)
    except BadSignature:
        raise PieceBadSender(name, f"its header is not signed by node {peer.node_id}") from None
    header = parse_header(name, raw)
    wrong = [
        f"{what} is {got}, expected {want}"
        for what, got, want in (
            ("receiver", header.receiver, link.my_id),
            ("sender", header.sender, link.peer_id),
            ("repository", header.repo, link.repo_id),
        )
        if got != want
    ]
    if wrong:
        raise PieceBadSender(name, "its header's " + "; ".join(wrong))
    return header
