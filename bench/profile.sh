#!/usr/bin/env bash
# Profile one bunker operation on a benchmark corpus with py-spy (all processes: main, forkserver
# workers), then print the top functions (bench/pyspy_top.py).
#
# usage: bench/profile.sh CORPUS OP      CORPUS: mixed | many; OP: backup | nochange | restore | check
#   Corpora come from bench/run.sh's work dir (build them first: `CORPORA=many bench/run.sh` or a
#   full run); the same SCALE / MANY_FILES select which one. The repository state an OP needs is
#   prepared untimed and unprofiled (init; plus one backup for nochange, restore and check).
# Env: SCALE, MANY_FILES, BENCH_WORK as for run.sh; RATE (py-spy samples/s, default 100);
#      IDLE=1 also samples threads that wait (wall-clock view); BUNKER_SRC (default: the pinned
#      tree of HEAD that run.sh uses, else /work/main/src); OUTDIR (default $BENCH_WORK/profiles).
# Output: $OUTDIR/CORPUS-OP.txt (py-spy raw, collapsed stacks: load it in speedscope.app or
# flamegraph.pl) and CORPUS-OP.top.txt (the summary printed). Needs `pip install py-spy`.
set -euo pipefail
CORP=$1 OP=$2
HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/.." && pwd)
BENCH_WORK=${BENCH_WORK:-/dev/shm/bunker-bench}
SCALE=${SCALE:-1.0} MANY_FILES=${MANY_FILES:-200000}
case $CORP in
  mixed) ROOT=$BENCH_WORK/corpus-mixed-s$SCALE ;;
  many)  ROOT=$BENCH_WORK/corpus-many-n$MANY_FILES ;;
  *) echo "corpus: mixed or many" >&2; exit 2 ;;
esac
[ -f "$ROOT/.built" ] || { echo "no corpus at $ROOT: run bench/run.sh first" >&2; exit 2; }
COMMIT=$(git -C "$REPO_ROOT" rev-parse --short HEAD)
SRC=${BUNKER_SRC:-$BENCH_WORK/pin-$COMMIT/src}
[ -d "$SRC/bunker" ] || SRC=$REPO_ROOT/src
PY=$(python3 -c 'import sys; print(sys.executable)')
OUTDIR=${OUTDIR:-$BENCH_WORK/profiles}; mkdir -p "$OUTDIR"
W=$(mktemp -d "$BENCH_WORK/prof.XXXXXX"); trap 'rm -rf "$W"' EXIT
export PYTHONPATH=$SRC BUNKER_PASSPHRASE=benchpass
export XDG_CACHE_HOME=$W/cache XDG_CONFIG_HOME=$W/config XDG_DATA_HOME=$W/data
B=("$PY" -c 'import sys; sys.argv[0] = "bunker"; from bunker.cli.main import main; main()')
"${B[@]}" init --repo "$W/repo" > /dev/null 2>&1
if [ "$OP" != backup ]; then (cd "$ROOT" && "${B[@]}" backup --repo "$W/repo" "$CORP" > /dev/null 2>&1); fi
case $OP in
  backup|nochange) CMD=(backup --repo "$W/repo" "$CORP"); find "$ROOT/$CORP" -type f -print0 | xargs -0 cat > /dev/null ;;
  restore) mkdir -p "$W/dest"; CMD=(restore --repo "$W/repo" latest --target "$W/dest") ;;
  check)   CMD=(check --repo "$W/repo" --read-data) ;;
  *) echo "op: backup | nochange | restore | check" >&2; exit 2 ;;
esac
echo "profiling: bunker ${CMD[*]} (src $SRC, in $ROOT)"
extra=(); [ "${IDLE:-0}" = 1 ] && extra+=(--idle)
cd "$ROOT"
t0=$(date +%s.%N)
py-spy record --subprocesses --threads --rate "${RATE:-100}" --format raw "${extra[@]}" \
  -o "$OUTDIR/$CORP-$OP.txt" -- "${B[@]}" "${CMD[@]}" > "$W/out" 2>&1 || { cat "$W/out"; exit 1; }
echo "wall under py-spy: $(echo "$(date +%s.%N) - $t0" | bc) s"
grep -v '^py-spy>' "$W/out" | tail -n 3
"$PY" "$HERE/pyspy_top.py" "$OUTDIR/$CORP-$OP.txt" "${TOP:-25}" | tee "$OUTDIR/$CORP-$OP.top.txt"
