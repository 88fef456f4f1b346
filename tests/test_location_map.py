"""LocationMap: the compact chunk id -> Location map behaves as a dict where the first location
added for a chunk wins, whichever way entries come in (one by one, as column batches) and
however often its arrays are rebuilt, also while other threads read it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from array import array
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.repo import chunk_id_set, location_map, refs
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.index_cache import CachedIndex, _decode_cached, _encode_cached
from bunker.repo.location_map import Location, LocationColumns, LocationMap
from helpers import Repo

PACKS = [f"{i:064x}" for i in range(5)]


def _loc(i: int) -> Location:
    return Location(PACKS[i % len(PACKS)], i * 7, 100 + i, 200 + i)


ids = st.sampled_from([bytes([i]) * 32 for i in range(40)] + [bytes([i]) + bytes(31) for i in range(3)])
batch = st.lists(st.tuples(ids, st.integers(0, 10**6)), max_size=30)
step = st.tuples(st.sampled_from(["one", "many", "columns", "pack"]), batch)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=12), st.integers(1, 8))
def test_behaves_as_a_dict_where_the_first_location_wins(
    steps: list[tuple[str, list[tuple[bytes, int]]]], fold_at: int
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(location_map, "_FOLD_AT", fold_at)  # rebuild the arrays often
        _compare_with_a_dict(steps)


def _compare_with_a_dict(steps: list[tuple[str, list[tuple[bytes, int]]]]) -> None:
    m = LocationMap()
    model: dict[bytes, Location] = {}
    for how, entries in steps:
        pairs = [(cid, _loc(i)) for cid, i in entries]
        if how == "pack":  # the blobs of one pack, as a backup adds the packs it uploads
            pack = PACKS[len(entries) % len(PACKS)]
            pairs = [(cid, loc._replace(pack=pack)) for cid, loc in pairs]
            m.add_pack(pack, [(cid, loc.offset, loc.length, loc.raw_length) for cid, loc in pairs])
        elif how == "one":
            for cid, loc in pairs:
                m.add(cid, loc)
        elif how == "many":
            m.update(pairs)
        else:
            batch = [LocationColumns.from_entries(pairs)]
            m.bulk_load(batch, lambda b=batch: b)  # two passes into an empty map, else added
        for cid, loc in pairs:
            model.setdefault(cid, loc)
        assert len(m) == len(model)
    assert sorted(m) == sorted(model)
    assert {cid: m[cid] for cid in m} == model
    absent = [bytes([200 + i]) * 32 for i in range(3)]
    for cid in absent:
        assert cid not in m and m.get(cid) is None
        with pytest.raises(KeyError):
            m[cid]
    query = list(model) + absent
    for q in (query, query * 30):  # below and above the size where lookups go vectorized
        packs, missing = m.locate_many(q)
        assert packs == {loc.pack for loc in model.values()}
        assert sorted(set(missing)) == sorted(absent) and len(missing) == len(absent) * (len(q) // len(query))
        assert m.missing(q) == missing
    assert m.packs() == {loc.pack for loc in model.values()}


@settings(max_examples=100, deadline=None)
@given(st.lists(batch, max_size=8), st.lists(step, max_size=4), st.integers(1, 60))
def test_a_two_pass_load_is_the_same_map(
    batches: list[list[tuple[bytes, int]]], later: list[tuple[str, list[tuple[bytes, int]]]], fold_at: int
) -> None:
    """Loading batches in two passes (first to sort, then to place) gives the map that adding
    them one by one gives, later copies of an id included, also after more entries are added
    and folded in; so does a load that stays below the size where arrays are built (``fold_at``
    entries), which only adds them."""
    cols = [LocationColumns.from_entries([(cid, _loc(i)) for cid, i in b]) for b in batches]
    m, model = LocationMap(), LocationMap()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(location_map, "_FOLD_AT", fold_at)
        m.bulk_load(iter(cols), lambda: iter(cols))
    if sum(len(c) for c in cols) >= fold_at:
        assert m._arrays.n and not m._new
    for c in cols:
        model.update(c.entries())
    assert len(m) == len(model) and sorted(m) == sorted(model)
    assert {cid: m[cid] for cid in model} == {cid: model[cid] for cid in model}
    assert m.packs() == model.packs()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(location_map, "_FOLD_AT", 2)
        for _, entries in later:
            pairs = [(cid, _loc(i + 7)) for cid, i in entries]
            m.update(pairs)
            model.update(pairs)
        assert len(m) == len(model) and {cid: m[cid] for cid in m} == {cid: model[cid] for cid in model}


def test_a_two_pass_load_refuses_a_second_pass_that_differs() -> None:
    one = LocationColumns.from_entries([(os.urandom(32), _loc(i)) for i in range(10)])
    two = LocationColumns.from_entries([(os.urandom(32), _loc(i)) for i in range(9)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(location_map, "_FOLD_AT", 5)  # so that 10 entries are placed in two passes
        with pytest.raises(encoding.FormatError):
            LocationMap().bulk_load(iter([one]), lambda: iter([two]))
        with pytest.raises(encoding.FormatError):
            LocationMap().bulk_load(iter([one]), lambda: iter([one, one]))
    m = LocationMap()
    m.add(os.urandom(32), _loc(1))
    m.bulk_load(iter([one]), lambda: iter([two]))  # not empty: one pass, the second never read
    assert len(m) == 11


def test_a_million_random_ids_in_under_64_bytes_each() -> None:
    """The point of the map: 1 M chunks at under 64 B each, every one found, no false hits."""
    n = 1_000_000
    raw = os.urandom(32 * n)
    cols = np.stack([np.arange(n, dtype=np.uint64), np.full(n, 4000, np.uint64), np.full(n, 9000, np.uint64)], 1)
    m = LocationMap()
    step = 100_000
    batches = [
        LocationColumns(
            raw[32 * i : 32 * (i + step)],
            PACKS * 100,
            array("I", ((np.arange(i, i + step, dtype=np.uint32) // 2000) % 500).tobytes()),
            array("Q", cols[i : i + step].tobytes()),
        )
        for i in range(0, n, step)  # as index objects come in
    ]
    m.bulk_load(iter(batches), lambda: iter(batches))
    assert len(m) == n
    assert m.nbytes() / n < 64, m.nbytes() / n
    sample = [raw[32 * i : 32 * i + 32] for i in range(0, n, 997)]
    assert m.missing(sample) == [] and all(c in m for c in sample[:500])
    assert m[raw[32 * 12345 : 32 * 12346]].offset == 12345
    others = [os.urandom(32) for _ in range(5000)]
    assert len(m.missing(others)) == 5000 and not any(c in m for c in others[:500])


def test_readers_see_every_entry_while_the_arrays_are_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup from another thread never misses an entry added before it, while the writer
    folds new entries into new arrays again and again (a backup's upload threads add, its
    reading threads look up)."""
    monkeypatch.setattr(location_map, "_FOLD_AT", 50)
    m = LocationMap()
    added: list[bytes] = []
    done = threading.Event()
    misses: list[bytes] = []

    def read() -> None:
        while not done.is_set():
            for cid in added[-200:]:  # each was added before this read began
                if cid not in m:
                    misses.append(cid)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(300):
        fresh = [(os.urandom(32), _loc(i)) for _ in range(20)]
        m.update(fresh)
        added.extend(cid for cid, _ in fresh)
    done.set()
    for t in readers:
        t.join()
    assert misses == [] and len(m) == 6000


