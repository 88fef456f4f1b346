"""The forkserver of bunker's worker pools does not print the failure of a worker whose command
was stopped while the worker was being handed its task (src/bunker/forkserver_quiet.py), and
prints every other failure."""

from __future__ import annotations

import subprocess
import sys

CASES = r"""
import sys
import bunker.forkserver_quiet

def raised(code, module):
    scope = {"__name__": module}
    try:
        exec(code, scope)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        sys.stderr.write("--\n")

raised("raise FileNotFoundError(2, 'No such file or directory')", "multiprocessing.synchronize")  # semaphore gone
raised("raise EOFError('Ran out of input')", "multiprocessing.spawn")  # pipe closed
raised("raise ValueError('a bug in the hand-over')", "multiprocessing.spawn")
raised("raise FileNotFoundError(2, 'in a worker')", "bunker.restore.workers")
"""


def test_only_failures_of_the_hand_over_are_quiet() -> None:
    out = subprocess.run([sys.executable, "-c", CASES], capture_output=True, text=True, check=True).stderr
    parts = out.split("--\n")
    assert parts[0] == "" and parts[1] == "", out
    assert "ValueError: a bug in the hand-over" in parts[2], out
    assert "FileNotFoundError" in parts[3] and "in a worker" in parts[3], out
