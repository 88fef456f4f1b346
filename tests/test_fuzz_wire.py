"""Fuzzing the newest parsers of untrusted bytes (issue 5): the serve protocol's handshake and
frames, leases (with checkpoints), retirement, unretire and condemnation records. Each raises only its
documented errors (ProtocolError / FormatError / ValueError / a BunkerError), never anything
else, and never reads past what it was given; hostile objects in sessions/ and gc/ are skipped
by the readers that act on them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bunker.crypto.sign import SigningKey
from bunker.encoding import FormatError
from bunker.errors import BunkerError
from bunker.repo.condemnations import condemnations, condemned_packs
from bunker.repo.leases import sessions
from bunker.repo.moves import PackMoves, make_move_record, parse_move_record
from bunker.repo.records import (
    make_condemnation,
    make_lease,
    make_retirement,
    make_unretirement,
    parse_condemnation,
    parse_lease,
    parse_retirement,
    parse_unretirement,
)
from bunker.repo.repository import Repository
from bunker.storage import wire
from bunker.storage.local import LocalBackend
from helpers import Repo

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEY = SigningKey(b"\x07" * 32)
CERT = "clients/" + "ab" * 32


class BytesStream:
    """A stream over fixed bytes: what a hostile peer sent, then the end of the connection."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, data: bytes | memoryview) -> None:
        pass

    def close(self) -> None:
        pass


def _read_all_frames(data: bytes) -> int:
    s = BytesStream(data)
    n = 0
    while True:
        try:
            length, rid, code, meta_len = wire.read_header(s, 1 << 20, "the peer")
            wire.read_body(s, rid, code, length, meta_len, "the peer")
        except wire.ConnectionClosed:
            return n
        n += 1


def _valid_frames() -> bytes:
    out = b""
    for rid, code, meta, payload in (
        (1, 1, {"name": "packs/" + "a" * 64}, b"x" * 100),
        (2, 3, {"prefix": "index/"}, b""),
    ):
        s = BytesStream(b"")
        chunks: list[bytes] = []
        s.write = chunks.append  # type: ignore[method-assign]
        wire.write_frame(s, rid, code, meta, payload)
        out += b"".join(bytes(c) for c in chunks)
    return out


@SETTINGS
@given(st.binary(max_size=4096))
def test_hello_random(data: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.read_hello(BytesStream(data), "the peer")


@SETTINGS
@given(st.data())
def test_hello_mutated(data: st.DataObject) -> None:
    good = bytearray(wire.encode_hello({"repo": "/srv/r", "create": False, "client": "fuzz"}))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    with contextlib.suppress(wire.ProtocolError):
        wire.read_hello(BytesStream(bytes(good[:cut])), "the peer")


@SETTINGS
@given(st.binary(max_size=8192))
def test_frames_random(data: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        _read_all_frames(data)


@SETTINGS
@given(st.data())
def test_frames_mutated(data: st.DataObject) -> None:
    good = bytearray(_valid_frames())
    assert _read_all_frames(bytes(good)) == 2
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    with contextlib.suppress(wire.ProtocolError):
        _read_all_frames(bytes(good[:cut]))


def _records() -> list[bytes]:
    _, lease = make_lease("a" * 24, 3, "fuzz", "backup", KEY, CERT, {"packset": "refs/" + "c" * 64, "time": 1.0})
    return [
        lease,
        make_retirement("snapshots/" + "d" * 64, "fuzz", KEY, CERT),
        make_unretirement("retired/" + "9" * 64, "snapshots/" + "d" * 64, "fuzz", KEY, CERT),
        make_condemnation(["e" * 64, "f" * 64], KEY, CERT),
        make_move_record({"1" * 64: ["2" * 64, "3" * 64], "4" * 64: []}, KEY, CERT),
    ]


def _parse_any(data: bytes) -> None:
    for parse in (parse_lease, parse_retirement, parse_unretirement, parse_condemnation, parse_move_record):
        with contextlib.suppress(FormatError, ValueError, BunkerError):
            parse(data)


@SETTINGS
@given(st.binary(max_size=4096))
def test_records_random(data: bytes) -> None:
    _parse_any(data)


@SETTINGS
@given(st.data())
def test_records_mutated(data: st.DataObject) -> None:
    good = bytearray(data.draw(st.sampled_from(_records())))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    _parse_any(bytes(good[: data.draw(st.integers(0, len(good)))]))


def test_hostile_sessions_and_gc_records_are_skipped(repo: Repo, tmp_path: Path) -> None:
    """Garbage and records signed by nobody the repository knows, in sessions/ and gc/: the
    lease listing skips what it cannot read, and no forged record condemns anything."""
    backend = LocalBackend(str(repo.path))
    backend.put("sessions/" + "1" * 24 + ".0", os.urandom(300))
    # a name outside sessions/' rule cannot be written through a backend: put there by other means
    (repo.path / "sessions" / ("2" * 24 + ".x")).write_bytes(b"not a counter")
    name, lease = make_lease("3" * 24, 0, "intruder", "backup", KEY, CERT, {"packset": "refs/nonsense"})
    backend.put(name, lease)
    forged = make_condemnation(["a" * 64], KEY, CERT)
    from bunker.repo.objects import name_for

    backend.put(name_for("gc", forged), forged)
    backend.put("gc/" + "0" * 64, os.urandom(200))
    r = Repository.open(backend)
    # readable, but not signed by a certificate of this repository: it is no session, so no
    # prune waits for it and nothing acts on its checkpoint (check names all three)
    problems: list[tuple[str, str]] = []
    assert sessions(r, problems) == []
    assert {n for n, _ in problems} == {"sessions/" + "1" * 24 + ".0", name}
    assert condemnations(r) == []
    # a forged move record neither condemns a pack nor excuses a missing one
    forged_move = make_move_record({"a" * 64: ["b" * 64]}, KEY, CERT)
    backend.put(name_for("gc", forged_move), forged_move)
    assert PackMoves.load(r).sources() == set() and condemned_packs(r) == set()
