"""The parts of a bundle piece that are not streaming (docs/format.md, "Bundles"): the keys of a
link, the header and its manifest, the padding rule, the planner that splits objects into
pieces, and the errors a reader raises. node/bundle.py writes and reads pieces with them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from bunker import encoding
from bunker.crypto.derive import CTX_LINK_MASK, CTX_LINK_NAME, derive
from bunker.crypto.kem import SEALED_OVERHEAD
from bunker.crypto.node_keys import NodeKeys, NodePublic
from bunker.crypto.sign import SIGNATURE_SIZE
from bunker.errors import BunkerError, ExitCode
from bunker.node.stream_aead import ciphertext_size, plain_size

HEADER_VERSION = 1
KINDS = ("data", "receipt", "down", "request")
SALT_SIZE = 32
PIECE_KEY_SIZE = 32
SEALED_KEY_SIZE = SEALED_OVERHEAD + PIECE_KEY_SIZE  # 1168
PREFIX_SIZE = SALT_SIZE + SEALED_KEY_SIZE  # 1200: salt || masked sealed key
SET_ID_SIZE = 16
DIGEST_SIZE = 32
LENGTH_SIZE = 4  # u32 BE header length
PIECE_FLOOR = 4096  # smallest piece on disk: receipts are tiny
MAX_HEADER_SIZE = 4 << 20  # bounds a reader's memory and a piece's manifest
MAX_EXTRA_SIZE = 1 << 20
MAX_NAME_LENGTH = 1024
MAX_INT = (1 << 63) - 1
HEADER_DOMAIN = b"bunker bundle header v1"
PIECE_KEY_INFO = b"bunker bundle piece key v1\x00"  # || receiver node id (64 ASCII hex)

_HEX64 = re.compile(r"[0-9a-f]{64}")


def piece_key_info(receiver_id: str) -> bytes:
    """The HPKE ``info`` of a piece key sealed to the node ``receiver_id``."""
    return PIECE_KEY_INFO + receiver_id.encode()


def is_hex64(value: object) -> bool:
    """True for a string of exactly 64 lowercase hex digits (node ids, repo ids, piece names)."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


# ---------------------------------------------------------------------------------------------
# errors


class PieceError(BunkerError):
    """A bundle piece that cannot be imported; ``piece`` names it, ``problem`` says why."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, piece: str, problem: str, hint: str) -> None:
        self.piece = piece
        self.problem = problem
        super().__init__(f"bundle piece {piece} {problem}", hint)


class PieceNotForUs(PieceError):
    """The piece is not sealed to this node on this link (or its first 1200 bytes are damaged,
    which looks the same): leave it where it is."""

    exit_code = ExitCode.FATAL

    def __init__(self, piece: str, problem: str) -> None:
        super().__init__(
            piece,
            problem,
            "leave it in the link for the node it is for; if it was meant for this node, the sending node "
            "writes its objects again once this node's receipt lists them as missing",
        )


class PieceDamaged(PieceError):
    """The piece is for this node but altered, cut short or malformed."""

    def __init__(self, piece: str, problem: str) -> None:
        super().__init__(
            piece,
            f"is damaged: {problem}",
            "nothing of it that failed was imported; remove the piece from the link and let the sending node "
            "write its objects again (this node's receipt lists them as missing); check the medium that carried it",
        )


class PieceBadSender(PieceError):
    """The piece decrypts but was not made by the expected peer for this node and repository."""

    def __init__(self, piece: str, problem: str) -> None:
        super().__init__(
            piece,
            f"is refused: {problem}",
            "nothing of it was imported; someone who holds this link's keys wrote it, or the peer's card is "
            "not the one paired with this link: compare the node ids on both sides (`bunker node card`)",
        )


class ObjectTooLarge(BunkerError):
    """An object that does not fit in a piece of the maximum size (objects never span pieces)."""

    def __init__(self, name: str, size: int, max_piece_size: int, needed: int) -> None:
        self.needed = needed
        super().__init__(
            f"object {name} ({size} bytes) does not fit in a bundle piece of at most {max_piece_size} bytes "
            f"(a piece never splits an object; this one needs a piece of {needed} bytes)",
            f"set the link's maximum piece size to at least {needed} bytes",
        )


class ObjectChanged(BunkerError):
    """An object's bytes that do not match the size or digest its manifest entry announced."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(
            f"object {name} changed while it was written into a bundle piece: {problem}",
            "the piece was not written; check the node store's disk (`bunker check` on the node), then forward again",
        )


# ---------------------------------------------------------------------------------------------
# link keys


