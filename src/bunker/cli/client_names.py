"""The names a user gives a client and its host, checked before anything is written (apart from
cmd_clients.py so that `backup`, which checks them when it creates a repository, does not load
the key commands)."""

from __future__ import annotations

from bunker.errors import BunkerError, ExitCode
from bunker.repo.certs import MAX_HOST

MAX_CLIENT_NAME = 128


def check_client_name(name: str) -> str:
    """A client name is printed in listings and stored in certificates: printable, no slash."""
    if not name or len(name) > MAX_CLIENT_NAME or not name.isprintable() or "/" in name or name != name.strip():
        raise BunkerError(
            f"client name {name!r} is not usable",
            f"use 1 to {MAX_CLIENT_NAME} printable characters without '/' or leading/trailing spaces "
            "(a pseudonym is best: the name is public)",
            exit_code=ExitCode.USAGE,
        )
    return name


def check_host_name(host: str) -> str:
    """A host name is sealed in a certificate: printable, at most MAX_HOST bytes."""
    if not host or len(host.encode()) > MAX_HOST or not host.isprintable():
        raise BunkerError(
            f"host name {host!r} is not usable", f"use 1 to {MAX_HOST} printable bytes", exit_code=ExitCode.USAGE
        )
    return host
