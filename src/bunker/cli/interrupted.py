"""What each command says when SIGINT (Ctrl-C) or SIGTERM stopped it: what the stop means for
its work and the next step (docs/user-guide.md, "Exit codes")."""

from __future__ import annotations

import click

from bunker.cli.output import Output
from bunker.interrupt import Interrupted, signal_name

# command (as typed after `bunker`) -> (what the stop left behind, next step)
MESSAGES: dict[str, tuple[str, str]] = {
    "backup": (
        "the backup stopped before it stored anything of its own; no snapshot was written",
        "run the same backup again",
    ),
    "restore": (
        "the restore stopped before it finished: the files restored so far are in the target, the others are "
        "missing or incomplete",
        "run the same `bunker restore` command again to restore everything",
    ),
    "prune": (
        "prune stopped before it finished; nothing a snapshot needs was deleted, and its lease is released",
        "run `bunker prune` again to finish: it goes on from what is recorded in the repository",
    ),
    "check": (
        "the check stopped before it finished: no result, and nothing was changed",
        "run the same `bunker check` again (it starts from the beginning)",
    ),
    "verify": (
        "verify stopped before it finished: no result, and nothing was changed",
        "run the same `bunker verify` again",
    ),
    "forward": (
        "forward stopped before it finished: the backups not delivered yet stay in the local spool, the "
        "delivered ones are in the repository; its lease is released",
        "run `bunker forward` again (every backup also tries first)",
    ),
    "forget": (
        "forget stopped before it finished: the snapshots it retired so far stay retired, the others are untouched",
        "run the same `bunker forget` again (`--dry-run` shows what it would still do)",
    ),
    "export-tar": (
        "export-tar stopped before it finished: the archive written so far is incomplete",
        "delete it and run the same `bunker export-tar` again",
    ),
    "sync": (
        "sync stopped before it finished: what it copied is complete and consistent in the mirror (objects are "
        "written whole, data before what names it), the rest is missing there",
        "run the same `bunker sync` again: it copies only what the mirror still lacks",
    ),
    "compare": ("the comparison stopped: no result, and nothing was changed", "run the same `bunker compare` again"),
    "snapshots": ("the listing stopped; nothing was changed", "run it again"),
    "ls": ("the listing stopped; nothing was changed", "run it again"),
}


def command_name() -> str:
    """The running command as typed after `bunker` (e.g. "key export")."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return ""
    return ctx.command_path.partition(" ")[2] or ctx.command_path


def report(out: Output, exc: KeyboardInterrupt) -> int:
    """Say what the interrupt meant for the running command; return the exit code (130 for
    SIGINT, 143 for SIGTERM)."""
    if not isinstance(exc, Interrupted):
        exc = Interrupted(2)  # a KeyboardInterrupt raised by Python's own handler: Ctrl-C
    name = command_name()
    message, hint = MESSAGES.get(
        name, (f"`bunker {name}` stopped before it finished", f"run `bunker {name}` again to complete it")
    )
    if exc.message:
        message, hint = exc.message, exc.hint
    what = signal_name(exc.signum)
    out.document(
        {"error": f"interrupted by {what}: {message}", "hint": hint, "exit_code": exc.exit_code, "interrupted": what}
    )
    click.echo(f"bunker: interrupted by {what}: {message}", err=True)
    if hint:
        click.echo(f"  next step: {hint}", err=True)
    return exc.exit_code