@dataclass(frozen=True)
class LinkKeys:
    """The keys of one link (this node, a peer, one repository), for both directions.

    ``send_*`` are this node → peer, ``recv_*`` peer → this node. The peer computes the same four
    keys with the directions swapped; nobody without one of the two link private keys can.
    """

    my_id: str
    peer_id: str
    repo_id: str
    send_mask: bytes = field(repr=False)
    send_name: bytes = field(repr=False)
    recv_mask: bytes = field(repr=False)
    recv_name: bytes = field(repr=False)

    @classmethod
    def between(cls, my: NodeKeys, peer: NodePublic, repo_id: str) -> LinkKeys:
        """Derive the link's keys from the X25519 agreement of the two nodes' link keys."""
        if not is_hex64(repo_id):
            raise ValueError("a repository id is 64 lowercase hex digits")
        if peer.node_id == my.node_id:
            raise ValueError("a node has no link to itself")
        shared = my.agree(peer.link)

        def direction(sender: str, receiver: str) -> tuple[bytes, bytes]:
            material = shared + sender.encode() + receiver.encode() + repo_id.encode()
            return derive(CTX_LINK_MASK, material), derive(CTX_LINK_NAME, material)

        send_mask, send_name = direction(my.node_id, peer.node_id)
        recv_mask, recv_name = direction(peer.node_id, my.node_id)
        return cls(my.node_id, peer.node_id, repo_id, send_mask, send_name, recv_mask, recv_name)


def key_mask(mask_key: bytes, salt: bytes) -> bytes:
    """The 1168 bytes XORed over a piece's sealed key: BLAKE3 XOF keyed with the direction's mask
    key over the piece's salt."""
    return blake3.blake3(salt, key=mask_key).digest(SEALED_KEY_SIZE)


def xor(a: bytes, b: bytes) -> bytes:
    """Bytewise XOR of two strings of the same length."""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


# ---------------------------------------------------------------------------------------------
# header


@dataclass(frozen=True)
class ManifestEntry:
    """One object of a piece: its name, size and plain BLAKE3 digest."""

    name: str
    size: int
    digest: bytes

    @classmethod
    def of(cls, name: str, data: bytes) -> ManifestEntry:
        """The entry of an object held in memory."""
        return cls(name, len(data), blake3.blake3(data).digest())

    def encoded(self) -> list[Any]:
        return [self.name, self.size, self.digest]


