#!/usr/bin/env bash
# Bunker benchmark against restic and borg on the shared deterministic corpora.
#
# usage: bench/run.sh                       # full run: mixed (~1 GiB) and many (200k files)
#        SCALE=0.1 MANY_FILES=20000 bench/run.sh   # quick smoke run (~1 minute)
#
# What it does:
#   1. builds the corpora with $SHARED/make_corpus.py into $BENCH_WORK (reused when already built
#      with the same parameters: corpus-mixed-s$SCALE/mixed, corpus-many-n$MANY_FILES/many);
#   2. runs $SHARED/peers.sh on each corpus in $CORPORA (mixed with MUTATE=1, so it also times a
#      backup after `make_corpus.py mutate`). peers.sh times, per tool: backup, nochange, [mutated],
#      restore (verified with diff -r) and check --read-data (restic check --read-data,
#      borg check --verify-data), and records the repository size -- so run.sh adds no check
#      timing of its own;
#   3. merges the per-corpus results and prints $SHARED/summarize.py's table for all of them.
#
# Env (all optional):
#   SCALE       mixed corpus scale (default 1.0 = ~1.05 GiB)
#   MANY_FILES  number of files in the many corpus (default 200000)
#   REPS        repetitions per corpus, peers.sh alternates tool order (default 1)
#   CORPORA     which corpora, space separated (default "mixed many")
#   TOOLS       passed to peers.sh (default "bunker restic borg")
#   PIN         1 (default): benchmark the *committed* tree at HEAD, exported with `git archive` into
#               $BENCH_WORK/pin-<commit>/ and run from there, so commits or edits made while the
#               benchmark runs cannot change the code under test (uncommitted changes are NOT
#               measured). 0: run the installed `bunker` (editable install: the working tree).
#   REAP        1 (default): run bunker under bench/reap.py, a child subreaper, so /usr/bin/time's
#               cpu figures include bunker's forkserver worker processes (without it they are lost:
#               bunker never waits for its forkserver) and the whole tree's peak RSS/PSS is logged to
#               $RESULTS/<corpus>/bunker_mem.csv. 0: time bunker directly.
#   BUNKER      bunker command passed to peers.sh (default: built from PIN and REAP; a pyenv shim is
#               resolved to the real entry point, which saves ~0.1 s of shim start-up per call)
#   SHARED      folder with make_corpus.py, peers.sh, summarize.py
#               (default: $(dirname "$0")/../../shared/bench, i.e. /work/shared/bench)
#   BENCH_WORK  corpora, repositories, restores and results (default /dev/shm/bunker-bench; needs
#               ~4 GiB free at SCALE=1: corpus 1.05 GiB + many ~0.9 GiB + one repo + one restore)
#   WORKDIR     where peers.sh puts repositories and restores (default $BENCH_WORK)
#   RESULTS     results folder (default $BENCH_WORK/results/<UTC timestamp>; `latest` links to it)
#
# Output: $RESULTS/summary.txt (the table), $RESULTS/times.csv + verify.csv (all corpora),
# $RESULTS/<corpus>/ (peers.sh's own output), $RESULTS/meta.txt (machine, versions, commit),
# $RESULTS/log.txt (everything printed). Needs /usr/bin/time, restic, borg
# (apt-get install -y time restic borgbackup); missing peers are skipped by peers.sh.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/.." && pwd)
SHARED=$(cd "${SHARED:-$HERE/../../shared/bench}" && pwd)
SCALE=${SCALE:-1.0}
MANY_FILES=${MANY_FILES:-200000}
REPS=${REPS:-1}
CORPORA=${CORPORA:-"mixed many"}
BENCH_WORK=${BENCH_WORK:-/dev/shm/bunker-bench}
mkdir -p "$BENCH_WORK"
BENCH_WORK=$(cd "$BENCH_WORK" && pwd)
export WORKDIR=${WORKDIR:-$BENCH_WORK}
export TOOLS=${TOOLS:-"bunker restic borg"}
RESULTS=${RESULTS:-$BENCH_WORK/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS" "$WORKDIR"
RESULTS=$(cd "$RESULTS" && pwd)
ln -sfn "$RESULTS" "$BENCH_WORK/results/latest" 2>/dev/null || true

for f in make_corpus.py peers.sh summarize.py; do
  [ -f "$SHARED/$f" ] || { echo "run.sh: $SHARED/$f not found (set SHARED)" >&2; exit 2; }
done
[ -x /usr/bin/time ] || { echo "run.sh: needs /usr/bin/time (apt-get install -y time)" >&2; exit 2; }

PY=$(python3 -c 'import sys; print(sys.executable)')   # the real interpreter, not a pyenv shim
COMMIT=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -z "${BUNKER:-}" ]; then
  if [ "${PIN:-1}" = 1 ] && [ "$COMMIT" != unknown ]; then
    pin=$BENCH_WORK/pin-$COMMIT
    if [ ! -f "$pin/bunker" ]; then
      rm -rf "$pin"; mkdir -p "$pin"
      git -C "$REPO_ROOT" archive HEAD src | tar -x -C "$pin"
      # compiled as an installed package is (pip writes the bytecode): without it every run, and
      # every worker process, compiles the modules it imports (~0.16 s a command), and an
      # environment with PYTHONDONTWRITEBYTECODE set never keeps the result
      "$PY" -m compileall -q "$pin/src" > /dev/null
      printf '#!/bin/sh\n# bunker from the tree of commit %s\nPYTHONPATH=%s/src${PYTHONPATH:+:$PYTHONPATH} exec %s -c %s "$@"\n' \
        "$COMMIT" "$pin" "$PY" "'import sys; sys.argv[0] = \"bunker\"; from bunker.cli.main import main; main()'" > "$pin/bunker"
      chmod +x "$pin/bunker"
    fi
    BUNKER=$pin/bunker
  else
    BUNKER=$(command -v bunker) || { echo "run.sh: bunker not on PATH" >&2; exit 2; }
    case $BUNKER in */shims/*) BUNKER=$(pyenv which bunker 2>/dev/null || echo "$BUNKER") ;; esac
  fi
  # -S: the wrapper needs only the standard library; without it every timed run also paid the
  # start-up of site-packages (.pth files) for the wrapper, which is not bunker's work
  [ "${REAP:-1}" = 1 ] && BUNKER="$PY -S $HERE/reap.py $BUNKER"
fi
export BUNKER

exec > >(tee -a "$RESULTS/log.txt") 2>&1

# --- machine, versions, commit -------------------------------------------------------------
{
  echo "date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  dirty=$([ -n "$(git -C "$REPO_ROOT" status --porcelain -- src 2>/dev/null)" ] && echo yes || true)
  case $BUNKER in
    *"/pin-$COMMIT/"*) echo "commit:  $COMMIT (committed tree, pinned${dirty:+; uncommitted changes in src are not measured})" ;;
    *) echo "commit:  $COMMIT${dirty:+ + uncommitted changes in src (measured if BUNKER runs the working tree)}" ;;
  esac
  echo "bunker command: $BUNKER"
  echo "nproc:   $(nproc)"
  echo "memory:  $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "cpu:     $(awk -F': ' '/model name/{n=$2} /cpu family/{f=$2} /^model\t/{m=$2} /cpu MHz/{h=$2}
    END {printf "%s (family %s model %s, %.0f MHz)", n, f, m, h}' /proc/cpuinfo)"
  echo "kernel:  $(uname -r)"
  echo "python:  $(python3 --version 2>&1)"
  echo "bunker:  $($BUNKER --version 2>&1 | head -1)"
  echo "restic:  $(restic version 2>&1 | head -1)"
  echo "borg:    $(borg --version 2>&1 | head -1)"
  echo "params:  SCALE=$SCALE MANY_FILES=$MANY_FILES REPS=$REPS CORPORA='$CORPORA' TOOLS='$TOOLS'"
  echo "work:    $BENCH_WORK ($(df -h --output=fstype,avail "$BENCH_WORK" | tail -1 | xargs))"
} | tee "$RESULTS/meta.txt"

# --- corpora ---------------------------------------------------------------------------------
# A corpus dir is reused only if its .built stamp exists and no .dirty marker is left behind: peers.sh
# mutates `mixed` in place and reverts it at the end of each tool's run, so an interrupted run can
# leave it mutated; such a corpus is rebuilt.
corpus_root() { # name -> folder that holds NAME/
  case $1 in
    mixed) echo "$BENCH_WORK/corpus-mixed-s$SCALE" ;;
    many)  echo "$BENCH_WORK/corpus-many-n$MANY_FILES" ;;
    *) echo "run.sh: unknown corpus '$1' (mixed, many)" >&2; exit 2 ;;
  esac
}
build() { # name
  local name=$1 root; root=$(corpus_root "$name")
  if [ -f "$root/.built" ] && [ ! -e "$root/.dirty" ]; then
    echo "== corpus $name: reusing $root/$name"; return
  fi
  echo "== corpus $name: building into $root/$name"
  rm -rf "$root"; mkdir -p "$root"
  local t0=$SECONDS
  case $name in
    mixed) python3 "$SHARED/make_corpus.py" mixed "$root" --scale "$SCALE" ;;
    many)  python3 "$SHARED/make_corpus.py" many "$root" --files "$MANY_FILES" ;;
  esac
  echo "$(date -u +%FT%TZ) $(du -sb "$root/$name" | cut -f1) bytes" > "$root/.built"
  echo "   built in $((SECONDS - t0)) s, $(du -sh "$root/$name" | cut -f1)"
}
for c in $CORPORA; do build "$c"; done

# --- peers -----------------------------------------------------------------------------------
for c in $CORPORA; do
  root=$(corpus_root "$c")
  echo "== peers.sh $c (REPS=$REPS)"
  touch "$root/.dirty"
  t0=$SECONDS
  rc=0
  if [ "$c" = mixed ]; then
    BENCH_MEM_LOG="$RESULTS/$c/bunker_mem.csv" OUT="$RESULTS/$c" MUTATE=1 \
      bash "$SHARED/peers.sh" "$root" "$c" "$REPS" || rc=$?
  else
    BENCH_MEM_LOG="$RESULTS/$c/bunker_mem.csv" OUT="$RESULTS/$c" \
      bash "$SHARED/peers.sh" "$root" "$c" "$REPS" || rc=$?
  fi
  echo "   peers.sh $c: exit $rc, $((SECONDS - t0)) s"
  # peers.sh reverts the mutation after each tool; a clean finish means the corpus is pristine.
  [ $rc = 0 ] && rm -f "$root/.dirty"
done

# --- merged summary --------------------------------------------------------------------------
: > "$RESULTS/times.csv"; : > "$RESULTS/verify.csv"
for c in $CORPORA; do
  cat "$RESULTS/$c/times.csv" >> "$RESULTS/times.csv" 2>/dev/null || true
  cat "$RESULTS/$c/verify.csv" >> "$RESULTS/verify.csv" 2>/dev/null || true
done
echo
echo "== summary (all corpora) -- $RESULTS"
python3 "$SHARED/summarize.py" "$RESULTS" | tee "$RESULTS/summary.txt"
# bunker's whole-process-tree memory (reap.py's log): /usr/bin/time's peak RSS is one process's.
if ls "$RESULTS"/*/bunker_mem.csv > /dev/null 2>&1; then
  echo
  echo "== bunker peak memory of the whole process tree (main + forkserver + workers), median over reps"
  "$PY" - "$RESULTS" $CORPORA <<'PYEOF' | tee -a "$RESULTS/summary.txt"
