"""Turn a repository URL into a backend."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from bunker.errors import BunkerError, ExitCode
from bunker.storage.backend import Backend
from bunker.storage.local import LocalBackend


def open_backend(url: str, *, create: bool = False) -> Backend:
    """Open the backend for ``url``: a path or ``file://`` URL (other schemes come later)."""
    if "://" not in url:
        return LocalBackend(url, create=create)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBackend(unquote(parsed.path), create=create)
    raise BunkerError(
        f"repository URL scheme {parsed.scheme!r} is not supported by this version",
        "use a local path or file:///path",
        exit_code=ExitCode.USAGE,
    )