@dataclass(frozen=True)
class PieceHeader:
    """The signed header of a piece, as the reader verified it."""

    kind: str
    repo: str
    sender: str
    receiver: str
    seq: int
    set_id: bytes
    index: int
    count: int
    created: float
    manifest: tuple[ManifestEntry, ...]
    extra: dict[str, Any] = field(hash=False)

    def to_map(self) -> dict[str, Any]:
        """The header map as written (docs/format.md, "Bundles")."""
        return {
            "v": HEADER_VERSION,
            "kind": self.kind,
            "repo": self.repo,
            "sender": self.sender,
            "receiver": self.receiver,
            "seq": self.seq,
            "set": self.set_id,
            "piece": [self.index, self.count],
            "created": float(self.created),
            "manifest": [e.encoded() for e in self.manifest],
            "extra": self.extra,
        }

    def check(self) -> None:
        """Raise ValueError unless every field is in range (the writer's check; the reader's is
        :func:`parse_header`)."""
        if self.kind not in KINDS:
            raise ValueError(f"bundle kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not all(is_hex64(v) for v in (self.repo, self.sender, self.receiver)):
            raise ValueError("repository and node ids are 64 lowercase hex digits")
        if not 1 <= self.seq <= MAX_INT:
            raise ValueError("a piece's sequence number is an int >= 1")
        if len(self.set_id) != SET_ID_SIZE:
            raise ValueError(f"a bundle's set id is {SET_ID_SIZE} bytes")
        if not 0 <= self.index < self.count <= MAX_INT:
            raise ValueError("piece index must be in [0, count)")
        names = set()
        for e in self.manifest:
            if not e.name or len(e.name) > MAX_NAME_LENGTH or e.name in names:
                raise ValueError(f"object name {e.name!r} is empty, too long or twice in the manifest")
            if not 0 <= e.size <= MAX_INT or len(e.digest) != DIGEST_SIZE:
                raise ValueError(f"object {e.name}: bad size or digest")
            names.add(e.name)
        if len(encoding.pack(self.extra)) > MAX_EXTRA_SIZE:
            raise ValueError(f"a piece's extra map is at most {MAX_EXTRA_SIZE} bytes")


def parse_header(piece: str, raw: bytes) -> PieceHeader:
    """Parse and range-check a header (after its signature verified); raise PieceDamaged."""
    try:
        m = encoding.expect_map(
            encoding.unpack(raw),
            *("v", "kind", "repo", "sender", "receiver", "seq", "set", "piece", "created", "manifest", "extra"),
        )
        if encoding.field(m, "v", int) != HEADER_VERSION:
            raise encoding.FormatError(f"header version {m['v']} (this bunker reads version {HEADER_VERSION})")
        index_count = encoding.field(m, "piece", list)
        if len(index_count) != 2 or not all(type(x) is int for x in index_count):
            raise encoding.FormatError("field 'piece' is not [index, count]")
        created = encoding.field(m, "created", (float, int))
        if isinstance(created, bool):
            raise encoding.FormatError("field 'created' has the wrong type")
        manifest = []
        for item in encoding.field(m, "manifest", list):
            if not (isinstance(item, list) and len(item) == 3):
                raise encoding.FormatError("a manifest entry is not [name, size, digest]")
            name, size, digest = item
            if not (isinstance(name, str) and type(size) is int and isinstance(digest, bytes)):
                raise encoding.FormatError("a manifest entry has the wrong types")
            manifest.append(ManifestEntry(name, size, digest))
        extra = encoding.field(m, "extra", dict)
        header = PieceHeader(
            kind=encoding.field(m, "kind", str),
            repo=encoding.field(m, "repo", str),
            sender=encoding.field(m, "sender", str),
            receiver=encoding.field(m, "receiver", str),
            seq=encoding.field(m, "seq", int),
            set_id=encoding.field_bytes(m, "set", SET_ID_SIZE),
            index=index_count[0],
            count=index_count[1],
            created=float(created),
            manifest=tuple(manifest),
            extra=extra,
        )
        header.check()
    except (encoding.FormatError, ValueError) as exc:
        raise PieceDamaged(piece, f"its header is malformed ({exc})") from None
    return header


# ---------------------------------------------------------------------------------------------
# padding and planning


def padme(n: int) -> int:
    """Padmé (PURBs, Nikitin et al. 2019): ``n`` rounded up so that only its top
    ``floor(log2(E)) + 1`` bits vary, where ``E = floor(log2(n))``; leaks O(log log n) bits."""
    if n < 2:
        return n
    e = n.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (n + mask) & ~mask


def piece_size_for(content: int) -> int:
    """The size on disk of a piece whose plaintext before padding is ``content`` bytes: the
    Padmé bucket of its unpadded size (at least PIECE_FLOOR), or the next bucket while the
    STREAM cannot fill a bucket exactly (a final segment of 1 to 16 bytes has no plaintext)."""
    size = padme(max(PREFIX_SIZE + ciphertext_size(content), PIECE_FLOOR))
    while plain_size(size - PREFIX_SIZE) is None:
        size = padme(size + 1)
    return size


def _header_bound(extra: dict[str, Any]) -> int:
    """The largest header of an empty manifest with ``extra`` (widest ints; kind "receipt")."""
    zero_id = "0" * 64
    worst = PieceHeader("receipt", zero_id, zero_id, zero_id, MAX_INT, bytes(SET_ID_SIZE), 0, MAX_INT, 0.0, (), extra)
    m = worst.to_map()
    m["piece"] = [MAX_INT, MAX_INT]
    return len(encoding.pack(m)) + 4  # the manifest array's header grows to 5 bytes


def content_size(header_size: int, objects_size: int) -> int:
    """The plaintext size before padding: length, header, signature and the objects."""
    return LENGTH_SIZE + header_size + SIGNATURE_SIZE + objects_size


def plan_pieces(
    entries: Sequence[ManifestEntry], max_piece_size: int, extra: dict[str, Any] | None = None
) -> list[list[ManifestEntry]]:
    """Split ``entries`` (in order) into pieces of at most ``max_piece_size`` bytes on disk, as
    few as the order allows; an object never spans pieces. No entries make one empty piece.
    Raise ObjectTooLarge for an object that does not fit in a piece alone."""
    base = _header_bound(extra or {})
    pieces: list[list[ManifestEntry]] = []
    current: list[ManifestEntry] = []
    header = objects = 0
    for e in entries:
        cost = len(encoding.pack(e.encoded()))
        fits = base + header + cost <= MAX_HEADER_SIZE and (
            piece_size_for(content_size(base + header + cost, objects + e.size)) <= max_piece_size
        )
        if fits:
            current.append(e)
            header += cost
            objects += e.size
            continue
        alone = piece_size_for(content_size(base + cost, e.size))
        if alone > max_piece_size or base + cost > MAX_HEADER_SIZE:
            raise ObjectTooLarge(e.name, e.size, max_piece_size, alone)
        if current:
            pieces.append(current)
        current, header, objects = [e], cost, e.size
    if current or not pieces:
        if not current and piece_size_for(content_size(base, 0)) > max_piece_size:
            raise ValueError(f"a maximum piece size of {max_piece_size} bytes holds no piece at all")
        pieces.append(current)
    return pieces
