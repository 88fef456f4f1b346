#!/usr/bin/env python3
"""Nodes (docs/hierarchy.md): what forwarding, bundle writing and bundle import cost.

    python3 bench/node.py [--scales 0.25,1.0] [--reps 1] [--corpus-root DIR] [--out DIR]

Per scale of the shared `mixed` corpus (../shared/bench/make_corpus.py) and repetition, on tmpfs:

1. *local*: `bunker backup` of the corpus into a local repository (the reference throughput);
2. *direct*: a backup into node `office` (its server forked for the run), then `bunker node
   forward office`, whose upstream is a local repository of record: the forward's throughput is
   the stored bytes it delivered over its wall time, compared with the local backup's
   (corpus bytes over wall time, as the issue's target puts it: forwarding >= 0.8x the local
   backup's throughput);
3. *link*: a backup into node `branch`, whose upstream is node `hq` through a mailbox folder:
   `node forward branch` writes bundles (MB/s of piece bytes), `node import hq` takes them in
   (MB/s of piece bytes) and writes them to hq's store; targets >= 200 MB/s each.

Every step's peak memory is the summed RSS of its whole process tree (bench/reap.py), so a
node's memory can be compared across scales: bounded means it does not grow with the store or
the bundle. Writes `node.csv` into --out and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from remote import corpus_bytes as tree_bytes  # noqa: E402 - bytes of the regular files under a directory

SHARED = Path(os.environ.get("SHARED", HERE.parent.parent / "shared" / "bench"))
WORK = Path(os.environ.get("BENCH_WORK", "/dev/shm/bunker-bench"))
_SCRIPT = Path(sys.executable).with_name("bunker")
BUNKER = str(_SCRIPT) if _SCRIPT.exists() else "bunker"  # the running Python's console script
PASSPHRASE = "bench passphrase"


def corpus(scale: float, root: Path) -> Path:
    """The mixed corpus at ``scale`` (built once, reused)."""
    where = root / f"corpus-mixed-s{scale}"
    data = where / "mixed"
    if not (where / ".done").exists():
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        subprocess.run(
            [sys.executable, str(SHARED / "make_corpus.py"), "mixed", str(data), "--scale", str(scale)], check=True
        )
        (where / ".done").touch()
    return data


class Bench:
    """One isolated environment (XDG directories, passphrase) in ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BUNKER_")}
        for d in ("data", "config", "cache", "home"):
            (base / d).mkdir(parents=True, exist_ok=True)
        self.env.update(
            XDG_DATA_HOME=str(base / "data"),
            XDG_CONFIG_HOME=str(base / "config"),
            XDG_CACHE_HOME=str(base / "cache"),
            HOME=str(base / "home"),
            BUNKER_PASSPHRASE=PASSPHRASE,
        )

    def run(self, *args: str | Path) -> str:
        cp = subprocess.run([BUNKER, *map(str, args)], env=self.env, capture_output=True, text=True)
        if cp.returncode not in (0, 1):
            raise SystemExit(f"bunker {' '.join(map(str, args))} failed ({cp.returncode}):\n{cp.stderr}")
        return cp.stdout

    def timed(self, *args: str | Path) -> tuple[float, int, str]:
        """Wall seconds, peak whole-tree RSS in KiB (bench/reap.py), stdout."""
        log = self.base / "mem.csv"
        log.unlink(missing_ok=True)
        env = dict(self.env, BENCH_MEM_LOG=str(log), BENCH_MEM_INTERVAL="0.05")
        t0 = time.perf_counter()
        cp = subprocess.run(
            [sys.executable, str(HERE / "reap.py"), BUNKER, *map(str, args)], env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if cp.returncode not in (0, 1):
            raise SystemExit(f"bunker {' '.join(map(str, args))} failed ({cp.returncode}):\n{cp.stderr}")
        peak = 0
        if log.exists():
            for line in log.read_text().splitlines():
                fields = line.split(",")
                if len(fields) > 2 and fields[1].isdigit():
                    peak = max(peak, int(fields[1]))
        return wall, peak, cp.stdout

    def nodes(self, top: Path, *specs: tuple[Path, str, str]) -> None:
        """Make, certify and then seed nodes (directory, name, capabilities): seeded after every
        certificate exists, each knows the others' from the start."""
        for where, name, caps in specs:
            self.run("node", "init", where, "--name", name)
            card = where.parent / f"{name}.card"
            self.run("node", "card", where, "--out", card)
            self.run("key", "new-node", card, "--caps", caps, "--repo", top)
        seed = top.parent / "top.seed"
        self.run("node", "export-seed", seed, "--repo", top)
        for where, _, _ in specs:
            self.run("node", "seed", where, seed)


def one(scale: float, rep: int, data: Path, nbytes: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(dir=WORK, prefix="node-") as tmp:
        t = Path(tmp)
        b = Bench(t / "env")

        def row(step: str, wall: float, peak: int, moved: int, base_bytes: int | None = None) -> None:
            rows.append(
                {
                    "scale": scale,
                    "rep": rep,
                    "step": step,
                    "wall_s": round(wall, 3),
                    "bytes": moved,
                    "mb_s": round(moved / wall / 1e6, 1),
                    "peak_tree_rss_mb": round(peak / 1024, 1),
                    "corpus_mb_s": round((base_bytes or nbytes) / wall / 1e6, 1),
                }
            )

        local = t / "local"
        b.run("init", "--repo", local, "--client", "bench")
        wall, peak, _ = b.timed("backup", "--no-progress", "--repo", local, data)
        row("local backup", wall, peak, tree_bytes(local))
        shutil.rmtree(local)

        top = t / "top"
        b.run("init", "--repo", top, "--client", "bench2")
        office, hq, branch = t / "office", t / "hq", t / "branch"
        b.nodes(top, (office, "office", "relay"), (hq, "hq", "relay,record"), (branch, "branch", "relay"))
        b.run("node", "upstream", "add", office, "top", "--direct", top)
        wall, peak, _ = b.timed("backup", "--no-progress", "--repo", office, data)
        row("backup into a node", wall, peak, tree_bytes(office / "store"))
        wall, peak, out = b.timed("node", "forward", office, "--json")
        delivered = tree_bytes(top)
        row("node forward (direct)", wall, peak, delivered)
        shutil.rmtree(office)

        mailbox = t / "mailbox"
        mailbox.mkdir()
        b.run("node", "upstream", "add", branch, "hq", "--link", mailbox, "--card", t / "hq.card")
        b.run("node", "downstream", "add", hq, "branch", "--link", mailbox, "--card", t / "branch.card")
        b.run("backup", "--no-progress", "--repo", branch, data)
        wall, peak, out = b.timed("node", "forward", branch, "--json")
        pieces = tree_bytes(mailbox)
        row("node forward (bundles)", wall, peak, pieces)
        wall, peak, out = b.timed("node", "import", hq, "--json")
        doc = json.loads(out)
        if doc.get("problems"):
            raise SystemExit(f"import reported problems: {doc['problems']}")
        row("node import (bundles)", wall, peak, pieces)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="0.25,1.0")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--corpus-root", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=WORK / "results" / time.strftime("node-%Y%m%dT%H%M%S"))
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for scale in (float(s) for s in args.scales.split(",")):
        data = corpus(scale, args.corpus_root)
        nbytes = tree_bytes(data)
        for rep in range(args.reps):
            rows += one(scale, rep, data, nbytes)
    with open(args.out / "node.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{'scale':>5}  {'step':<24} {'wall s':>7} {'MB moved':>9} {'MB/s':>7} {'corpus MB/s':>11} {'peak MB':>8}")
    steps = sorted({(r["scale"], r["step"]) for r in rows}, key=lambda k: (k[0], [r["step"] for r in rows].index(k[1])))
    for scale, step in steps:
        sel = [r for r in rows if r["scale"] == scale and r["step"] == step]

        def med(key: str, sel: list[dict[str, object]] = sel) -> float:
            return float(statistics.median(float(str(r[key])) for r in sel))

        print(
            f"{scale:>5}  {step:<24} {med('wall_s'):>7.2f} {med('bytes') / 1e6:>9.0f} {med('mb_s'):>7.0f} "
            f"{med('corpus_mb_s'):>11.0f} {med('peak_tree_rss_mb'):>8.0f}"
        )
    print(f"\nresults: {args.out / 'node.csv'}")


if __name__ == "__main__":
    main()
