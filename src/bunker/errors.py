"""Exceptions that carry a message for the user, a hint for the next step and an exit code.

Every layer raises these (or subclasses); the CLI prints ``message`` and ``hint`` and exits with
``exit_code``. The codes are documented in README.md and must stay stable: scripts rely on them.
"""

from __future__ import annotations


class ExitCode:
    """Process exit codes (documented in README.md)."""

    OK = 0  # run level ok or note
    WARN = 1  # run finished at level warn
    USAGE = 2  # bad command line (click's own code)
    ERR = 3  # run finished at level err: backup taken, some items missing
    FATAL = 4  # nothing was done (generic failure)
    DIFFERENT = 5  # compare: the two copies of a repository differ (or a snapshot in them is untrusted)
    REQUESTED = 6  # restore: data a node evicted was requested from its upstream; rerun when it has arrived
    NEED_PASSPHRASE = 10  # a passphrase is needed and there is no tty nor BUNKER_PASSPHRASE
    BAD_PASSPHRASE = 11  # the passphrase does not open the master key
    KEY_MISSING = 12  # the needed key file is not there, or a put key was given where the master is needed
    NO_REPOSITORY = 13  # the repository does not exist or cannot be reached
    INTEGRITY = 14  # check/verify found damaged, missing or forged objects
    BAD_REPOSITORY = 15  # the repository or a key file is not usable (wrong format, wrong id)


class BunkerError(Exception):
    """A failure with a user-facing message and the exact next step."""

    exit_code: int = ExitCode.FATAL

    def __init__(self, message: str, hint: str = "", *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class StorageError(BunkerError):
    """The storage could not be used (unreachable, refused, full, failing): no finding about the
    repository's contents. Checks stop on it instead of reporting objects as damaged."""


class CorruptObject(BunkerError):
    """A repository object is truncated, altered, forged or malformed."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, name: str, problem: str, hint: str = "") -> None:
        self.object_name = name
        self.problem = problem
        super().__init__(
            f"object {name} is damaged: {problem}",
            hint
            or "run `bunker check` to see every damaged object; a mirror or an older snapshot may still hold the data",
        )


class ObjectMissing(BunkerError):
    """A repository object that should exist is not there."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, name: str, hint: str = "") -> None:
        self.object_name = name
        super().__init__(
            f"object {name} is missing from the repository",
            hint or "run `bunker check` to see what else is missing; a mirror may still hold it",
        )


class DeletedUpstream(ObjectMissing):
    """An object the node a client reads through evicted, which the repository of record
    deleted since (a signed condemnation record says so): the request for it ended."""

    def __init__(self, name: str, node: str, why: str) -> None:
        super().__init__(name)
        self.message = (
            f"object {name} is not held by node {node!r} (evicted, or only listed there), and it is gone for "
            f"good: {why}"
        )
        self.hint = (
            "restore another snapshot (`bunker snapshots` lists those that are not forgotten); a mirror kept with "
            "`bunker sync` may still hold it"
        )
        self.args = (self.message,)


class RequestedUpstream(ObjectMissing):
    """An object the node a client reads through evicted (the repository of record holds it):
    the node requested it from its upstream and the client reruns once it has arrived."""

    exit_code = ExitCode.REQUESTED

    def __init__(self, name: str, node: str, why: str, route: list[str]) -> None:
        super().__init__(name)
        self.message = (
            f"object {name} is not held by node {node!r} (evicted, or only listed there; the repository of record "
            "holds it); the node requested it "
            f"from {', '.join(repr(r) for r in route) or 'its upstreams'}: {why}"
        )
        self.hint = (
            f"run the command again once it has arrived; `bunker node requests DIR` on node {node!r} lists the "
            "request, and its next `bunker node forward` (or its daemon) asks again"
        )
        self.args = (self.message,)


class KeyRequired(BunkerError):
    """The operation needs a key that is not available (e.g. the master key for restore)."""

    exit_code = ExitCode.KEY_MISSING
