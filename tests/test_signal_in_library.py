"""A signal that lands inside a library call that swallows exceptions (interrupt.py,
raised_count): cryptography's HPKE decryption turned a Ctrl-C raised inside it into InvalidTag,
so a check or restore stopped at that moment reported the snapshot or pack key as "does not
open with the master key" (a false damage report, exit 14) and went on instead of stopping."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# runs in a process of its own: signal handlers belong to the main thread of the process
SCRIPT = textwrap.dedent(
    """
    import collections, os, random, signal, time
    from bunker import interrupt
    from bunker.crypto.kem import DataPrivateKey, OpenFailed

    key = DataPrivateKey(os.urandom(32))
    sealed = key.public().seal(b"k" * 32, b"info")
    assert key.open(sealed, b"info") == b"k" * 32
    # a real SIGTERM at a random moment of each round: a one-shot timer's SIGALRM handler sends
    # it (a thread could not: the decryption holds the interpreter lock), and bunker's handler
    # raises Interrupted wherever the main thread is, as it does for a `kill`
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    seen = collections.Counter()
    interrupt.install()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and seen["interrupted"] < 200:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.00001 + random.random() * 0.0003)
            try:
                key.open(sealed, b"info")
                seen["opened"] += 1
            except OpenFailed:
                seen["open-failed"] += 1
            except interrupt.Interrupted:
                seen["interrupted"] += 1
                continue
            time.sleep(0.005)  # the round's signal lands here, if not in the opening
        except interrupt.Interrupted:
            seen["after"] += 1
    print(seen["interrupted"], seen["open-failed"])
    """
)


def test_a_signal_inside_an_hpke_decryption_stops_and_is_never_a_failed_open() -> None:
    cp = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 0, cp.stderr
    interrupted, failed = (int(x) for x in cp.stdout.split())
    assert interrupted > 0  # the signals did land while keys opened
    assert failed == 0  # ... and none was taken for a key that does not open
