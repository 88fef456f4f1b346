"""The backend interface: the security boundary for object names.

A backend stores opaque objects under names such as ``packs/<64 hex>``. It knows nothing about
keys or formats. Every name is validated here against the registry of prefixes and their naming
rules (storage/prefixes.py), before any implementation sees it, so a malicious name read from an
untrusted object (``../../etc/passwd``) can never reach a filesystem call or an URL, and a name
that breaks its prefix's rule (``packs/junk``) is neither written, read, deleted nor listed.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from bunker.errors import BunkerError
from bunker.storage.prefixes import FIXED_NAMES, PREFIXES, name_problem, printable
from bunker.storage.staged import StagedFile, read_file

__all__ = [
    "FIXED_NAMES",
    "PREFIXES",
    "STRAYS_SHOWN",
    "Backend",
    "Capabilities",
    "InvalidName",
    "ObjectInfo",
    "Strays",
    "validate_name",
    "validate_prefix",
]

STRAYS_SHOWN = 100  # names of strays a listing reports per prefix (their count is always exact)


class InvalidName(BunkerError):
    """An object name outside the repository's namespace."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is an object name of the registry (storage/prefixes.py), else raise
    InvalidName: a fixed name, or ``<prefix>/<leaf>`` whose leaf follows its prefix's rule."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidName(
            f"refused object name {printable(name)}: {problem}",
            "the repository or a value read from it is damaged or malicious; run `bunker check`",
        )
    return name


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: a known top-level prefix followed by '/'."""
    if not prefix.endswith("/") or prefix[:-1] not in PREFIXES:
        raise InvalidName(f"refused listing prefix {printable(prefix)}", "this is a bug in bunker; please report it")
    return prefix


@dataclass(frozen=True)
class Strays:
    """What a listing of a prefix left out: names there that are not objects (foreign files,
    names that break the prefix's rule). ``shown``: up to STRAYS_SHOWN of them, printable."""

    shown: tuple[str, ...] = ()
    count: int = 0


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

    def stage(self, prefix: str) -> StagedFile | None:
        """A new file on this machine to build an object of ``prefix`` in, for :meth:`put_staged`;
        None where objects are built in memory (the default; see storage/staged.py)."""
        validate_prefix(prefix)
        return None

    def put_staged(self, name: str, path: str) -> None:
        """Store the bytes of the file at ``path`` (a closed :meth:`stage` file) under ``name``,
        as :meth:`put` would; the file is removed once they are stored and stays otherwise."""
        self._put_staged(validate_name(name), path)

    def _put_staged(self, name: str, path: str) -> None:
        self._put(name, read_file(path), False)  # uploaded from memory, as put does
        with contextlib.suppress(OSError):  # stored: a file left behind is swept as a temp file
            os.unlink(path)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes, or ``length`` bytes from ``offset`` (negative offset:
        from the end). Raises ObjectMissing when it does not exist."""
        return self._get(validate_name(name), offset, length)

    def read_into(self, name: str, offset: int, buf: memoryview) -> int:
        """Read up to ``len(buf)`` bytes of the object from ``offset`` (>= 0) into ``buf``;
        return how many were read (fewer only at the object's end). For a reader that goes
        through an object in pieces with one buffer (check --read-data's workers): a new buffer
        per piece costs its page faults again. Raises ObjectMissing."""
        return self._read_into(validate_name(name), offset, buf)

    def _read_into(self, name: str, offset: int, buf: memoryview) -> int:
        data = self._get(name, offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield every object whose name starts with ``prefix`` (e.g. ``packs/``). Names that
        break the prefix's rule are left out (strays() reports them): nothing acts on them."""
        for info in self._list(validate_prefix(prefix)):
            if name_problem(info.name) is None:
                yield info

    def strays(self, prefix: str) -> Strays:
        """What list(prefix) leaves out: entries under ``prefix`` that are not objects (for
        `bunker check` to report). Dot files (writers' temp files) are not strays."""
        listed = (i.name for i in self._list(validate_prefix(prefix)))
        names = sorted(printable(n) for n in listed if name_problem(n) and not n[len(prefix) :].startswith("."))
        return Strays(tuple(names[:STRAYS_SHOWN]), len(names))

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
