"""Parser fuzzing: every decoder of untrusted bytes raises only the documented errors
(FormatError, a ValueError, or a BunkerError subclass) on random bytes, on byte-level mutations of
real objects, and on structural mutations (fields replaced or removed, then re-encoded and, where
the object is self-verifying, re-signed) -- never any other exception (docs/format.md section 18).

Failing inputs found while writing these tests are kept as explicit @example regressions."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.keyfile import (
    MASTER_LABEL,
    PUT_LABEL,
    MasterKey,
    _armor,
    _kek,
    load_master_key,
    load_put_key,
    read_master_repo_id,
)
from bunker.crypto.sign import SigningKey, fingerprint
from bunker.encoding import FormatError
from bunker.errors import BunkerError
from bunker.repo.config import parse_config
from bunker.repo.index import parse_index_frame
from bunker.repo.objects import MAGIC_CONFIG, MAGIC_INDEX
from bunker.repo.pack import TAIL, TAIL_MAGIC, parse_footer
from bunker.repo.refs import parse_refs
from bunker.repo.snapshot import parse_snapshot
from bunker.repo.tree import decode_tree, encode_tree
from helpers import init_repo

ALLOWED = (FormatError, BunkerError)
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
PASS = "fuzz passphrase"
CHEAP_KDF = {"t": 1, "m": 8, "p": 1}


def survives(fn: Any, *args: Any) -> None:
    """Call a parser; only the documented errors may come out."""
    with contextlib.suppress(*ALLOWED):
        fn(*args)


# ------------------------------------------------------------------------------------ samples


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real objects of one repository (made by the real CLI), one per kind."""
    base = tmp_path_factory.mktemp("fuzz")
    repo = init_repo(base)
    src = base / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"hello\n" * 100)
    (src / "b.bin").write_bytes(random.Random(1).randbytes(20_000))
    repo.backup(src)

    def first(prefix: str) -> bytes:
        return repo.objects(prefix)[0].read_bytes()

    refs = [p.read_bytes() for p in repo.objects("refs")]
    pack = min(repo.objects("packs"), key=lambda p: p.stat().st_size).read_bytes()
    flen = TAIL.unpack(pack[-TAIL.size :])[0]
    return {
        "config": first("config"),
        "snapshot": first("snapshots"),
        "index": first("index"),
        "refs": refs,
        "pack_tail": pack[-(flen + TAIL.size + 64) :],
        "pack_size": len(pack),
        "put_text": repo.put_key.read_text(),
        "master_text": repo.master_key.read_text(),
        "repo_id": repo.id,
        "tmp": base,
    }


# ------------------------------------------------------------------------------------ strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


