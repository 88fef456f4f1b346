#!/usr/bin/env python3
"""Summarize a py-spy `--format raw` profile (collapsed stacks): top functions by self and by
inclusive samples, as % of all samples.

usage: pyspy_top.py PROFILE.txt [N] [--filter SUBSTR]
  --filter keeps only stacks containing SUBSTR (e.g. a thread or process name, or a function).
Stacks look like `process 123:"python ...";thread (0x7f..);func (file.py:12);... COUNT` with
py-spy's --subprocesses (-s) / --threads, or plain `func (file.py:12);... COUNT`.
"""
import re
import sys
from collections import Counter

PROC = re.compile(r'^process (?P<pid>\d+):"(?P<cmd>.*?)";(?=thread \(|[^;]* \([^()]*\);)')


def proc_kind(cmd: str) -> str:
    if "forkserver" in cmd:
        return "forkserver child (worker)"
    return "main: " + cmd[-90:]


FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str, with_line: bool) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m["file"]
    for cut in ("/site-packages/", "/src/", "/lib/python3.11/"):
        if cut in f:
            f = f.split(cut, 1)[1]
            break
    return f"{m['fn']} ({f}:{m['line']})" if with_line and m["line"] else f"{m['fn']} ({f})"


def main() -> None:
    args = [a for a in sys.argv[1:]]
    flt = None
    if "--filter" in args:
        i = args.index("--filter")
        flt = args[i + 1]
        del args[i : i + 2]
    path = args[0]
    n = int(args[1]) if len(args) > 1 else 25
    self_c: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    procs: Counter[str] = Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, cnt = line.rpartition(" ")
        if flt and flt not in stack:
            continue
        c = int(cnt)
        total += c
        # `process PID:"command line";` (the command line may itself hold ';' and '"')
        m = PROC.match(stack)
        if m:
            procs[proc_kind(m["cmd"])] += c
            stack = stack[m.end() :]
        frames = [f for f in stack.split(";") if f and not f.startswith("thread (")]
        if not frames:
            continue
        self_c[short(frames[-1], False)] += c
        self_line[short(frames[-1], True)] += c
        for fn in {short(f, False) for f in frames}:
            incl[fn] += c
    print(f"{total} samples in {path}" + (f" (filter {flt!r})" if flt else ""))
    if procs:
        print("\nby process:")
        for p, c in procs.most_common(8):
            print(f"  {100 * c / total:5.1f}%  {p}")
    print(f"\ntop {n} by self time (function, innermost frame):")
    for fn, c in self_c.most_common(n):
        print(f"  {100 * c / total:5.1f}%  {fn}")
    print(f"\ntop {n} self lines:")
    for fn, c in self_line.most_common(n):
        print(f"  {100 * c / total:5.1f}%  {fn}")
    print(f"\ntop {n} inclusive (function anywhere on the stack):")
    for fn, c in incl.most_common(n):
        print(f"  {100 * c / total:5.1f}%  {fn}")


if __name__ == "__main__":
    main()
