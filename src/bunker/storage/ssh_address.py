"""Where an ssh-reached repository is: ``scheme://[user@]host[:port]/path`` for ``sftp://`` and
``ssh://`` alike (``/path`` absolute, ``/~/path`` below the login directory). One parser and one
canonical form, so both backends refuse the same mistakes with the same words."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote

from bunker.errors import BunkerError, ExitCode


def ssh_dir() -> str:
    """The ``~/.ssh`` of this user for both ``ssh://`` and ``sftp://``: in the home directory of
    the user's passwd entry, where OpenSSH reads it whatever $HOME says (so `ssh user@host` tests
    exactly what bunker uses, and a root shell that kept another user's $HOME does not trust that
    user's files). Without a passwd entry (a container's bare uid), $HOME."""
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        home = os.path.expanduser("~")
    return os.path.join(home, ".ssh")


@dataclass(frozen=True)
class SshAddress:
    """Host, port and user to log in with (None: ~/.ssh/config or the defaults decide), and the
    repository directory on the server."""

    host: str
    port: int | None
    user: str | None
    path: str

    def canonical(self, scheme: str) -> str:
        """The canonical URL: what messages show and worker processes reopen."""
        user = quote(self.user, safe="") + "@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        path = self.path if self.path.startswith("/") else "/~" + ("" if self.path == "." else "/" + self.path)
        return f"{scheme}://{user}{_bracketed(self.host)}{port}{quote(path, safe='/~')}"

    @property
    def host_port(self) -> str:
        host = _bracketed(self.host)
        return f"{host}:{self.port}" if self.port is not None else host

    @property
    def shown_path(self) -> str:
        """The directory as people write it (``~/backups`` for one below the login directory)."""
        return self.path if self.path.startswith("/") else "~/" + ("" if self.path == "." else self.path)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_ssh_address(parts: SplitResult, url: str, hint: str) -> SshAddress:
    """The address of an already split ``sftp://`` or ``ssh://`` URL; a usage error (``hint``
    says the URL form) for anything that could not be meant or would reach ssh as an option."""

    def usage(message: str, next_step: str = hint) -> BunkerError:
        return BunkerError(message, next_step, exit_code=ExitCode.USAGE)

    if parts.password is not None:
        raise usage(
            "a password does not belong in the repository URL",
            "remove it: ssh logs in with your keys (ssh-agent, ~/.ssh/id_*, or BUNKER_SSH_IDENTITY)",
        )
    host = parts.hostname or ""
    if not host or host.startswith("-") or any(c.isspace() or ord(c) < 32 or c in "/\\" for c in host):
        raise usage(f"{url!r} names no usable host")
    try:
        port = parts.port
    except ValueError:
        raise usage(f"the port of {url!r} is not a number from 1 to 65535") from None
    if port == 0:
        raise usage(f"the port of {url!r} is not a number from 1 to 65535")
    user = unquote(parts.username) if parts.username else None
    if user is not None and (user.startswith("-") or any(c.isspace() or ord(c) < 32 for c in user)):
        raise usage(f"the user name in {url!r} is not usable")
    segments = [s for s in unquote(parts.path).split("/") if s]
    relative = bool(segments) and segments[0] == "~"
    if relative:
        segments = segments[1:]
    for s in segments:
        if s in (".", "..", "~") or any(ord(c) < 32 or c == "\\" for c in s):
            raise usage(f"the path {parts.path!r} of {url!r} is not usable", "use plain names separated by /")
    if relative:
        path = "/".join(segments) or "."
    else:
        if not segments:
            raise usage(f"{url!r} names no directory for the repository")
        path = "/" + "/".join(segments)
    return SshAddress(host, port, user, path)