import csv, os, statistics, sys
res, corpora = sys.argv[1], sys.argv[2:]
restic = {}
for corp, rep, tool, op, wall, usr, sys_, rss, rc in csv.reader(open(f"{res}/times.csv")):
    if tool == "restic":
        restic.setdefault((corp, op), []).append(int(rss) / 1024)
print(f"{'corpus':8} {'op':9} {'tree RSS MB':>11} {'tree PSS MB':>11} {'procs':>5} {'restic RSS':>10} {'PSS/restic':>10}")
for corp in corpora:
    path = f"{res}/{corp}/bunker_mem.csv"
    if not os.path.exists(path):
        continue
    ops: dict[str, list[tuple[int, int, int]]] = {}
    nbackup = 0
    for row in csv.reader(open(path)):
        cmd = row[5].split()
        sub = next((w for w in cmd if w in ("init", "backup", "restore", "check")), "?")
        if sub == "init":
            nbackup = 0
            continue
        if sub == "backup":
            nbackup += 1
            sub = {1: "backup", 2: "nochange"}.get(nbackup, "mutated")
        ops.setdefault(sub, []).append((int(row[1]), int(row[2]), int(row[3])))
    for op, v in sorted(ops.items()):
        r = statistics.median(x[0] for x in v) / 1024
        p = statistics.median(x[1] for x in v) / 1024
        n = max(x[2] for x in v)
        ref = restic.get((corp, op))
        rr = statistics.median(ref) if ref else 0
        print(f"{corp:8} {op:9} {r:11.0f} {p:11.0f} {n:5d} {rr:10.0f} {p / rr if rr else 0:10.2f}")
PYEOF
fi
now=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ "$now" = "$COMMIT" ] || echo "note: HEAD moved from $COMMIT to $now during the run (measured: $BUNKER)"
if awk -F, '$9 != 0' "$RESULTS/times.csv" | grep -q .; then
  echo "== FAILED ops (nonzero exit):"; awk -F, '$9 != 0' "$RESULTS/times.csv"
fi
if grep -q DIFFERS "$RESULTS/verify.csv"; then
  echo "== restores that differ from the source:"; grep DIFFERS "$RESULTS/verify.csv"
fi
