"""SIGINT and SIGTERM: a command that is told to stop ends its work in order (docs/user-guide.md,
"Exit codes" and "Interrupted backups").

While the command starts (imports, option parsing) nothing has been written, so a signal ends
the process at once, quietly, with 128 + the signal's number (:func:`quiet_start`). Once the
command runs (:func:`install`), a signal raises :class:`Interrupted` in the main thread, so
``finally`` blocks release leases and shut worker pools down. Work that must not be cut in the
middle runs under :func:`deferred`: there the first signal is only recorded, for the work to
act on at its next safe point (a backup checkpoints what it finished and commits it), and a
second one raises at once. Leaving the outermost deferred region raises a recorded signal
nobody took (:func:`take`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command was told to stop by ``signum``. A KeyboardInterrupt, so code that already
    treats Ctrl-C as "stop" (asyncio, click, ``except KeyboardInterrupt``) treats SIGTERM alike,
    and ``except Exception`` never swallows it. ``forced``: a second signal while the first was
    being acted on. ``message`` and ``hint``: what the stop meant for this command's work, when
    the code that stopped knows better than the command's general message."""

    def __init__(self, signum: int, *, forced: bool = False, message: str = "", hint: str = "") -> None:
        super().__init__(signal_name(signum))
        self.signum = signum
        self.forced = forced
        self.message = message
        self.hint = hint

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a command a signal ended (130, 143)."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_depth = 0  # how many deferred regions the main thread is in
_pending: int | None = None  # the signal received in a deferred region, not acted on yet
_raised = 0  # how many times a handler raised Interrupted (see raised_count)
_last_raised: int = signal.SIGTERM  # the signal of the last one


def quiet_start() -> None:
    """Until :func:`install`: a signal ends the process at once with 128 + its number and one
    line on stderr, never a traceback (nothing has been done yet). Only from the main thread
    (the only one Python lets set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _exit_now)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"bunker: interrupted by {signal_name(signum)} while starting; nothing was done\n".encode())
    os._exit(128 + signum)


def install() -> None:
    """From now on SIGINT and SIGTERM raise :class:`Interrupted` (or are recorded, see
    :func:`deferred`)."""
    global _depth, _pending
    _depth, _pending = 0, None
    for sig in SIGNALS:
        signal.signal(sig, _raise)


def ignore() -> None:
    """From now on SIGINT and SIGTERM are ignored: the command's work is over and it is exiting
    with its own exit code (Python would otherwise restore the default handlers while it shuts
    down, and a signal then would kill the process instead)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _raise(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth > 0 and _pending is None:
        _pending = signum
        return
    note_raised(signum)
    raise Interrupted(signum, forced=_pending is not None)


def note_raised(signum: int) -> None:
    """Count an :class:`Interrupted` a signal handler is about to raise (see :func:`raised_count`)."""
    global _raised, _last_raised
    _raised += 1
    _last_raised = signum


def raised_count() -> int:
    """How many times a signal handler has raised :class:`Interrupted` in this process. A handler
    runs wherever the main thread is, even inside a library's call, and a library may turn the
    exception into an error of its own: cryptography's HPKE decryption reports any exception
    raised inside it as InvalidTag, so a Ctrl-C while a snapshot's key opened read as "does not
    open with the master key", a false damage report, and the stop was lost. Code around such a
    call takes this count before and calls :func:`raise_if_raised_since` when the call failed."""
    return _raised


def raise_if_raised_since(count: int) -> None:
    """Raise :class:`Interrupted` again if a signal handler raised one since :func:`raised_count`
    was ``count``: the failure the caller caught was that stop, not a finding."""
    if _raised != count:
        raise Interrupted(_last_raised)


def pending() -> int | None:
    """The signal received in a deferred region and not taken yet."""
    return _pending


def take() -> int | None:
    """The pending signal, which is then no longer pending (the caller acts on it)."""
    global _pending
    signum, _pending = _pending, None
    return signum


@contextlib.contextmanager
def deferred(absorb: bool = False) -> Iterator[None]:
    """Within: the first signal is recorded (:func:`pending`), a second one raises
    :class:`Interrupted` (``forced``). Leaving the outermost region without an exception raises
    a recorded signal nobody took, unless ``absorb`` (the command is ending anyway); an exception
    leaving it drops the signal too. Signals reach the main thread only: elsewhere (a worker
    thread refreshing a lease) this does nothing."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        if _depth == 0:
            take()
        raise
    _depth -= 1
    if _depth == 0:
        signum = take()
        if signum is not None and not absorb:
            raise Interrupted(signum)
