"""check --read-data's pack verification (repo/pack_verifier.py) reads a pack in pieces that end
where blobs end: every blob is verified, damage is named per chunk, and no read is longer than a
piece (a worker holds a piece, not the whole pack). Packs are built in process (test_pack_format)
and stored in a real local repository directory."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from bunker.repo import pack_verifier
from bunker.repo.pack import HEADER, BlobEntry, open_group_key
from bunker.repo.pack_verifier import PackJob, pieces, verify_pack
from bunker.storage.local import LocalBackend
from test_pack_format import SEALED, Built


class RecordingBackend(LocalBackend):
    """A local repository that records the length of every read."""

    def __init__(self, root: str) -> None:
        super().__init__(root, create=True)
        self.reads: list[int] = []

    def _get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = super()._get(name, offset, length)
        self.reads.append(len(data))
        return data

    def _read_into(self, name: str, offset: int, buf: memoryview) -> int:
        n = super()._read_into(name, offset, buf)
        self.reads.append(n)
        return n


@pytest.fixture(scope="module")
def built() -> Built:
    return Built(60, seed=7)


def stored(built: Built, tmp_path: Path, data: bytes | None = None) -> tuple[RecordingBackend, PackJob]:
    backend = RecordingBackend(str(tmp_path / "repo"))
    name = f"packs/{built.name}"
    backend.put(name, built.data if data is None else data)
    key = open_group_key(built.data[len(HEADER) : len(HEADER) + SEALED], built.data_private, built.secrets.domain_id)
    job = PackJob(
        name, len(built.data), built.footer.body_length, built.footer.body_hash, [key], None, built.secrets.secret
    )
    backend.reads.clear()
    return backend, job


def test_every_blob_is_verified_in_pieces_no_longer_than_a_piece(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    piece = 20_000  # the pack is ~240 kB: several pieces, most holding several blobs
    monkeypatch.setattr(pack_verifier, "PIECE", piece)
    backend, job = stored(built, tmp_path)
    res = verify_pack(job, backend)
    assert res.problems == [] and not res.vanished
    assert res.verified == len(built.entries)
    assert res.bytes_read == len(built.data)
    longest_blob = max(b.length for b in built.entries)
    assert len(backend.reads) > 5 and sum(backend.reads) == len(built.data)
    assert max(backend.reads) <= max(piece, longest_blob)


def test_a_damaged_blob_in_a_middle_piece_is_named_and_the_others_verify(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack_verifier, "PIECE", 20_000)
    b = sorted(built.entries, key=lambda e: e.offset)[len(built.entries) // 2]
    data = bytearray(built.data)
    data[b.offset + b.length // 2] ^= 0x40
    backend, job = stored(built, tmp_path, bytes(data))
    res = verify_pack(job, backend)
    assert res.problems[0].startswith("its bytes do not match its name")
    assert res.problems[1].startswith("pack body does not match its signed hash")
    why = "blob does not decrypt (altered, or wrong key)"
    assert res.problems[2:] == [f"chunk {b.chunk_id.hex()[:16]} at offset {b.offset}: {why}"]
    assert res.verified == len(built.entries) - 1


def test_a_pack_cut_short_or_deleted_while_checked(built: Built, tmp_path: Path) -> None:
    backend, job = stored(built, tmp_path)
    path = Path(backend.root) / job.name
    with open(path, "r+b") as f:
        f.truncate(len(built.data) // 2)  # the footer (read first) is gone
    res = verify_pack(job, backend)
    assert res.verified == 0 and any("its size changed while checking" in p for p in res.problems), res
    path.unlink()
    assert verify_pack(job, backend).vanished


def entry(offset: int, length: int) -> BlobEntry:
    return BlobEntry(os.urandom(32), 0, offset, length, length, b"")


@pytest.mark.parametrize("seed", range(20))
def test_pieces_cover_the_body_in_order_and_end_where_blobs_end(seed: int) -> None:
    rng = random.Random(seed)
    off, blobs = rng.randrange(0, 2000), []
    for _ in range(rng.randrange(0, 60)):
        n = rng.choice([1, 50, 700, 3000, 9000])
        blobs.append(entry(off, n))
        off += n
    body = off + rng.choice([0, 0, 17])
    piece = rng.choice([1, 1000, 4096, 20_000])
    got = pieces(blobs, body, piece)
    assert [s for s, _ in got] == [0] + [e for _, e in got[:-1]]  # back to back from the start
    assert (got[-1][1] if got else 0) == body
    ends = {b.offset + b.length for b in blobs} | {body}
    for s, e in got:
        assert e in ends
        inside = [b for b in blobs if s <= b.offset and b.offset + b.length <= e]
        assert e - s <= piece or len(inside) <= 1  # longer than a piece: one blob that is
    for b in blobs:  # each blob lies in exactly one piece
        assert sum(1 for s, e in got if s <= b.offset and b.offset + b.length <= e) == 1
