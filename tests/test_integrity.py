"""Damage detection: keyless check of every object kind, --read-data inside blobs, and a restore
that goes on past a damaged chunk (promises 3 and 7)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import blake3
import pytest

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.keyfile import load_put_key
from bunker.repo.objects import MAGIC_PACK, content_hash
from bunker.repo.pack import TAIL, TAIL_MAGIC, decrypt_trailer, parse_footer, signed_message, trailer_key
from bunker.repo.records import make_lease
from bunker.storage.local import LocalBackend
from helpers import (
    Repo,
    describe,
    flip_bit,
    init_repo,
    js,
    make_env,
    obj_name,
    rename_to_hash,
    restored_path,
    run_bunker,
)

KINDS = ["config", "clients", "packs", "index", "refs", "snapshots", "sessions"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A repository with two snapshots and a live session lease, to be copied per test."""
    base = tmp_path_factory.mktemp("template")
    repo = init_repo(base)
    src = base / "src"
    src.mkdir()
    rng = random.Random(5)
    (src / "a.bin").write_bytes(rng.randbytes(400_000))
    (src / "b.txt").write_bytes(b"bee\n" * 300)
    repo.backup(src)
    (src / "c.bin").write_bytes(rng.randbytes(50_000))
    repo.backup(src)
    # a lease as a running backup writes it (signed with this client's key)
    put = load_put_key(str(repo.put_key))
    name, data = make_lease(
        "0123456789abcdef01234567", 0, repo.client, "backup", put.client_key, "clients/" + content_hash(put.certificate)
    )
    LocalBackend(str(repo.path)).put(name, data)
    return repo


