#!/usr/bin/env python3
"""Scale: what a client's chunk index, a backup's chunk-id set and prune's marking cost at
millions of chunks (docs/performance.md, "Scale").

    python3 bench/scale.py [--chunks 1000000,10000000] [--ops index,chunkset,prune]
                           [--per-object 20000] [--work DIR] [--keep]

``chunkset``: a backup's set of the chunk ids its snapshot names (ChunkIdSet), filled with that
many random ids a thousand at a time, then written as chunk set objects: time, resident bytes
per chunk, peak RSS.

``index``: for each size it builds a local repository whose index objects (real ones: signed, encrypted,
as a backup writes them) locate that many synthetic chunks (random 32-byte ids, 500 chunks per
pack, packs that exist only as names), then loads the index in a fresh process twice, as a
backup does:

- ``cold``: every index object fetched, verified and decrypted, and the local cache written;
- ``warm``: from the client's index cache (the common case: index objects never change).

and reports wall time, the process's RSS before and after the load (the index's steady cost per
chunk), its peak RSS, and 200,000 lookups. A projection to 100 M chunks scales the warm figures
linearly (the map's memory is linear in its entries by construction).

``prune``: the same repository with the chunk sets of two snapshots (the older names every third
chunk of the first 70 %, the newer the last 50 %), then in a fresh process what a prune does per
chunk: every chunk copy read from the index objects (repo/liveness.py ``all_copies``), both
chunk sets marked part by part (``mark_live``), and the packs to repack chosen; time, resident
bytes per chunk and peak RSS. (The rest of a prune costs per snapshot and per pack, not per
chunk: listing, the snapshots' envelopes and pack sets, deleting, copying what it repacks.)

``check`` (not run by default: building the repository stores every chunk): a repository of
real packs (tiny blobs, 500 to a pack, an index object per pack) and one snapshot naming every
chunk, then `bunker check` with the put key in a fresh process (in-process Checker): every
pack's footer and trailer read and verified, every index object checked against the trailers,
the snapshot's chunk set looked up; time, resident bytes per chunk after, peak RSS (of the
checking process: with ``--read-data`` the blobs are verified in worker processes besides).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")

BUILD = r"""
import os, random, sys, json, time
from bunker.cli.context import init_repository
from bunker.crypto.keyfile import load_put_key
from bunker.repo import refs
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.index import Location, make_index
from bunker.repo.repository import Repository
from bunker.storage import open_backend

repo_dir, n, per, roots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "roots"
created = init_repository(repo_dir, "scale")
repo = Repository.open(open_backend(repo_dir))
put = load_put_key(created.put_path)
cert = repo.check_put_key(put)
t0 = time.monotonic()
done = 0
rng = random.Random(n)  # ids a second process can make again (the prune op's chunk sets)
older, newer = ChunkIdSet(), ChunkIdSet()
while done < n:
    k = min(per, n - done)
    ids = rng.randbytes(32 * k)
    entries = []
    for i in range(k):
        pack = f"{(done + i) // 500:064x}"
        entries.append((ids[32 * i : 32 * i + 32], Location(pack, ((done + i) % 500) * 2100, 2100, 4096)))
    repo.put_object("index", make_index(entries, put.secrets, put.client_key, cert.name))
    if roots:
        # two snapshots: the older names every third chunk of the first 70 %, the
        # newer the last 50 % (so some packs are mostly garbage and others wholly live)
        if done < 0.7 * n:
            older.update(ids[32 * i : 32 * i + 32] for i in range(0, k, 3))
        if done >= 0.5 * n:
            newer.update(ids[32 * i : 32 * i + 32] for i in range(0, k))
    done += k
tops = []
for s in (older, newer) if roots else ():
    objs = refs.build_chunkset(s, put.secrets)
    for name, data in objs.items():
        if name != "top":
            repo.put_object("refs", data)
    tops.append(refs.top_name(objs))
print(json.dumps({"put_path": created.put_path, "build_s": time.monotonic() - t0, "roots": tops}))
"""

CHUNKSET = r"""
import os, sys, json, time, resource
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from bunker.crypto.derive import PutSecrets
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo import refs