def test_cache_files_keep_the_columns_and_refuse_other_formats() -> None:
    entries = [(os.urandom(32), _loc(i)) for i in range(100)]
    cols = LocationColumns.from_entries(entries)
    got = _decode_cached(_encode_cached(CachedIndex("client-a", cols)))
    assert got.columns.entries() == entries and got.signer == "client-a"
    with pytest.raises(encoding.FormatError):
        _decode_cached(encoding.pack([[c, loc.pack, 1, 2, 3] for c, loc in entries]))  # the older row format
    pack, cols_le = cols.little_endian()
    older = {"packs": cols.packs, "ids": cols.ids, "pack": pack, "cols": cols_le}
    with pytest.raises(encoding.FormatError):  # columns without their signer
        _decode_cached(b"BKIX2\n" + encoding.pack(older))
    bad = LocationColumns(cols.ids, cols.packs[:1], array("I", [p + 3 for p in cols.pack_numbers]), cols.cols)
    with pytest.raises(encoding.FormatError):
        _decode_cached(_encode_cached(CachedIndex("client-a", bad)))
    with pytest.raises(encoding.FormatError):
        LocationMap().bulk_load([bad], lambda: [bad])
    with pytest.raises(encoding.FormatError):
        LocationMap().add(os.urandom(32), Location(PACKS[0], 1 << 41, 1, 1))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(ids, max_size=40), max_size=10), st.integers(1, 6))
