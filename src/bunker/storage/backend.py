"""The backend interface: the security boundary for object names.

A backend stores opaque objects under names such as ``packs/<64 hex>``. It knows nothing about
keys or formats. Every name is validated here, before any implementation sees it, so a
malicious name read from an untrusted object (``../../etc/passwd``) can never reach a filesystem
call or an URL.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from bunker.errors import BunkerError

# Top-level prefixes of a repository (DESIGN.md §3) plus the fixed plaintext documents.
PREFIXES = ("config", "clients", "packs", "index", "refs", "snapshots", "retired", "sessions", "gc")
FIXED_NAMES = ("RECOVERY.md", "FORMAT.md")
_LEAF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidName(BunkerError):
    """An object name outside the repository's namespace."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise InvalidName.

    Valid: one of FIXED_NAMES, or ``<prefix>/<leaf>`` with a known prefix and a leaf of letters,
    digits, dot, dash and underscore (no leading dot), at most 128 characters.
    """
    if name in FIXED_NAMES:
        return name
    prefix, sep, leaf = name.partition("/")
    if not sep or prefix not in PREFIXES or not _LEAF.match(leaf):
        raise InvalidName(
            f"refused object name {name!r}: not a valid repository object name",
            "the repository or a value read from it is damaged or malicious; run `bunker check`",
        )
    return name


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: a known top-level prefix followed by '/'."""
    if not prefix.endswith("/") or prefix[:-1] not in PREFIXES:
        raise InvalidName(f"refused listing prefix {prefix!r}", "this is a bug in bunker; please report it")
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or stat tells about one object.

    ``mtime`` is the storage's own time for the object (seconds since the epoch): lease ages are
    judged by it, never by a client clock.
    """

    name: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the basic interface; nothing may depend on these."""

    create_if_absent: bool = False
    server_side_time: bool = True
    # Reading this many unwanted bytes costs less than one more request: neighbouring range reads
    # closer than this are merged (a local disk: small; an object store: a few MiB).
    range_merge_gap: int = 256 << 10
    # Requests have a round-trip cost (network): batch work even for small jobs.
    remote: bool = False
    # The listing shows only part of the repository (a spool while the upstream is unreachable):
    # an absent object proves nothing.
    partial: bool = False


class Backend(ABC):
    """Object store interface: put, get (a range), list a prefix, delete, stat.

    Implementations must make ``put`` atomic (a reader never sees a partial object) and durable
    once it returns. Names reaching the ``_``-prefixed hooks have already been validated.
    """

    url: str = ""

    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> bool:
        """Store ``data`` under ``name``. With ``if_absent``, return False (and write nothing)
        when the object already exists; otherwise return True."""
        return self._put(validate_name(name), data, if_absent)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes, or ``length`` bytes from ``offset`` (negative offset:
        from the end). Raises ObjectMissing when it does not exist."""
        return self._get(validate_name(name), offset, length)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object whose name starts with ``prefix`` (e.g. ``packs/``)."""
        for info in self._list(validate_prefix(prefix)):
            try:
                validate_name(info.name)
            except InvalidName:
                continue  # foreign files (editor backups, temp files) are not objects
            yield info

    def delete(self, name: str) -> None:
        """Remove an object; deleting a missing object is not an error."""
        self._delete(validate_name(name))

    def stat(self, name: str) -> ObjectInfo | None:
        """Return the object's info, or None when it does not exist."""
        return self._stat(validate_name(name))

    def exists(self, name: str) -> bool:
        """True if the object exists."""
        return self.stat(name) is not None

    def capabilities(self) -> Capabilities:
        """Report optional features (create-if-absent, server-side times)."""
        return Capabilities()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has none."""

    @abstractmethod
    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool: ...

    @abstractmethod
    def _get(self, name: str, offset: int, length: int | None) -> bytes: ...

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def _delete(self, name: str) -> None: ...

    @abstractmethod
    def _stat(self, name: str) -> ObjectInfo | None: ...
