"""Index objects decoded entry by entry (repo/index.py): the same entries as they were written,
every malformed plaintext refused whole, and no Python object per entry held at once."""

from __future__ import annotations

import os
import random
import tracemalloc
from typing import Any

import msgpack
import pytest

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import SigningKey
from bunker.repo import index as index_objects
from bunker.repo.index import Location, decrypt_index, make_index, parse_index_frame
from bunker.repo.location_arrays import ColumnsBuilder, LocationColumns
from bunker.repo.objects import MAGIC_INDEX, make_signed

rng = random.Random(14)
SECRETS = PutSecrets(rng.randbytes(32))
SIGNER = SigningKey(rng.randbytes(32))
CERT = "clients/" + "c" * 64
PACKS = [rng.randbytes(32).hex() for _ in range(7)]


def entries(n: int) -> list[tuple[bytes, Location]]:
    return [(os.urandom(32), Location(PACKS[i % len(PACKS)], i * 4096, 1000 + i, 3000 + i)) for i in range(n)]


def decoded(data: bytes) -> Any:
    return decrypt_index(parse_index_frame(data), SECRETS)


def with_plaintext(plain: bytes) -> bytes:
    """An index object, signed and encrypted as a writer makes one, around any plaintext."""
    salt = os.urandom(16)
    ct = aead.encrypt(index_objects._key(SECRETS, salt), plain, SECRETS.domain_id.encode())
    return make_signed(MAGIC_INDEX, {"domain": SECRETS.domain_id, "salt": salt, "ct": ct}, SIGNER, CERT)


