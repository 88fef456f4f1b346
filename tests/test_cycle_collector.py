"""The cycle collector's policy (bunker/cycle_collector.py) in the command and in its workers:
what was imported is frozen, the youngest generation is collected after 100,000 allocations
instead of 700, and cyclic garbage still goes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from bunker import cycle_collector

WANTED = (cycle_collector.GEN0_THRESHOLD, cycle_collector.GEN1_THRESHOLD, cycle_collector.GEN2_THRESHOLD)


def _run(code: str) -> str:
    cp = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert cp.returncode == 0, cp.stderr[-3000:]
    return cp.stdout


def test_the_command_and_its_workers_run_under_the_policy() -> None:
    out = _run(
        """
        import gc
        from bunker.cli import main as cli_main
        from bunker.process_pool import process_pool

        called = []
        cli_main.cli = lambda **kw: called.append(kw)  # the command's start, without a command
        cli_main.main()
        assert called, "main did not reach the command"
        print(gc.get_threshold(), gc.get_freeze_count() > 1000)
        pool = process_pool(1, "os", int, (0,))
        print(pool.submit(gc.get_threshold).result(timeout=60), pool.submit(gc.get_freeze_count).result() > 1000)
        pool.shutdown(wait=True)
        """
    )
    main_line, worker_line = out.splitlines()
    assert main_line == f"{WANTED} True"
    assert worker_line == f"{WANTED} True"


def test_cyclic_garbage_is_still_collected() -> None:
    out = _run(
        """
        import gc, weakref
        from bunker import cycle_collector

        cycle_collector.tune()

        class Node:
            pass

        refs = []
        for _ in range(1000):  # 1000 cycles, each of two objects and their dicts
            a, b = Node(), Node()
            a.other, b.other = b, a
            refs.append(weakref.ref(a))
            del a, b
        junk = [[i] for i in range(cycle_collector.GEN0_THRESHOLD + 10)]  # enough to start a run
        print(sum(r() is not None for r in refs))
        """
    )
    assert out.strip() == "0"
