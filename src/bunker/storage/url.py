"""Turn a repository URL into a backend."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from bunker.errors import BunkerError, ExitCode
from bunker.storage.backend import Backend
from bunker.storage.local import LocalBackend


def open_backend(url: str, *, create: bool = False) -> Backend:
    """Open the backend for ``url``: a path, a ``file://``, ``s3://`` or ``sftp://`` URL."""
    if "://" not in url:
        return LocalBackend(url, create=create)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBackend(unquote(parsed.path), create=create)
    if parsed.scheme == "s3":
        from bunker.storage.object_store import open_s3  # OpenDAL is loaded only when used

        return open_s3(url, create=create)
    if parsed.scheme == "sftp":
        from bunker.storage.sftp import open_sftp  # asyncssh is loaded only when used

        return open_sftp(url, create=create)
    raise BunkerError(
        f"repository URL scheme {parsed.scheme!r} is not supported by this version",
        "use a local path, file:///path, s3://bucket/prefix or sftp://user@host/path (other object stores come later)",
        exit_code=ExitCode.USAGE,
    )