def raw(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def test_the_entries_come_back_as_they_were_written() -> None:
    written = entries(1000)
    cols = decoded(make_index(written, SECRETS, SIGNER, CERT))
    assert len(cols) == 1000
    assert list(cols) == written
    assert cols.used_packs() == set(PACKS)


def test_keys_in_any_order_and_fields_a_reader_does_not_know_are_accepted() -> None:
    written = entries(3)
    rows = [[cid, PACKS.index(loc.pack), loc.offset, loc.length, loc.raw_length] for cid, loc in written]
    # "packs" before "entries" (a writer that does not sort keys) and an extra field
    plain = raw({"packs": PACKS, "later": {"x": [1, 2]}, "entries": rows})
    assert list(decoded(with_plaintext(plain))) == written
    assert len(decoded(with_plaintext(raw({"entries": [], "packs": []})))) == 0


GOOD_ROW = [b"\x01" * 32, 0, 10, 20, 30]
PACK = ["ab" * 32]


@pytest.mark.parametrize(
    "plain",
    [
        raw([GOOD_ROW]),  # not a map
        raw({"entries": [GOOD_ROW]}),  # no packs
        raw({"packs": PACK}),  # no entries
        raw({"entries": {"a": 1}, "packs": PACK}),  # entries not a list
        raw({"entries": [GOOD_ROW], "packs": "ab" * 32}),  # packs not a list
        raw({"entries": [GOOD_ROW], "packs": ["AB" * 32]}),  # a pack name not in lowercase hex
        raw({"entries": [GOOD_ROW[:4]], "packs": PACK}),  # a row of four fields
        raw({"entries": [[b"\x01" * 31, 0, 10, 20, 30]], "packs": PACK}),  # a short chunk id
        raw({"entries": [["x" * 32, 0, 10, 20, 30]], "packs": PACK}),  # a chunk id as text
        raw({"entries": [[b"\x01" * 32, 0, True, 20, 30]], "packs": PACK}),  # a bool for an offset
        raw({"entries": [[b"\x01" * 32, 0, -1, 20, 30]], "packs": PACK}),  # a negative offset
        raw({"entries": [[b"\x01" * 32, 0, 10, 2.0, 30]], "packs": PACK}),  # a float length
        raw({"entries": [[b"\x01" * 32, 1, 10, 20, 30]], "packs": PACK}),  # a pack it does not list
        raw({"entries": [[b"\x01" * 32, 0, 1 << 41, 20, 30]], "packs": PACK}),  # an offset out of range
        raw({"entries": [GOOD_ROW], "packs": PACK}) + b"\xc0",  # bytes after the map
        raw({"entries": [GOOD_ROW, GOOD_ROW], "packs": PACK})[:-80],  # cut short
        b"\x82\xa7entries\xdd\xff\xff\xff\xff",  # an array that claims 4 G entries
        b"",
    ],
)
def test_a_malformed_plaintext_is_refused_whole(plain: bytes) -> None:
    with pytest.raises(encoding.FormatError):
        decoded(with_plaintext(plain))


def test_an_object_that_does_not_decrypt_is_refused() -> None:
    data = make_index(entries(2), SECRETS, SIGNER, CERT)
    with pytest.raises(encoding.FormatError, match="does not decrypt"):
        decrypt_index(parse_index_frame(data), PutSecrets(b"\x07" * 32))


def test_a_full_object_is_decoded_without_an_object_per_entry() -> None:
    """Decoded whole, the 100,000 entries of a full index object took ~40 MiB of Python objects
    (tracemalloc) beside the ~5 MiB their columns take; one at a time, only the columns stay."""
    data = make_index(entries(index_objects.INDEX_BATCH), SECRETS, SIGNER, CERT)
    obj = parse_index_frame(data)
    tracemalloc.start()
    try:
        cols = decrypt_index(obj, SECRETS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cols) == index_objects.INDEX_BATCH
    assert peak < 20 << 20, f"decoding peaked at {peak >> 20} MiB"


def test_the_plaintext_is_encoded_as_one_msgpack_map_with_its_keys_sorted() -> None:
    """Encoded entry by entry, the bytes are those of the whole map encoded at once: the
    format (docs/format.md) is unchanged."""
    written = entries(500)
    rows = [[cid, PACKS.index(loc.pack), loc.offset, loc.length, loc.raw_length] for cid, loc in written]
    whole = encoding.pack_ordered({"entries": rows, "packs": PACKS})
    assert bytes(index_objects._plaintext(LocationColumns.from_entries(written))) == whole
    assert bytes(index_objects._plaintext(LocationColumns.from_entries([]))) == encoding.pack_ordered(
        {"entries": [], "packs": []}
    )


def test_a_writers_entries_gathered_as_columns_come_back_in_objects_of_a_batch_each() -> None:
    built = ColumnsBuilder()
    written: list[tuple[bytes, Location]] = []
    for p, pack in enumerate(PACKS):
        rows = [(os.urandom(32), 4096 * i, 100 + i, 200 + p) for i in range(300)]
        built.add_pack(pack, rows)
        written += [(cid, Location(pack, off, ln, raw)) for cid, off, ln, raw in rows]
    assert len(built) == 7 * 300
    batches = built.take(1000)
    assert len(built) == 0 and built.take(1000) == []
    assert [len(b) for b in batches] == [1000, 1000, 100]
    back: list[tuple[bytes, Location]] = []
    for b in batches:
        cols = decoded(make_index(b, SECRETS, SIGNER, CERT))
        # each object names only the packs its entries are in, numbered from 0
        assert cols.packs == list(dict.fromkeys(loc.pack for _, loc in cols))
        back += list(cols)
    assert back == written


def test_a_full_object_is_encoded_without_an_object_per_entry() -> None:
    """A list per entry, all held until the whole map was encoded, took ~15 MiB for a full
    object beside its plaintext, ciphertext and signed frame (~5 MiB each): 37 MiB at the
    peak, 23 without (tracemalloc)."""
    built = ColumnsBuilder()
    built.add_pack(PACKS[0], [(os.urandom(32), 4096 * i, 1000 + i, 3000 + i) for i in range(index_objects.INDEX_BATCH)])
    (cols,) = built.take(index_objects.INDEX_BATCH)
    tracemalloc.start()
    try:
        data = make_index(cols, SECRETS, SIGNER, CERT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(decoded(data)) == index_objects.INDEX_BATCH
    assert peak < 30 << 20, f"encoding peaked at {peak >> 20} MiB"