n = int(sys.argv[1])
before = rss()
t0 = time.monotonic()
ids = ChunkIdSet()
step = 1000
for i in range(0, n, step):  # as a backup records files: a few ids at a time
    block = os.urandom(32 * step)
    ids.update([block[j : j + 32] for j in range(0, 32 * step, 32)])
len(ids)
add_s = time.monotonic() - t0
after = rss()
t0 = time.monotonic()
objs = refs.build_chunkset(ids, PutSecrets(bytes(32)))
build_s = time.monotonic() - t0
print(json.dumps({"chunks": n, "add_s": add_s, "rss_per_chunk": (after - before) / n, "build_s": build_s,
                  "parts": len(objs) - 2, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

LOAD = r"""
import os, sys, json, time, resource
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from bunker.crypto.keyfile import load_put_key
from bunker.repo.index_cache import IndexCache
from bunker.repo.repository import Repository
from bunker.storage import open_backend
import numpy  # imported before the first figure: its own memory is not the index's

repo_dir, put_path, cache_dir = sys.argv[1:4]
repo = Repository.open(open_backend(repo_dir))
put = load_put_key(put_path)
before = rss()
t0 = time.monotonic()
index = IndexCache(repo, put.secrets, cache_dir).load()
n = len(index)
load_s = time.monotonic() - t0
after = rss()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
locs = index.locations
some = list(locs)[:: max(1, n // 100000)][:100000]
others = [os.urandom(32) for _ in range(100000)]
t0 = time.monotonic()
hits = sum(1 for c in some if c in locs) + sum(1 for c in others if c in locs)
lookup_ns = (time.monotonic() - t0) / (len(some) + len(others)) * 1e9
t0 = time.monotonic()
packs, missing = locs.locate_many(some + others)
bulk_ns = (time.monotonic() - t0) / (len(some) + len(others)) * 1e9
assert hits == len(some) and len(missing) == len(others)
print(json.dumps({"chunks": n, "load_s": load_s, "rss_before": before, "rss_after": after, "peak": peak,
                  "arrays": locs.nbytes(), "lookup_ns": lookup_ns, "bulk_ns": bulk_ns}))
"""


PRUNE = r"""
import os, sys, json, time, resource
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from bunker.crypto.keyfile import load_put_key
from bunker.repo.liveness import all_copies, mark_live
from bunker.repo.repack import choose
from bunker.repo.repository import Repository
from bunker.storage import open_backend
import numpy  # imported before the first figure: its own memory is not the marking's

repo_dir, put_path, tops = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
repo = Repository.open(open_backend(repo_dir))
put = load_put_key(put_path)
before = rss()
t0 = time.monotonic()
liveness = all_copies(repo, put.secrets, [])
copies_s = time.monotonic() - t0
t0 = time.monotonic()
roots = [(f"root {i}", liveness.packs, top) for i, top in enumerate(tops)]
mark_live(liveness, roots, repo.get_object, put.secrets)
mark_s = time.monotonic() - t0
t0 = time.monotonic()
sizes = {p: 500 * 2100 for p in liveness.packs}
chosen = choose(liveness, sizes, liveness.packs, 0.5, 4 << 20)
live = sum(liveness.live_bytes(p) for p in liveness.packs)
copied = sum(len(liveness.live_ids(p)) for p in chosen[:100])
choose_s = time.monotonic() - t0
after = rss()
print(json.dumps({"copies_s": copies_s, "mark_s": mark_s, "choose_s": choose_s, "rss_before": before,
                  "rss_after": after, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "packs": len(liveness.packs), "chosen": len(chosen), "live_bytes": live}))
"""


PACKED = r"""
import os, random, sys, json, time
from bunker.backup.commit import commit_snapshot
from bunker.cli.context import init_repository
from bunker.crypto.keyfile import load_put_key
from bunker.repo import blob
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.index_cache import IndexCache
from bunker.repo.pack import KIND_META
from bunker.repo.records import new_session_id
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.tree import encode_tree
from bunker.runlog import RunLog
from bunker.storage import open_backend

repo_dir, n, state = sys.argv[1], int(sys.argv[2]), sys.argv[3]
created = init_repository(repo_dir, "scale")
repo = Repository.open(open_backend(repo_dir))
put = load_put_key(created.put_path)
cert = repo.check_put_key(put)
t0 = time.monotonic()
writer = SessionWriter(repo, put, cert.name, IndexCache(repo, put.secrets, None).load())
ids = ChunkIdSet()
rng = random.Random(n)
for i in range(n):  # tiny blobs, 500 to a pack (and an index object per pack)
    data = rng.randbytes(16)
    cid = blob.chunk_id(put.secrets, data)
    writer.store(cid, data)
    ids.add(cid)
    if i % 500 == 499:
        writer.flush()
root = blob.chunk_id(put.secrets, encode_tree([]))
writer.store(root, encode_tree([]), KIND_META)
ids.add(root)
now = time.time()
body = {"host": "scale", "user": "x", "paths": ["/"], "tags": [], "started": now, "finished": now, "argv": []}
commit_snapshot(repo, put, cert, writer, root=root, chunk_ids=ids, stats={"files": 0, "dirs": 0, "bytes": 0},
                log=RunLog(), body_extra=body, state_dir=state, session=new_session_id())
writer.close()
print(json.dumps({"put_path": created.put_path, "master_path": created.master_path, "repo_id": repo.repo_id,
                  "build_s": time.monotonic() - t0}))
"""

CHECK = r"""
import os, sys, json, time, resource
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
from bunker.crypto.keyfile import load_master_key, load_put_key
from bunker.repo.check import Checker
from bunker.storage import open_backend
import numpy  # imported before the first figure: its own memory is not the check's

repo_dir, put_path, repo_id, master_path = sys.argv[1:5]
put = load_put_key(put_path)
master = load_master_key(master_path, os.environ["BUNKER_PASSPHRASE"]) if master_path else None
before = rss()
t0 = time.monotonic()
report = Checker(open_backend(repo_dir), repo_id, secrets=put.secrets, master=master).run(keyless=False)
check_s = time.monotonic() - t0
print(json.dumps({"check_s": check_s, "rss_before": before, "rss_after": rss(),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "problems": [p.to_json() for p in report.problems][:3], "counts": dict(report.counts)}))
"""


def _run(code: str, *args: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="1000000,10000000", help="comma-separated sizes")
    ap.add_argument("--per-object", type=int, default=20000, help="entries per index object")
    ap.add_argument("--work", default="", help="where the repositories go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the repositories")
    ap.add_argument("--read-data", action="store_true", help="the check op reads and verifies every blob too")
    ap.add_argument(
        "--ops",
        default="index,chunkset,prune",
        help="index (a client's index load), chunkset (a backup's ids), prune (prune's marking of what is live), "
        "check (a put-key check of real packs)",
    )
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bunker-scale-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        ops = set(args.ops.split(","))
        for n in (int(x) for x in args.chunks.split(",")) if "chunkset" in ops else ():
            env = dict(os.environ, PYTHONPATH=SRC)
            r = _run(CHUNKSET, str(n), env=env)
            rows.append({"op": "chunkset", **r})
            print(
                f"{n:>11,} chunks, a backup's chunk-id set: added in {r['add_s']:.2f} s, "
                f"{r['rss_per_chunk']:.1f} B/chunk resident, chunk set objects ({r['parts']} parts) "
                f"built in {r['build_s']:.2f} s, peak {r['peak'] / 2**20:.0f} MiB",
                flush=True,
            )
        for n in (int(x) for x in args.chunks.split(",")) if ops & {"index", "prune"} else ():
            home = os.path.join(work, f"home-{n}")
            env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=f"{home}/.config", XDG_DATA_HOME=f"{home}/.local/share")
            env.update(XDG_CACHE_HOME=f"{home}/.cache", BUNKER_PASSPHRASE="scale", PYTHONPATH=SRC)
            repo_dir, cache = os.path.join(work, f"repo-{n}"), os.path.join(work, f"cache-{n}")
            t0 = time.monotonic()
            roots = "roots" if "prune" in ops else "none"
            built = _run(BUILD, repo_dir, str(n), str(args.per_object), roots, env=env)
            print(f"{n:>11,} chunks: built in {time.monotonic() - t0:.1f} s", flush=True)
            if "prune" in ops:
                r = _run(PRUNE, repo_dir, str(built["put_path"]), ",".join(built["roots"]), env=env)  # type: ignore[arg-type]
                rows.append({"op": "prune", "chunks": n, **r})
                grew, peak = (r["rss_after"] - r["rss_before"]) / n, r["peak"] / 2**20
                print(
                    f"{n:>11,} chunks, prune's marking: copies read in {r['copies_s']:.2f} s, two snapshots' "
                    f"chunk sets marked in {r['mark_s']:.2f} s, {r['chosen']:,} of {r['packs']:,} packs chosen "
                    f"in {r['choose_s']:.2f} s; {grew:.1f} B/chunk resident, peak {peak:.0f} MiB",
                    flush=True,
                )
            for phase in ("cold", "warm") if "index" in ops else ():
                r = _run(LOAD, repo_dir, str(built["put_path"]), cache, env=env)
                per = (r["rss_after"] - r["rss_before"]) / r["chunks"]
                row = {"chunks": n, "phase": phase, **r, "rss_per_chunk": per}
                rows.append(row)
                grew, arrays, peak = (r["rss_after"] - r["rss_before"]) / 2**20, r["arrays"] / n, r["peak"] / 2**20
                print(
                    f"{n:>11,} chunks {phase}: load {r['load_s']:.2f} s, RSS +{grew:.0f} MiB ({per:.1f} B/chunk; "
                    f"arrays {arrays:.1f} B/chunk), peak {peak:.0f} MiB, "
                    f"lookup {r['lookup_ns']:.0f} ns, bulk {r['bulk_ns']:.0f} ns",
                    flush=True,
                )
            if not args.keep:
                shutil.rmtree(repo_dir)
                shutil.rmtree(cache, ignore_errors=True)
        for n in (int(x) for x in args.chunks.split(",")) if "check" in ops else ():
            home = os.path.join(work, f"home-check-{n}")
            env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=f"{home}/.config", XDG_DATA_HOME=f"{home}/.local/share")
            env.update(XDG_CACHE_HOME=f"{home}/.cache", BUNKER_PASSPHRASE="scale", PYTHONPATH=SRC)
            repo_dir = os.path.join(work, f"repo-check-{n}")
            t0 = time.monotonic()
            built = _run(PACKED, repo_dir, str(n), os.path.join(home, "state"), env=env)
            took = time.monotonic() - t0
            print(f"{n:>11,} chunks in packs of 500 and one snapshot: built in {took:.1f} s", flush=True)
            master = str(built["master_path"]) if args.read_data else ""
            r = _run(CHECK, repo_dir, str(built["put_path"]), str(built["repo_id"]), master, env=env)
            rows.append({"op": "check", "chunks": n, **r})
            grew, peak = (r["rss_after"] - r["rss_before"]) / n, r["peak"] / 2**20
            problems = [p for p in r["problems"] if p["severity"] == "err"]  # type: ignore[union-attr]
            how = "--read-data" if master else "put key"
            print(
                f"{n:>11,} chunks, check ({how}): {r['check_s']:.2f} s, {grew:.1f} B/chunk resident after, "
                f"peak {peak:.0f} MiB; {r['counts']['snapshot_chunks']:,} snapshot chunks checked, "  # type: ignore[index]
                f"{len(problems)} errors",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(repo_dir)
        warm = [r for r in rows if r.get("phase") == "warm"]
        if warm:
            big = max(warm, key=lambda r: r["chunks"])
            f = 100_000_000 / big["chunks"]
            print(
                f"projected to 100,000,000 chunks (warm, linear from {big['chunks']:,}): "
                f"load {big['load_s'] * f:.0f} s, index {big['rss_per_chunk'] * 1e8 / 2**30:.1f} GiB"
            )
        print(json.dumps(rows))
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
