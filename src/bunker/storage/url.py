"""Turn a repository URL into a backend."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from bunker.errors import BunkerError, ExitCode
from bunker.storage.backend import Backend
from bunker.storage.local import LocalBackend


def open_backend(url: str, *, create: bool = False) -> Backend:
    """Open the backend for ``url``: a path, a ``file://``, object-store (``s3://``, ``gcs://``,
    ``azblob://``, ``b2://``, ``webdav+https://``) or ``sftp://`` URL."""
    if "://" not in url:
        return LocalBackend(url, create=create)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBackend(unquote(parsed.path), create=create)
    if parsed.scheme in ("s3", "gcs", "azblob", "b2", "webdav+http", "webdav+https"):
        from bunker.storage.services import open_object_store  # OpenDAL is loaded only when used

        return open_object_store(url, create=create)
    if parsed.scheme == "sftp":
        from bunker.storage.sftp import open_sftp  # asyncssh is loaded only when used

        return open_sftp(url, create=create)
    if parsed.scheme in ("ssh", "unix"):
        from bunker.storage.remote import open_remote  # a `bunker serve` (storage/remote.py)

        return open_remote(url, create=create)
    raise BunkerError(
        f"repository URL scheme {parsed.scheme!r} is not supported by this version",
        "use a local path, file:///path, s3://, gcs://, azblob://, b2://, webdav+https://, sftp://user@host/path, "
        "ssh://user@host/path or unix:///path.sock",
        exit_code=ExitCode.USAGE,
    )