def test_a_chunk_id_set_is_a_set_kept_sorted(adds: list[list[bytes]], run: int) -> None:
    """ChunkIdSet holds what a set holds, sorted as bytes, however its runs merged; its chunk
    set objects are the ones a plain set gives."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk_id_set, "_RUN", run)  # many small runs, merged often
        s = ChunkIdSet()
        model: set[bytes] = set()
        for group in adds:
            if len(group) == 1:
                s.add(group[0])
            else:
                s.update(group)
            model.update(group)
            assert len(s) == len(model)
        assert list(s) == sorted(model)
        more = [bytes([250]) * 32, next(iter(model), bytes(32))]
        both = s.union(more)
        assert list(both) == sorted(model | set(more)) and list(s) == sorted(model)
    secrets = PutSecrets(bytes(32))
    assert refs.build_chunkset(s, secrets) == refs.build_chunkset(model, secrets)


def test_a_small_chunk_id_set_read_then_grown_holds_the_new_ids() -> None:
    """A small set sorts once for all reads (a commit reads it several times); an id added
    after a read is in the next one."""
    a, b, c, d = (bytes([n]) * 32 for n in (1, 2, 0, 3))
    s = ChunkIdSet([b, a])
    assert list(s) == [a, b] and s.sorted_ids() is s.sorted_ids()
    s.add(c)
    assert list(s) == [c, a, b]
    s.update([d, a])
    assert list(s) == [c, a, b, d] and len(s) == 4


def test_locating_a_snapshots_chunks_in_a_map_of_new_entries_only() -> None:
    """A small repository's map holds every entry in its dict: a snapshot's sorted ids (a
    tuple) are located there, and the ones it lacks are named."""
    m = LocationMap()
    here, there, gone = os.urandom(32), os.urandom(32), os.urandom(32)
    m.update([(here, Location("a" * 64, 0, 10, 10)), (there, Location("b" * 64, 0, 10, 10))])
    packs, missing = m.locate_many((here, gone, there))
    assert packs == {"a" * 64, "b" * 64} and missing == [gone]


def test_a_chunk_id_set_of_ids_sharing_a_prefix_sorts_them_whole() -> None:
    a = [bytes(8) + os.urandom(24) for _ in range(50)] + [bytes(8) + bytes(24)] * 3
    s = ChunkIdSet(a)
    assert list(s) == sorted(set(a))


def test_a_small_index_and_chunk_id_set_never_import_numpy(tmp_path: Path) -> None:
    """Importing numpy costs ~50 ms, more than loading a small repository's whole index: the
    map, its cache files and a backup's chunk-id set stay in Python until they grow large."""
    code = """
import os, sys
from bunker.crypto.derive import PutSecrets
from bunker.repo import refs
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.index_cache import CachedIndex, _decode_cached, _encode_cached
from bunker.repo.location_map import Location, LocationColumns, LocationMap
import bunker.restore.workers, bunker.backup.small_files, bunker.repo.pack_verifier
entries = [(os.urandom(32), Location(f"{i % 7:064x}", i, 10, 20)) for i in range(20000)]
# index objects of 5,000 entries: over the size at which columns are checked with numpy once it
# is imported, but numpy is not imported for them
batches = [LocationColumns.from_entries(entries[i : i + 5000]) for i in range(0, 20000, 5000)]
cols = [_decode_cached(_encode_cached(CachedIndex("w", c))).columns for c in batches]
cols = [c.select(lambda p: p != f"{3:064x}") for c in cols]
m = LocationMap()
m.bulk_load(iter(cols), lambda: iter(cols))
s = ChunkIdSet(cid for cid, _ in entries)
packs, missing = m.locate_many(s.sorted_ids())
assert len(missing) == sum(1 for _, loc in entries if loc.pack == f"{3:064x}") and len(packs) == 6
assert m.packs() == packs and len(s.union([bytes(32)])) == 20001
refs.build_chunkset(s, PutSecrets(bytes(32)))
print("numpy" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_a_backup_of_a_small_repository_never_imports_numpy(repo: Repo, tmp_path: Path) -> None:
    """The whole command, not only the index: a backup reads the prune's records without
    importing the prune (repo/condemnations.py), whose chunk tables need numpy."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    repo.backup(src)
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bunker", "backup", str(src), "--repo", str(repo.path)],
        capture_output=True,
        text=True,
        env=repo.env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "bunker.backup.run" in imported, sorted(imported)
    lines = out.stderr.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.rsplit("|", 1)[-1].strip() == "numpy"), None)
    assert at is None, "\n".join(ln for ln in lines[at:] if "bunker" in ln)[:3000]


def test_contains_all_answers_as_each_lookup_does() -> None:
    """contains_all (a backup asks it for each unchanged directory) agrees with `in` for ids in
    the arrays, in the dict of entries added since, missing ones and ones of a wrong shape."""
    entries = [(os.urandom(32), _loc(i)) for i in range(70_000)]  # over the size kept as a dict
    cols = [LocationColumns.from_entries(entries[i : i + 35_000]) for i in (0, 35_000)]
    m = LocationMap()
    m.bulk_load(iter(cols), lambda: iter(cols))
    added = os.urandom(32)
    m.add(added, _loc(1))
    present = [cid for cid, _ in entries[::97]] + [added]
    assert all(c in m for c in present) and m.contains_all(present) and m.contains_all([])
    for odd in (os.urandom(32), b"short", bytes(33)):
        assert odd not in m and not m.contains_all([*present, odd])