def _copy(template: Repo, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(template.path, dest)
    return dest


def _keyless(path: Path, expect: str, env: dict[str, str]) -> tuple[int, dict, str]:
    cp = run_bunker("check", "--keyless", "--expect", expect, "--repo", path, "--json", env=env)
    return cp.returncode, js(cp), describe(cp)


def _named(doc: dict, name: str) -> list[dict]:
    """err problems that name object ``name`` (as the object, or in the text for config/)."""
    return [p for p in doc["problems"] if p["severity"] == "err" and (p["object"] == name or name in p["problem"])]


def test_template_is_clean(template: Repo, tmp_path: Path) -> None:
    path = _copy(template, tmp_path)
    rc, doc, text = _keyless(path, template.id, make_env(tmp_path / "e"))
    assert rc == 0, text
    assert doc["ok"] and doc["authenticated"] and doc["problems"] == []
    for k in KINDS:
        assert doc["counts"][k] >= 1, (k, doc["counts"])


def _victim(path: Path, kind: str) -> Path:
    objs = sorted(p for p in (path / kind).iterdir() if not p.name.startswith("."))
    assert objs, f"the template has no {kind} object"
    return objs[0]


@pytest.mark.parametrize(("kind", "where"), [(k, "middle") for k in KINDS] + [("config", "first"), ("config", "last")])
def test_keyless_check_detects_one_flipped_bit(template: Repo, tmp_path: Path, kind: str, where: str) -> None:
    path = _copy(template, tmp_path)
    victim = _victim(path, kind)
    flip_bit(victim, {"first": 0, "middle": None, "last": -1}[where], bit=3)
    rc, doc, text = _keyless(path, template.id, make_env(tmp_path / "e"))
    assert rc == 14, text
    assert doc["ok"] is False
    assert _named(doc, obj_name(victim)), text


@pytest.mark.parametrize("where", ["first", "last"])
def test_keyless_check_names_every_damaged_object(template: Repo, tmp_path: Path, where: str) -> None:
    """The first or last byte (magic, tail, signature) of one object of every kind but config,
    all in one copy: the check goes on past each and names every one."""
    path = _copy(template, tmp_path)
    victims = [_victim(path, k) for k in KINDS if k != "config"]
    for v in victims:
        flip_bit(v, 0 if where == "first" else -1, bit=0)
    rc, doc, text = _keyless(path, template.id, make_env(tmp_path / "e"))
    assert rc == 14, text
    missed = [obj_name(v) for v in victims if not _named(doc, obj_name(v))]
    assert not missed, text


def _data_pack_and_blob(repo_path: Path, put_key: Path) -> tuple[Path, object, object]:
    """The data pack of the repository with its footer and its largest blob entry."""
    put = load_put_key(str(put_key))
    for p in sorted((repo_path / "packs").iterdir(), key=lambda p: -p.stat().st_size):
        data = p.read_bytes()
        footer = parse_footer(data, len(data))
        trailer = decrypt_trailer(footer, put.secrets)
        if trailer.kind == "data":
            return p, footer, max(trailer.blobs, key=lambda b: b.length)
    raise AssertionError("no data pack")


def test_read_data_detects_flipped_bit_in_blob_of_renamed_pack(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(300_000))
    repo.backup(src)
    assert js(repo.ok("check", "--read-data", "--json"))["ok"] is True

    pack, _, blob = _data_pack_and_blob(repo.path, repo.put_key)
    flip_bit(pack, blob.offset + blob.length // 2)
    new = rename_to_hash(pack)  # a "valid" object again: its name is the hash of its bytes

    cp = repo.run("check", "--read-data", "--json")
    assert cp.returncode == 14, describe(cp)
    doc = js(cp)
    assert doc["mode"] == "read-data"
    assert _named(doc, obj_name(new)), describe(cp)


def test_read_data_detects_damaged_blob_in_resigned_pack(repo: Repo, tmp_path: Path) -> None:
    """A pack whose blob is damaged but whose body hash, trailer and writer signature were all
    made again (as a put-key holder could): only decrypting the blob shows the damage."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(300_000))
    repo.backup(src)
    put = load_put_key(str(repo.put_key))
    pack, footer, blob = _data_pack_and_blob(repo.path, repo.put_key)
    data = pack.read_bytes()
    body = bytearray(data[: footer.body_length])
    body[blob.offset + blob.length // 2] ^= 0x10
    body_hash = blake3.blake3(bytes(body)).digest()
    plain = aead.decrypt(trailer_key(put.secrets, footer.salt), footer.trailer_ct, footer.body_hash)
    trailer_ct = aead.encrypt(trailer_key(put.secrets, footer.salt), plain, body_hash)
    sig = put.client_key.sign(MAGIC_PACK, signed_message(body_hash, footer.salt, trailer_ct))
    fbytes = encoding.pack(
        {"body_hash": body_hash, "salt": footer.salt, "trailer": trailer_ct, "signer": footer.signer, "sig": sig}
    )
    forged = bytes(body) + fbytes + TAIL.pack(len(fbytes), TAIL_MAGIC)
    pack.unlink()
    new = repo.path / "packs" / blake3.blake3(forged).hexdigest()
    new.write_bytes(forged)

    # keyless: the new pack itself is a valid, signed object (only the old name is missed)
    rc, doc, text = _keyless(repo.path, repo.id, repo.env)
    assert not _named(doc, obj_name(new)), text
    # read-data decrypts the blob and finds the damage in that pack
    cp = repo.run("check", "--read-data", "--json")
    assert cp.returncode == 14, describe(cp)
    hits = _named(js(cp), obj_name(new))
    assert hits and any("chunk" in p["problem"] for p in hits), describe(cp)


def test_restore_goes_on_past_a_damaged_chunk(repo: Repo, tmp_path: Path) -> None:
    rng = random.Random(9)
    src = tmp_path / "src"
    src.mkdir()
    damaged = rng.randbytes(300_000)
    (src / "a.bin").write_bytes(damaged)
    repo.backup(src)
    packs_first = {p.name: p.stat().st_size for p in repo.objects("packs")}
    # more files in a second snapshot: their data lands in other packs, a.bin dedups
    (src / "b.bin").write_bytes(rng.randbytes(200_000))
    (src / "c.txt").write_bytes(b"see\n" * 100)
    (src / "d").mkdir()
    (src / "d" / "e.bin").write_bytes(rng.randbytes(70_000))
    (src / "empty").write_bytes(b"")
    doc = repo.backup(src)
    assert doc["stats"]["files_unchanged"] == 1

    # the first run's data pack holds a.bin's data and nothing else
    data_pack = max(packs_first, key=lambda n: packs_first[n])
    flip_bit(repo.path / "packs" / data_pack)

    target = tmp_path / "t"
    cp = repo.run("restore", "latest", "--target", target, "--json")
    assert cp.returncode == 3, describe(cp)
    rdoc = js(cp)
    assert rdoc["level"] == "err"
    assert rdoc["stats"]["failed"] == 1
    errs = [e for e in rdoc["events"] if e["level"] == "err"]
    assert [e["path"] for e in errs] == [str(restored_path(target, src / "a.bin"))], errs
    out = restored_path(target, src)
    for rel in ("b.bin", "c.txt", "d/e.bin", "empty"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    # the damaged file is there with its damaged range left as a hole, and is reported as such
    assert (out / "a.bin").stat().st_size == len(damaged)
    assert (out / "a.bin").read_bytes() != damaged

    cp = repo.run("restore", "latest", "--target", tmp_path / "t2")
    assert cp.returncode == 3
    assert "a.bin" in cp.stderr and "1 items could not be restored" in cp.stdout


def test_chunks_no_index_entry_locates_are_named_per_snapshot(template: Repo, tmp_path: Path) -> None:
    """A put-key check reads each snapshot's chunk set (part by part) and names the chunks no
    agreeing index entry places in the snapshot's packs: with every index object gone, all of
    them, with the count the healthy check reports."""
    path = _copy(template, tmp_path)
    healthy = js(run_bunker("check", "--json", "--repo", path, env=template.env))
    assert healthy["ok"] and healthy["counts"]["snapshot_chunks"] > 0, healthy
    for p in (path / "index").iterdir():
        if not p.name.startswith("."):
            p.unlink()
    cp = run_bunker("check", "--json", "--repo", path, env=template.env)
    doc = js(cp)
    lost = [p for p in doc["problems"] if "chunks are not indexed in its packs" in p["problem"]]
    assert len(lost) == 2 and all(p["severity"] == "err" for p in lost), describe(cp)
    counts = sorted(int(p["problem"].split(" of its ")[0]) for p in lost)
    totals = sorted(int(p["problem"].split(" of its ")[1].split()[0]) for p in lost)
    assert counts == totals and sum(totals) == healthy["counts"]["snapshot_chunks"] == doc["counts"]["snapshot_chunks"]
    assert all("bunker index rebuild" in p["problem"] for p in lost)


def test_unchanged_snapshots_sharing_their_chunk_set_are_each_checked(repo: Repo, tmp_path: Path) -> None:
    """Backups of an unchanged source share their chunk set's parts and pack set, which check
    looks up once: each snapshot still counts all its chunks and is named when they are lost."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(random.Random(i).randbytes(3000 + i))
    for _ in range(3):
        repo.backup(src)
    healthy = js(repo.ok("check", "--json"))
    per = healthy["counts"]["snapshot_chunks"] // 3  # the files' chunks and the trees'
    assert healthy["ok"] and per > 40 and healthy["counts"]["snapshot_chunks"] == 3 * per, healthy["counts"]
    for p in (repo.path / "index").iterdir():
        if not p.name.startswith("."):
            p.unlink()
    doc = js(repo.run("check", "--json"))
    lost = [p for p in doc["problems"] if "chunks are not indexed in its packs" in p["problem"]]
    assert sorted(p["object"] for p in lost) == sorted(f"snapshots/{p.name}" for p in repo.objects("snapshots"))
    assert all(p["problem"].startswith(f"{per} of its {per} chunks") for p in lost), lost


def test_index_entries_that_disagree_with_their_packs_are_named_and_the_rest_agree(
    template: Repo, tmp_path: Path
) -> None:
    """The index check compares every entry with its pack's trailer: an entry with another
    offset, and one that places a chunk in a pack that does not exist, are named with the index
    object that holds them; the entries that agree still place their chunks (no snapshot loses
    any)."""
    from bunker.repo.index import Location, decrypt_index, make_index, parse_index_frame
    from bunker.repo.repository import Repository

    path = _copy(template, tmp_path)
    healthy = js(run_bunker("check", "--json", "--repo", path, env=template.env))
    r = Repository.open(LocalBackend(str(path)))
    put = load_put_key(str(template.put_key))
    cert = r.check_put_key(put)
    entries = []
    for p in sorted((path / "index").iterdir()):
        if not p.name.startswith("."):
            entries += list(decrypt_index(parse_index_frame(p.read_bytes()), put.secrets))
    (moved_cid, moved), (lost_cid, lost) = entries[0], entries[-1]
    nowhere = "ab" * 32
    wrong = [(moved_cid, Location(moved.pack, moved.offset + 1, moved.length, moved.raw_length))]
    wrong.append((lost_cid, Location(nowhere, lost.offset, lost.length, lost.raw_length)))
    name = r.put_object("index", make_index(wrong + entries[1:-1], put.secrets, put.client_key, cert.name))
    cp = run_bunker("check", "--json", "--repo", path, env=template.env)
    doc = js(cp)
    found = sorted(p["problem"] for p in doc["problems"] if p["object"] == name)
    assert found == [
        f"entry for chunk {moved_cid.hex()[:16]} disagrees with pack {moved.pack[:16]}…",
        f"points chunk {lost_cid.hex()[:16]} to pack {nowhere[:16]}… which is missing or unreadable",
    ], describe(cp)
    # the other index objects still place those two chunks: the snapshots lose nothing
    assert [p for p in doc["problems"] if p["object"] != name] == [], describe(cp)
    assert doc["counts"]["index_entries"] == healthy["counts"]["index_entries"] + len(entries)
