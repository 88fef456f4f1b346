"""Small restored files are written by worker processes: the main process locates a batch's
chunks all at once, finds each blob in its pack's trailer and opens the packs' key groups; the
worker unwraps each blob's key. A file with a chunk the index places in a pack that does not hold
it is resolved by the main process, written with the damaged range left as a hole and reported;
a file whose blob key does not unwrap in the worker goes back to the main process (RETRY)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from bunker.crypto.keyfile import load_master_key, load_put_key
from bunker.fs import deep_path
from bunker.repo import blob
from bunker.repo.blob_reader import BlobReader
from bunker.repo.index import Location, make_index
from bunker.repo.index_cache import IndexCache
from bunker.repo.repository import Repository
from bunker.restore import workers
from bunker.restore.file_writer import WriteResult
from bunker.restore.restorer import SMALL_POOL_AFTER
from bunker.storage.local import LocalBackend
from helpers import PASSPHRASE, Repo, describe, js, processes_started, restored_path

COUNT = SMALL_POOL_AFTER + 300  # the last ones are written by the worker processes


def test_a_chunk_the_index_places_in_the_wrong_pack_leaves_one_hole(repo: Repo, tmp_path: Path) -> None:
    rng = random.Random(14)
    src = tmp_path / "src"
    src.mkdir()
    contents = {f"f{i:05d}": rng.randbytes(rng.randrange(100, 3000)) for i in range(COUNT)}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    repo.backup(src)

    # rewrite the index so that it places one late file's only chunk in another pack
    victim = f"f{COUNT - 40:05d}"
    r = Repository.open(LocalBackend(str(repo.path)))
    put = load_put_key(str(repo.put_key))
    cert = r.check_put_key(put)
    index = IndexCache(r, put.secrets, None, for_dedup=False).load()
    cid = blob.chunk_id(put.secrets, contents[victim])
    right = index.locations[cid]
    other = next(p for p in index.locations.packs() if p != right.pack)
    entries = [(c, index.locations[c]) for c in index.locations]
    entries = [(c, Location(other, *loc[1:]) if c == cid else loc) for c, loc in entries]
    for p in repo.objects("index"):
        p.unlink()
    r.put_object("index", make_index(entries, put.secrets, put.client_key, cert.name))

    target = tmp_path / "t"
    cp = repo.run("restore", "latest", "--target", target, "--json")
    assert cp.returncode == 3, describe(cp)
    doc = js(cp)
    assert doc["stats"]["files"] == COUNT - 1 and doc["stats"]["failed"] == 1, doc["stats"]
    errs = [e for e in doc["events"] if e["level"] == "err"]
    out = restored_path(target, src)
    assert [e["path"] for e in errs] == [str(out / victim)], errs
    assert "does not hold chunk" in errs[0]["message"] and errs[0]["code"] == "file-damaged", errs
    assert (out / victim).read_bytes() == bytes(len(contents[victim]))  # its length, as a hole
    for name, data in contents.items():
        if name != victim:
            assert (out / name).read_bytes() == data, name
    assert not [n for n in os.listdir(out) if n.startswith(".bunker-part-")]


def test_a_blob_key_that_does_not_unwrap_in_the_worker_sends_the_file_back(repo: Repo, tmp_path: Path) -> None:
    """The worker's side, in this process: located pieces are written with the key groups the
    main process opened; with a wrong key group the file is not written and comes back as RETRY."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(5000)
    (src / "one").write_bytes(data)
    repo.backup(src)
    r = Repository.open(LocalBackend(str(repo.path)))
    put = load_put_key(str(repo.put_key))
    master = load_master_key(str(repo.master_key), PASSPHRASE)
    index = IndexCache(r, put.secrets, None, for_dedup=False).load()
    reader = BlobReader(r, master.data_private, put.secrets, index.locations)
    cid = blob.chunk_id(put.secrets, data)
    pack = index.locations[cid].pack
    op = reader.open_pack(pack)
    entry = op.get(cid)
    assert entry is not None
    piece = (pack, *entry)
    target = tmp_path / "t"
    target.mkdir()
    ident = deep_path.confine(bytes(target))
    try:
        workers._init(str(repo.path), put.secrets.secret, False, False, bytes(target), ident)
        meta = {"n": b"one", "t": "f", "m": 0o640, "sz": len(data)}
        wrong = {pack: [os.urandom(32) for _ in op.group_keys]}
        assert workers.write_batch(wrong, [(bytes(target / "one"), [piece], meta, True)]) == (
            0,
            0,
            [(0, WriteResult(workers.RETRY, 0))],
        )
        assert os.listdir(target) == []  # nothing written, not even a temporary file
        right = {pack: [c.key for c in op.group_keys]}
        assert workers.write_batch(right, [(bytes(target / "one"), [piece], meta, True)]) == (1, len(data), [])
        assert (target / "one").read_bytes() == data and (target / "one").stat().st_mode & 0o777 == 0o640
    finally:
        deep_path.release(bytes(target))


def test_a_restore_starts_worker_processes_only_for_a_snapshot_that_needs_them(repo: Repo, tmp_path: Path) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for i in range(20):
        (few / f"f{i}").write_bytes(os.urandom(1000))
    repo.backup(few)
    # 20 chunks: the workers would never run
    assert processes_started(repo, "restore", "latest", "--target", tmp_path / "t1") == 0

    many = tmp_path / "many"
    many.mkdir()
    for i in range(COUNT):
        (many / f"f{i:05d}").write_bytes(os.urandom(100))
    repo.backup(many)
    # the forkserver, the resource tracker and the workers
    assert processes_started(repo, "restore", "latest", "--target", tmp_path / "t2") >= 3
    assert len(list((restored_path(tmp_path / "t2", many)).iterdir())) == COUNT
