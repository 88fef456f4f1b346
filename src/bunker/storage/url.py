"""Turn a repository URL into a backend.

Anything that starts like a URL (``scheme:``) is parsed as one or refused: a typo such as
``sftp:/user@host/x`` must never become a local directory of that name. A local directory is a
path (``/srv/repo``, ``./repo``, ``repo``) or a ``file://`` URL; one whose first component holds a
colon is written with ``./`` in front.
"""

from __future__ import annotations

import os
import re
from typing import NoReturn
from urllib.parse import unquote, urlparse

from bunker.errors import BunkerError, ExitCode
from bunker.storage.backend import Backend
from bunker.storage.local import LocalBackend
from bunker.storage.node_path import split_node_path

OBJECT_STORE_SCHEMES = ("s3", "gcs", "azblob", "b2", "webdav+http", "webdav+https")
SCHEMES = ("file", *OBJECT_STORE_SCHEMES, "sftp", "ssh", "unix")
KNOWN_FORMS = (
    "a local path (/path or ./path), file:///path, s3://, gcs://, azblob://, b2://, webdav+https://, "
    "sftp://user@host/path, ssh://user@host/path or unix:///path.sock"
)
# RFC 3986 scheme, then the colon: what a reader takes for the start of a URL
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _refuse(url: str, problem: str, hint: str, what: str = "repository") -> NoReturn:
    raise BunkerError(f"{what} {url!r} {problem}", hint, exit_code=ExitCode.USAGE)


def local_path(url: str, *, what: str = "repository") -> str | None:
    """The local directory ``url`` names (a path or a ``file://`` URL), None for a URL of
    another scheme; refuses what looks like a URL but is not one bunker knows (exit 2).
    ``what`` names the place in messages (a link's mailbox takes the same URLs)."""
    m = _SCHEME.match(url)
    if m is None:
        return url
    scheme = m.group(1).lower()
    rest = url[m.end() :]
    if not rest.startswith("//"):
        if scheme in SCHEMES:
            fixed = f"{scheme}://{rest.lstrip('/')}" if scheme != "file" else f"file:///{rest.lstrip('/')}"
            _refuse(
                url,
                f"is a {scheme}:// URL that lacks the '//' after '{scheme}:'",
                f"did you mean {fixed!r}? For a local directory of that name write ./{url}",
                what,
            )
        _refuse(
            url,
            f"starts like a URL (scheme {scheme!r}) that this bunker does not know",
            f"use {KNOWN_FORMS}; an ssh server's directory is sftp://user@host/path, not host:path; for a local "
            f"directory of that name write ./{url}",
            what,
        )
    if scheme not in SCHEMES:
        _refuse(url, f"has the URL scheme {scheme!r}, which this bunker does not support", f"use {KNOWN_FORMS}", what)
    if scheme != "file":
        return None
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        _refuse(
            url,
            "is not a local file:// URL",
            "a file URL names an absolute path on this machine: file:///path (three slashes)",
            what,
        )
    return unquote(parsed.path)


def open_backend(url: str, *, create: bool = False) -> Backend:
    """Open the backend for ``url``: a path, a ``file://``, object-store (``s3://``, ``gcs://``,
    ``azblob://``, ``b2://``, ``webdav+https://``), ``sftp://``, ``ssh://`` or ``unix://`` URL."""
    path = local_path(url)
    if path is not None:
        if split_node_path(path) is not None:
            # a node directory: its own server takes the writes (storage/node_path.py)
            from bunker.storage.remote import RemoteBackend
            from bunker.storage.remote_link import RemoteLocation

            return RemoteBackend(RemoteLocation("node", os.path.abspath(path)), create=create)
        return LocalBackend(path, create=create)
    scheme = urlparse(url).scheme.lower()
    if scheme in OBJECT_STORE_SCHEMES:
        from bunker.storage.services import open_object_store  # OpenDAL is loaded only when used

        return open_object_store(url, create=create)
    if scheme == "sftp":
        from bunker.storage.sftp import open_sftp  # asyncssh is loaded only when used

        return open_sftp(url, create=create)
    from bunker.storage.remote import open_remote  # ssh:// and unix://: a `bunker serve` (storage/remote.py)

    return open_remote(url, create=create)
