"""The pack trailer format (FORMAT.md 10.3/10.4): blobs listed per key group without offsets
(computed while decoding), blob keys wrapped with AES Key Wrap (40 bytes), and a decoder that
rejects every malformed or out-of-bounds entry with FormatError. Packs are built in process."""

from __future__ import annotations

import copy
import os
import random
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from hypothesis import given
from hypothesis import strategies as st

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets
from bunker.crypto.kem import DataPrivateKey
from bunker.crypto.sign import SigningKey
from bunker.encoding import FormatError
from bunker.repo import blob
from bunker.repo.pack import (
    HEADER,
    WRAPPED_SIZE,
    BlobEntry,
    PackFooter,
    PackWriter,
    decrypt_trailer,
    open_group_key,
    parse_footer,
    trailer_key,
    unwrap_blob_key,
    verify_footer,
)
from test_fuzz import FUZZ, byte_mutation, struct_mutation

SEALED = 1168  # an HPKE sealed 32-byte key (FORMAT.md section 2)
CERT = "clients/" + "ab" * 32


class Built:
    """A pack made by PackWriter with the keys to read it back."""

    def __init__(self, n: int, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.secrets = PutSecrets(rng.randbytes(32))
        self.data_private = DataPrivateKey(rng.randbytes(32))
        self.signer = SigningKey(rng.randbytes(32))
        w = PackWriter("data", self.secrets, self.data_private.public(), self.signer, CERT)
        self.plain: dict[bytes, bytes] = {}
        self.k_blobs: dict[bytes, bytes] = {}
        for i in range(n):
            size = rng.choice([0, 1, 63, 64, 500, 4096, 70_000])
            data = rng.randbytes(size) if i % 2 else bytes([i % 256]) * size  # stored as is / zstd
            cid = blob.chunk_id(self.secrets, data)
            if cid in self.plain:
                continue
            ct, k_blob = blob.encrypt_blob(self.secrets, cid, data)
            w.add(cid, ct, len(data), k_blob)
            self.plain[cid] = data
            self.k_blobs[cid] = k_blob
        self.entries = list(w.entries)
        done = w.seal()  # built in memory: no staged file
        assert done.data is not None
        self.name, self.data = done.name, done.data
        self.footer = parse_footer(self.data, len(self.data))

    def trailer_plain(self) -> Any:
        """The decrypted, decoded trailer map."""
        f = self.footer
        return msgpack.unpackb(aead.decrypt(trailer_key(self.secrets, f.salt), f.trailer_ct, f.body_hash), raw=False)

    def footer_with(self, trailer: Any, body_length: int | None = None) -> PackFooter:
        """This pack's footer with another trailer (encrypted under the right key and AAD)."""
        f = self.footer
        ct = aead.encrypt(trailer_key(self.secrets, f.salt), msgpack.packb(trailer, use_bin_type=True), f.body_hash)
        return replace(f, trailer_ct=ct, body_length=f.body_length if body_length is None else body_length)


@pytest.fixture(scope="module")
def built() -> Built:
    return Built(12)


def test_round_trip_offsets_and_blobs_decrypt(built: Built) -> None:
    verify_footer(built.footer, built.signer.public_bytes)
    t = decrypt_trailer(built.footer, built.secrets)
    assert (t.kind, t.domain, t.writer, t.body_hash) == ("data", built.secrets.domain_id, CERT, built.footer.body_hash)
    assert t.groups == [(len(HEADER), SEALED)]
    assert t.blobs == built.entries  # every field, offsets included, as the writer recorded them
    assert len(t.blobs) == len(built.plain) >= 8
    # the blobs lie back to back right after the sealed group key, up to the end of the body
    off = len(HEADER) + SEALED
    for b in t.blobs:
        assert (b.group, b.offset) == (0, off)
        off += b.length
    assert off == built.footer.body_length
    # the bytes at those offsets decrypt with the unwrapped key and give the content back
    group = aead.Cipher(
        open_group_key(built.data[len(HEADER) : len(HEADER) + SEALED], built.data_private, built.secrets.domain_id)
    )
    for b in t.blobs:
        k = unwrap_blob_key(group, b)
        assert k == built.k_blobs[b.chunk_id]
        plain = blob.decrypt_blob(k, b.chunk_id, built.data[b.offset : b.offset + b.length], b.raw_length)
        assert plain == built.plain[b.chunk_id]
        assert blob.verify_blob(built.secrets, b.chunk_id, plain)


def test_wrapped_key_is_40_byte_aes_key_wrap(built: Built) -> None:
    group_key = open_group_key(
        built.data[len(HEADER) : len(HEADER) + SEALED], built.data_private, built.secrets.domain_id
    )
    assert WRAPPED_SIZE == 40
    for b in decrypt_trailer(built.footer, built.secrets).blobs:
        assert len(b.wrapped_key) == 40
        assert aes_key_unwrap(group_key, b.wrapped_key) == built.k_blobs[b.chunk_id]
        assert aes_key_wrap(group_key, built.k_blobs[b.chunk_id]) == b.wrapped_key  # deterministic
    c = aead.Cipher(group_key)
    assert c.key == group_key
    assert c.unwrap_key(c.wrap_key(b"k" * 32)) == b"k" * 32
    with pytest.raises(AttributeError):
        c.key = b"x" * 32  # type: ignore[misc]


def test_trailer_layout_is_compact_and_canonical(built: Built) -> None:
    m = built.trailer_plain()
    assert list(m) == sorted(m) == ["domain", "groups", "kind", "v", "writer"]
    assert m["v"] == 1
    [[g_off, g_len, entries]] = m["groups"]
    assert (g_off, g_len) == (len(HEADER), SEALED)
    assert all(len(e) == 4 and len(e[0]) == 32 and len(e[3]) == 40 for e in entries)
    plain = msgpack.packb(m, use_bin_type=True)
    assert encoding.pack(m) == plain  # pack_ordered's output is the canonical encoding
    # per blob: fixarray + bin8(32) + two uint16/uint32 + bin8(40), no group/offset, no GCM nonce/tag
    per_blob = (len(plain) - len(msgpack.packb({**m, "groups": [[g_off, g_len, []]]}, use_bin_type=True))) / len(
        entries
    )
    assert per_blob <= 1 + 34 + 5 + 5 + 42


def test_blob_offsets_per_group_in_a_multi_group_trailer(built: Built) -> None:
    """The reader computes offsets per key group (this version writes one group; more are valid)."""
    m = built.trailer_plain()
    [[g_off, g_len, entries]] = m["groups"]
    first, second = entries[:5], entries[5:]
    second_at = g_off + g_len + sum(e[1] for e in first) + 10  # 10 unused bytes, then group 1's key
    m["groups"] = [[g_off, g_len, first], [second_at, 100, second]]
    body = second_at + 100 + sum(e[1] for e in second)
    t = decrypt_trailer(built.footer_with(m, body), built.secrets)
    assert t.groups == [(g_off, g_len), (second_at, 100)]
    expect, off = [], g_off + g_len
    for e in first:
        expect.append(BlobEntry(e[0], 0, off, e[1], e[2], e[3]))
        off += e[1]
    off = second_at + 100
    for e in second:
        expect.append(BlobEntry(e[0], 1, off, e[1], e[2], e[3]))
        off += e[1]
    assert t.blobs == expect
    # a group with no blobs, then nothing
    m["groups"] = [[g_off, g_len, []]]
    assert decrypt_trailer(built.footer_with(m), built.secrets).blobs == []


def _mutate(m: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    m = copy.deepcopy(m)
    parent: Any = m
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return m


BAD: list[tuple[str, tuple[Any, ...], Any]] = [
    # (what, path into the trailer map, new value); path ("groups", 0, 2, i, j) is blob i's field j
    ("wrapped key 39 bytes", ("groups", 0, 2, 0, 3), b"w" * 39),
    ("wrapped key 41 bytes", ("groups", 0, 2, 3, 3), b"w" * 41),
    ("wrapped key 60 bytes (the old AES-GCM wrap)", ("groups", 0, 2, 1, 3), b"w" * 60),
    ("wrapped key not bin", ("groups", 0, 2, 0, 3), "w" * 40),
    ("chunk id 31 bytes", ("groups", 0, 2, 0, 0), b"c" * 31),
    ("chunk id not bin", ("groups", 0, 2, 0, 0), None),
    ("length below the AEAD overhead", ("groups", 0, 2, 2, 1), 27),
    ("length a bool", ("groups", 0, 2, 2, 1), True),
    ("length a float", ("groups", 0, 2, 2, 1), 100.0),
    ("raw length negative", ("groups", 0, 2, 0, 2), -1),
    ("raw length above 1 GiB", ("groups", 0, 2, 0, 2), (1 << 30) + 1),
    ("raw length a string", ("groups", 0, 2, 0, 2), "5"),
    ("blob entry with 5 fields", ("groups", 0, 2, 0), [b"c" * 32, 100, 100, b"w" * 40, 0]),
    ("blob entry in the old 6-field form", ("groups", 0, 2, 0), [b"c" * 32, 0, 1173, 100, 100, b"w" * 60]),
    ("blob entry not a list", ("groups", 0, 2, 0), b"x"),
    ("blob list not a list", ("groups", 0, 2), {"a": 1}),
    ("group in the old 2-field form", ("groups", 0), [5, SEALED]),
    ("group not a list", ("groups", 0), 5),
    ("group offset inside the header", ("groups", 0, 0), 4),
    ("group offset negative", ("groups", 0, 0), -SEALED),
    ("group length zero", ("groups", 0, 1), 0),
    ("group offset a bool", ("groups", 0, 0), True),
    ("groups not a list", ("groups",), {"0": 1}),
    ("groups missing", ("groups",), None),
]


@pytest.mark.parametrize(("what", "path", "value"), BAD, ids=[b[0] for b in BAD])
def test_malformed_trailer_is_rejected(built: Built, what: str, path: tuple[Any, ...], value: Any) -> None:
    m = _mutate(built.trailer_plain(), path, value)
    if what == "groups missing":
        del m["groups"]
    with pytest.raises(FormatError):
        decrypt_trailer(built.footer_with(m), built.secrets)


def test_blob_overrunning_the_body_is_rejected(built: Built) -> None:
    m = built.trailer_plain()
    entries = m["groups"][0][2]
    assert decrypt_trailer(built.footer_with(m), built.secrets).blobs[-1].offset + entries[-1][1] == (
        built.footer.body_length
    )
    # the last blob one byte longer: it would end past the body (into the footer)
    with pytest.raises(FormatError, match="outside the pack body"):
        decrypt_trailer(
            built.footer_with(_mutate(m, ("groups", 0, 2, len(entries) - 1, 1), entries[-1][1] + 1)), built.secrets
        )
    # any earlier blob longer pushes every later one out
    with pytest.raises(FormatError, match="outside the pack body"):
        decrypt_trailer(built.footer_with(_mutate(m, ("groups", 0, 2, 0, 1), entries[0][1] + 1)), built.secrets)
    # or the body is shorter than the trailer says
    with pytest.raises(FormatError, match="outside the pack body"):
        decrypt_trailer(built.footer_with(m, built.footer.body_length - 1), built.secrets)
    # a sealed key reaching past the body
    with pytest.raises(FormatError, match="outside the pack body"):
        decrypt_trailer(built.footer_with(m, len(HEADER) + SEALED - 1), built.secrets)


def test_groups_must_not_overlap_blobs(built: Built) -> None:
    m = built.trailer_plain()
    [[g_off, g_len, entries]] = m["groups"]
    blobs_end = g_off + g_len + sum(e[1] for e in entries)
    big = blobs_end + 2 * SEALED
    # a second group whose sealed key starts inside the first group's last blob
    m2 = _mutate(m, ("groups",), [[g_off, g_len, entries], [blobs_end - 1, SEALED, []]])
    with pytest.raises(FormatError, match="overlaps"):
        decrypt_trailer(built.footer_with(m2, big), built.secrets)
    # ... or before the first group (out of pack order)
    m3 = _mutate(m, ("groups",), [[blobs_end, SEALED, []], [g_off, g_len, entries]])
    with pytest.raises(FormatError, match="overlaps"):
        decrypt_trailer(built.footer_with(m3, big), built.secrets)
    # right after it is fine
    m4 = _mutate(m, ("groups",), [[g_off, g_len, entries], [blobs_end, SEALED, []]])
    assert decrypt_trailer(built.footer_with(m4, big), built.secrets).groups[1] == (blobs_end, SEALED)


def test_altered_or_wrong_wrapped_key_does_not_open(built: Built) -> None:
    t = decrypt_trailer(built.footer, built.secrets)
    group = aead.Cipher(
        open_group_key(built.data[len(HEADER) : len(HEADER) + SEALED], built.data_private, built.secrets.domain_id)
    )
    b = t.blobs[0]
    for bad in (bytes([b.wrapped_key[0] ^ 1]) + b.wrapped_key[1:], b.wrapped_key[:-1] + b"\x00", b"", b"w" * 60):
        with pytest.raises(FormatError, match="wrapped blob key does not open"):
            unwrap_blob_key(group, b._replace(wrapped_key=bad))
    with pytest.raises(FormatError, match="wrapped blob key does not open"):
        unwrap_blob_key(aead.Cipher(os.urandom(32)), b)  # another group's key
    # a wrapped key moved to another entry unwraps (AES-KW binds no chunk id) but opens nothing:
    # the blob's AEAD has its own chunk id as associated data
    other = t.blobs[1]
    k = unwrap_blob_key(group, b._replace(wrapped_key=other.wrapped_key))
    with pytest.raises(blob.BlobError):
        blob.decrypt_blob(k, b.chunk_id, built.data[b.offset : b.offset + b.length], b.raw_length)


@FUZZ
@given(st.data())
def test_decrypt_trailer_mutated(built: Built, data: st.DataObject) -> None:
    """Structural and byte mutations of a real trailer (re-encrypted with the right key): only
    FormatError comes out, and whatever decodes lies inside the body."""
    m = built.trailer_plain()
    if data.draw(st.booleans()):
        m = data.draw(struct_mutation(m))
        try:
            raw = encoding.pack(m)
        except (TypeError, ValueError, OverflowError):
            raw = msgpack.packb(m, use_bin_type=True)
    else:
        raw = data.draw(byte_mutation(msgpack.packb(m, use_bin_type=True)))
    f = built.footer
    body = data.draw(st.sampled_from([f.body_length, f.body_length - 1, f.body_length + 100, 0]))
    footer = replace(f, trailer_ct=aead.encrypt(trailer_key(built.secrets, f.salt), raw, f.body_hash), body_length=body)
    try:
        t = decrypt_trailer(footer, built.secrets)
    except FormatError:
        return  # anything else fails the test
    for b in t.blobs:
        assert len(HEADER) <= b.offset and b.offset + b.length <= body and len(b.wrapped_key) == WRAPPED_SIZE
        assert 0 <= b.group < len(t.groups)