@st.composite
def byte_mutation(draw: st.DrawFn, base: bytes) -> bytes:
    """Flip bits, overwrite, truncate, insert, delete or splice a few places of ``base``."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "splice"]))
        n = len(data)
        if n == 0:
            data += draw(st.binary(min_size=1, max_size=16))
            continue
        i = draw(st.integers(0, n - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xD9, 0xDB, 0xDD, 0xDF]))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        else:
            j = draw(st.integers(i, n))
            data[i:j] = draw(st.binary(max_size=32))
    return bytes(data)


def _paths(v: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(v, dict):
        for k in v:
            out += _paths(v[k], (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    return out


@st.composite
def struct_mutation(draw: st.DrawFn, base: Any) -> Any:
    """Replace, remove or add one field anywhere in a decoded structure."""
    v = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 2))):
        paths = _paths(v)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if op == "replace":
                v = draw(values)
            continue
        parent = v
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "replace":
            parent[key] = draw(values)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(values)
        else:
            parent.insert(key, draw(values))
    return v


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def _pack(v: Any) -> bytes:
    try:
        return encoding.pack(v)
    except (TypeError, ValueError, OverflowError):  # e.g. mixed-type map keys cannot be sorted
        return msgpack.packb(v, use_bin_type=True)


# ------------------------------------------------------------------------------------ pack footer


@FUZZ
@given(data=st.binary(max_size=400), size=st.integers(0, 1 << 40))
@example(data=b"", size=0)
@example(data=TAIL.pack(0, TAIL_MAGIC), size=8)
@example(data=TAIL.pack(2**32 - 1, TAIL_MAGIC), size=2**40)
def test_parse_footer_random(data: bytes, size: int) -> None:
    survives(parse_footer, data, max(size, len(data)))
    survives(parse_footer, data, size)


@FUZZ
@given(st.data())
def test_parse_footer_mutated(samples: dict, data: st.DataObject) -> None:
    tail = data.draw(byte_mutation(samples["pack_tail"]))
    survives(parse_footer, tail, samples["pack_size"])
    # a structurally mutated footer with a correct length field
    raw = samples["pack_tail"]
    flen = TAIL.unpack(raw[-TAIL.size :])[0]
    footer = _unpack(raw[-(flen + TAIL.size) : -TAIL.size])
    mutated = _pack(data.draw(struct_mutation(footer)))
    survives(parse_footer, mutated + TAIL.pack(len(mutated), TAIL_MAGIC), len(mutated) + TAIL.size + 100)


# ------------------------------------------------------------------------------------ snapshots


@FUZZ
@given(data=st.binary(max_size=2000))
@example(data=b"BKSN")
@example(data=b"BKSN\xc1")
@example(data=b"BKSN" + b"\xdf\xff\xff\xff\xff")
def test_parse_snapshot_random(data: bytes) -> None:
    survives(parse_snapshot, data)
    survives(parse_snapshot, b"BKSN" + data)


@FUZZ
@given(st.data())
def test_parse_snapshot_mutated(samples: dict, data: st.DataObject) -> None:
    base = samples["snapshot"]
    survives(parse_snapshot, data.draw(byte_mutation(base)))
    outer = _unpack(base[4:])
    if data.draw(st.booleans()):
        env = _unpack(outer["env"])
        outer["env"] = _pack(data.draw(struct_mutation(env)))
    else:
        outer = data.draw(struct_mutation(outer))
    survives(parse_snapshot, b"BKSN" + _pack(outer))


# ------------------------------------------------------------------------------------ trees

_TREE = [
    {
        "n": b"file",
        "t": "f",
        "m": 0o644,
        "u": 0,
        "g": 0,
        "U": "root",
        "G": "root",
        "mt": 1,
        "ct": 2,
        "sz": 3,
        "c": [b"\x01" * 32],
    },
    {"n": b"dir", "t": "d", "m": 0o755, "mt": 5, "st": b"\x02" * 32},
    {"n": b"\xff\xfelink", "t": "l", "lt": b"target", "mt": 7},
    {"n": b"fifo", "t": "p", "m": 0o600},
]


@FUZZ
@given(data=st.binary(max_size=1000))
@example(data=b"")
@example(data=b"\x82\xa1v\x01\xa1e\x91\x80")  # {"v": 1, "e": [{}]}
def test_decode_tree_random(data: bytes) -> None:
    survives(decode_tree, data)


@FUZZ
@given(st.data())
def test_decode_tree_mutated(data: st.DataObject) -> None:
    base = encode_tree(copy.deepcopy(_TREE))
    assert len(decode_tree(base)) == len(_TREE)
    survives(decode_tree, data.draw(byte_mutation(base)))
    survives(decode_tree, _pack(data.draw(struct_mutation(_unpack(base)))))


# ------------------------------------------------------------------------------------ config


@FUZZ
@given(data=st.binary(max_size=2000))
@example(data=b"BKCF")
@example(data=b"BKCF\x83\xa4body\xc4\x00\xa6signer\xa0\xa3sig\xc4@" + b"\x00" * 64)
def test_parse_config_random(data: bytes) -> None:
    survives(parse_config, data)
    survives(parse_config, b"BKCF" + data)


def _signed_config(body: Any, key: SigningKey) -> bytes:
    body_bytes = _pack(body)
    return MAGIC_CONFIG + encoding.pack({"body": body_bytes, "signer": "", "sig": key.sign(MAGIC_CONFIG, body_bytes)})


@FUZZ
@given(st.data())
def test_parse_config_mutated(samples: dict, data: st.DataObject) -> None:
    base = samples["config"]
    survives(parse_config, data.draw(byte_mutation(base)))
    # a config is self-verifying (it carries its master verify key): a hostile one can be signed
    # correctly with any key and still be malformed inside
    key = SigningKey(data.draw(st.binary(min_size=32, max_size=32)))
    body = _hostile_config_body(samples, key)
    assert parse_config(_signed_config(body, key)).repo_id == body["repo"]
    survives(parse_config, _signed_config(data.draw(struct_mutation(body)), key))


def _hostile_config_body(samples: dict, key: SigningKey) -> dict[str, Any]:
    body = _unpack(_unpack(samples["config"][4:])["body"])
    body["master_verify"] = key.public_bytes
    body["repo"] = fingerprint(key.public_bytes)
    return body


@pytest.mark.parametrize(
    "change",
    [
        {"chunker": None},  # found by the fuzzer: KeyError / TypeError escaped parse_config
        {"packs": None},
        {"chunker": {"min": 1 << 18, "avg": None, "max": 4 << 20}},
        {"chunker": {"min": "64", "avg": 1 << 19, "max": 4 << 20}},
        {"chunker": [1, 2, 3]},
        {"packs": {"target": [16 << 20], "flush_seconds": 10}},
        {"packs": {"target": 16 << 20, "flush_seconds": "ten"}},
        {"revoked": [["clients/x", "1"]]},
        {"revoked": "none"},
        {"data_mlkem": b"short"},
        {"created": None},
        {"version": 1.5},
    ],
)
def test_parse_config_hostile_signed_regressions(samples: dict, change: dict) -> None:
    """Configs signed correctly by some key but malformed inside (None means: field removed)."""
    key = SigningKey(b"\x07" * 32)
    body = _hostile_config_body(samples, key)
    for k, v in change.items():
        if v is None:
            del body[k]
        else:
            body[k] = v
    with pytest.raises(FormatError):
        parse_config(_signed_config(body, key))


# ------------------------------------------------------------------------------------ refs


@FUZZ
@given(data=st.binary(max_size=1000))
@example(data=b"BKRF")
@example(data=b"BKRF\x81\xa4kind\x91\x01")  # an unhashable kind
def test_parse_refs_random(data: bytes) -> None:
    survives(parse_refs, data)
    survives(parse_refs, b"BKRF" + data)


@FUZZ
@given(st.data())
def test_parse_refs_mutated(samples: dict, data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(samples["refs"]))
    survives(parse_refs, data.draw(byte_mutation(base)))
    survives(parse_refs, b"BKRF" + _pack(data.draw(struct_mutation(_unpack(base[4:])))))


# ------------------------------------------------------------------------------------ index


@FUZZ
@given(data=st.binary(max_size=1000))
@example(data=b"BKIX")
def test_parse_index_frame_random(data: bytes) -> None:
    survives(parse_index_frame, data)
    survives(parse_index_frame, b"BKIX" + data)


@FUZZ
@given(st.data())
def test_parse_index_frame_mutated(samples: dict, data: st.DataObject) -> None:
    base = samples["index"]
    survives(parse_index_frame, data.draw(byte_mutation(base)))
    outer = _unpack(base[4:])
    if data.draw(st.booleans()):
        outer["body"] = _pack(data.draw(struct_mutation(_unpack(outer["body"]))))
    else:
        outer = data.draw(struct_mutation(outer))
    survives(parse_index_frame, MAGIC_INDEX + _pack(outer))


# ------------------------------------------------------------------------------------ key files


def _write(tmp: Path, text: str | bytes) -> str:
    d = tmp / "keys"
    d.mkdir(exist_ok=True)
    p = d / f"k{os.getpid()}-{random.random()}"
    if isinstance(text, str):
        p.write_text(text, encoding="latin-1", errors="replace")
    else:
        p.write_bytes(text)
    return str(p)


def _load_all(path: str) -> None:
    survives(load_put_key, path)
    survives(read_master_repo_id, path)
    survives(load_master_key, path, PASS)
    os.unlink(path)


def _cheap_master_payload(samples: dict, seed: bytes) -> dict[str, Any]:
    """A master key payload as the key file holds it, with a cheap KDF so fuzzing stays fast."""
    salt = b"saltsalt" * 2
    kek = _kek(PASS, salt, **CHEAP_KDF)
    repo = MasterKey(seed).repo_id if len(seed) == 32 else samples["repo_id"]
    box = aead.encrypt(kek, seed, b"bunker master key v1\x00" + repo.encode())
    return {"v": 1, "kind": "master", "repo": repo, "kdf": {"alg": "argon2id", "salt": salt, **CHEAP_KDF}, "box": box}


def _payload(text: str, label: str) -> dict[str, Any]:
    import base64

    body = text.split(f"-----BEGIN {label}-----", 1)[1].split(f"-----END {label}-----", 1)[0]
    return _unpack(base64.b64decode("".join(body.split())))


@FUZZ
@given(data=st.binary(max_size=600))
@example(data=b"-----BEGIN BUNKER PUT KEY-----\n-----END BUNKER PUT KEY-----\n")
@example(data=b"-----END BUNKER MASTER KEY-----\n-----BEGIN BUNKER MASTER KEY-----\n")
def test_keyfile_loaders_random(samples: dict, data: bytes) -> None:
    _load_all(_write(samples["tmp"], data))
    for label in (PUT_LABEL, MASTER_LABEL):
        framed = f"-----BEGIN {label}-----\n".encode() + data + f"\n-----END {label}-----\n".encode()
        _load_all(_write(samples["tmp"], framed))


@FUZZ
@given(st.data())
def test_keyfile_loaders_mutated(samples: dict, data: st.DataObject) -> None:
    tmp = samples["tmp"]
    text = data.draw(st.sampled_from([samples["put_text"], samples["master_text"]]))
    mutated = data.draw(byte_mutation(text.encode()))
    survives(load_put_key, _write(tmp, mutated))
    survives(read_master_repo_id, _write(tmp, mutated))
    # structural: payload fields replaced or removed, armored again
    put = _payload(samples["put_text"], PUT_LABEL)
    _load_all(_write(tmp, _armor(PUT_LABEL, ["fuzz"], data.draw(struct_mutation(put)))))


@FUZZ
@given(st.data())
def test_master_key_loader_mutated(samples: dict, data: st.DataObject) -> None:
    tmp = samples["tmp"]
    seed = data.draw(st.binary(min_size=32, max_size=32))
    payload = _cheap_master_payload(samples, seed)
    path = _write(tmp, _armor(MASTER_LABEL, ["fuzz"], payload))
    assert load_master_key(path, PASS).seed == seed  # the unmutated cheap key opens
    survives(load_master_key, _write(tmp, _armor(MASTER_LABEL, ["fuzz"], data.draw(struct_mutation(payload)))), PASS)
    # a box that opens with the passphrase but holds something else than a 32-byte seed
    seed = data.draw(st.binary(max_size=64))
    survives(load_master_key, _write(tmp, _armor(MASTER_LABEL, ["fuzz"], _cheap_master_payload(samples, seed))), PASS)


@pytest.mark.parametrize(
    "kdf_change",
    [
        {"salt": b""},  # too short a salt for Argon2id
        {"salt": b"short"},
        {"p": 4, "m": 8},  # memory cost below 8 * lanes
        {"salt": "text, not bytes"},
        {"t": "3"},
        {"alg": "scrypt"},
        {"m": 8 << 30},
    ],
)
def test_master_key_loader_bad_kdf_regressions(samples: dict, kdf_change: dict) -> None:
    payload = _cheap_master_payload(samples, os.urandom(32))
    payload["kdf"].update(kdf_change)
    path = _write(samples["tmp"], _armor(MASTER_LABEL, ["fuzz"], payload))
    with pytest.raises(ALLOWED):
        load_master_key(path, PASS)


@pytest.mark.parametrize("seed", [b"", b"\x00" * 31, b"\x00" * 33, b"\x01" * 64])
def test_master_key_loader_wrong_seed_length_regressions(samples: dict, seed: bytes) -> None:
    path = _write(samples["tmp"], _armor(MASTER_LABEL, ["fuzz"], _cheap_master_payload(samples, seed)))
    with pytest.raises(ALLOWED):
        load_master_key(path, PASS)


def test_cleanup_fuzz_keys(samples: dict) -> None:
    shutil.rmtree(samples["tmp"] / "keys", ignore_errors=True)
