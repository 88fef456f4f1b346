"""A link's mailbox: a flat folder on any backend through which two nodes exchange pieces.

Two nodes joined by a link (docs/hierarchy.md) pass each other *pieces* (sealed bundle files, up to a few
hundred MiB, sometimes GBs) through a mailbox: a local folder (a USB disk carried by hand), an sftp
directory, or a prefix of an object store (S3, GCS, Azure Blob, B2, WebDAV). Either side may push
or pull. Nothing on the medium may be recognisable, so the mailbox is flat and every file in it is
named by 64 lowercase hex digits (PIECE_RULE): no subfolders, no fixed names, no prefixes. A
mailbox is not a repository, so this is its own storage boundary with its own name rule: every
name is checked here before any backend call, and a listing shows only regular files whose names
follow the rule (strays() reports the rest, as Backend.strays does for a repository).

Why a Mailbox of its own rather than a Backend with another namespace: what a mailbox needs is not
what a repository's backend offers. Pieces move as files (put_file, fetch: streamed, never whole in
memory where the backend allows it), not as byte strings and ranges; a local mailbox is an
untrusted medium (every file opened relative to the folder's descriptor, never through a symlink,
written as the folder's owner when root), which LocalBackend, a repository the user owns, is not
built for; and creating a mailbox must not make the repository's prefix folders. So:

- a local folder is ``LocalMailbox`` (storage/mailbox_local.py): its own file handling, the local
  backend's error mapping where it fits (storage/local.py, full.py, refused.py);
- an object store wraps the repository's ``ObjectStoreBackend`` (URL parsing, credentials,
  retries, timeouts, the first-contact rules and the error mapping: storage/services.py,
  object_store.py) and calls its ``_``-prefixed hooks with names checked here; the backend's own
  check (the repository's prefix registry) never sees a mailbox name;
- sftp subclasses the repository's ``SftpBackend`` (connections, channels, reconnects, retries,
  error mapping: storage/sftp*.py) for the connection only, with the mailbox's own requests
  (storage/mailbox_sftp.py).

Atomicity: a reader never sees half a piece. A local or sftp folder gets a temp file named ``.``
and 64 random hex digits (TEMP_RULE; hidden from listings and strays, swept once older than
STALE_TEMP_SECONDS), fsynced, then renamed over the name. An object store gets one PUT per piece
(never multipart: a killed multipart upload leaves invisible parts behind), which costs memory:
the whole piece is read into one ``bytes`` object (OpenDAL's binding sends it without a second
copy), so a put holds about the piece's size in memory while it runs; the bundle codec's piece
size bounds it. Fetching streams from every backend (a local copy in the kernel, sftp and object
stores in pieces of a few MiB) into a temp file beside the destination, renamed once complete.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.storage.backend import STRAYS_SHOWN, InvalidName, ObjectInfo, Strays
from bunker.storage.full import RepositoryFull
from bunker.storage.local import STALE_TEMP_SECONDS, storage_error
from bunker.storage.prefixes import printable
from bunker.storage.url import OBJECT_STORE_SCHEMES, local_path

if TYPE_CHECKING:
    from bunker.storage.object_store import ObjectStoreBackend

__all__ = [
    "PIECE_RULE",
    "STALE_TEMP_SECONDS",
    "InvalidName",
    "Mailbox",
    "MailboxFull",
    "NotAPiece",
    "ObjectInfo",
    "PieceMissing",
    "Strays",
    "is_piece_name",
    "open_mailbox",
    "validate_piece_name",
]

PIECE_RULE = "64 lowercase hex digits"
_PIECE = re.compile(r"[0-9a-f]{64}")
_TEMP = re.compile(r"\.[0-9a-f]{64}")
FETCH_PIECE = 8 << 20  # an object store's piece is fetched in ranges of this size


def is_piece_name(name: str) -> bool:
    """True if ``name`` is a piece's name in a mailbox: 64 lowercase hex digits, nothing else."""
    return _PIECE.fullmatch(name) is not None


def is_temp_name(name: str) -> bool:
    """True if ``name`` is a writer's temp file in a local or sftp mailbox."""
    return _TEMP.fullmatch(name) is not None


def temp_name() -> str:
    """A fresh temp file name: a dot and 64 random hex digits (as unrecognisable as a piece)."""
    return "." + os.urandom(32).hex()


def validate_piece_name(name: str) -> str:
    """Return ``name`` if it is a piece's name, else raise InvalidName (nothing reaches a backend)."""
    if not is_piece_name(name):
        raise InvalidName(
            f"refused piece name {printable(name)}: a link's mailbox holds only names of {PIECE_RULE}",
            "the name came from a damaged or forged record, or this is a bug in bunker; please report it",
        )
    return name


class PieceMissing(ObjectMissing):
    """A piece asked for is not in the mailbox."""

    def __init__(self, name: str, url: str) -> None:
        super().__init__(
            name,
            "it was taken by the other node or never arrived; list the mailbox again and ask the other node to "
            "send what is missing",
        )
        self.message = f"piece {name} is not in the mailbox {url}"
        self.args = (self.message,)


class NotAPiece(BunkerError):
    """Something that is not a regular file (a symlink, a directory, a device, a file with other
    hard links) carries a piece's name: bunker never reads or writes through it."""

    def __init__(self, name: str, url: str, what: str) -> None:
        super().__init__(
            f"{name} in the mailbox {url} is {what}, not a piece: bunker never reads or writes through it",
            "a carried medium is untrusted: look at it (`ls -la` in the mailbox folder) and remove it, then run the "
            "command again; the other node sends the piece again if it was one",
            exit_code=ExitCode.FATAL,
        )


class MailboxFull(RepositoryFull):
    """The medium that holds a mailbox has no room for a piece. ``needed``: the piece's size;
    ``free``: the room there was (None when the backend cannot tell)."""

    def __init__(self, message: str, hint: str, *, needed: int, free: int | None, free_step: str) -> None:
        super().__init__(message, hint, exit_code=ExitCode.FATAL, free_step=free_step)
        self.needed = needed
        self.free = free


def size_text(n: int) -> str:
    """A size for messages: ``20.0 MB`` (decimal, as `df -h --si`), exact bytes below 1 kB."""
    if n < 1000:
        return f"{n} bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"  # pragma: no cover - unreachable


def mailbox_full(name: str, url: str, needed: int, free: int | None, why: str, free_step: str) -> MailboxFull:
    """The error for a piece that does not fit: ``why`` is what said so (a strerror, a service's
    answer), ``free_step`` where to make room (a capitalised clause, no full stop)."""
    room = f"{size_text(free)} free, " if free is not None else ""
    return MailboxFull(
        f"could not write piece {name} into the mailbox {url}: the medium is full ({why}; {room}the piece needs "
        f"{size_text(needed)})",
        f"nothing half-written was kept and the pieces already there are whole. {free_step}, or let the other node "
        "take the pieces already there, then run the command again",
        needed=needed,
        free=free,
        free_step=free_step,
    )


@dataclass(frozen=True)
class Entry:
    """One name in a mailbox folder as a backend lists it: ``regular`` when it is a regular file
    (with one link), ``directory`` for a folder (shown with a trailing ``/`` among strays)."""

    info: ObjectInfo
    regular: bool
    directory: bool = False


class Mailbox(ABC):
    """A link's mailbox (see the module docstring). Names are checked before any backend call;
    every method may raise StorageError (unreachable, StorageRefused, MailboxFull)."""

    url: str = ""

    def list(self) -> list[ObjectInfo]:
        """The pieces in the mailbox, by name: regular files named by PIECE_RULE only."""
        infos = [e.info for e in self._entries() if e.regular and is_piece_name(e.info.name)]
        return sorted(infos, key=lambda i: i.name)

    def strays(self) -> Strays:
        """What list() leaves out: names that break the rule, folders (shown with a trailing
        ``/``), symlinks and anything else that is not a regular file. Writers' temp files are
        not strays."""
        names = sorted(
            printable(e.info.name + ("/" if e.directory else ""))
            for e in self._entries()
            if not (e.regular and is_piece_name(e.info.name))
        )
        return Strays(tuple(names[:STRAYS_SHOWN]), len(names))

    def put_file(self, name: str, path: str | os.PathLike[str], *, consume: bool = False) -> None:
        """Store the local file ``path`` as the piece ``name``, atomically (a reader sees the
        whole piece or none); a piece already there under that name is replaced. Raises
        NotAPiece when something that is not a regular file has the name. ``consume``: the
        caller gives the file up (never changes it again, deletes it afterwards), so a folder on
        the same filesystem may take the file itself rather than a copy (``path`` is then gone)."""
        self._put_file(validate_piece_name(name), os.fspath(path), consume)

    def fetch(self, name: str, dest_path: str | os.PathLike[str]) -> int:
        """Copy the piece ``name`` to the local file ``dest_path`` (replaced atomically: whole or
        not at all) and return its size. Raises PieceMissing, or NotAPiece for a name held by
        something that is not a regular file (never read through)."""
        return self._fetch(validate_piece_name(name), os.path.abspath(os.fspath(dest_path)))

    def delete(self, name: str) -> None:
        """Remove the piece ``name``; a missing one is no error."""
        self._delete(validate_piece_name(name))

    def stat(self, name: str) -> ObjectInfo | None:
        """The piece's size and time, or None when there is no piece (nothing, or not a regular
        file) under ``name``."""
        return self._stat(validate_piece_name(name))

    def free_space(self) -> int | None:
        """Bytes a piece may still take on the medium, or None when the backend cannot tell."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release descriptors and connections."""

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @abstractmethod
    def _entries(self) -> builtins.list[Entry]:
        """Every name in the mailbox but writers' temp files."""

    @abstractmethod
    def _put_file(self, name: str, path: str, consume: bool) -> None: ...

    @abstractmethod
    def _fetch(self, name: str, dest: str) -> int: ...

    @abstractmethod
    def _delete(self, name: str) -> None: ...

    @abstractmethod
    def _stat(self, name: str) -> ObjectInfo | None: ...


# ---------------------------------------------------------------------------------------- helpers


def write_atomically(dest: str, fill: Callable[[int], int], what: str) -> int:
    """Make the local file ``dest`` (an absolute path) from ``fill`` (given a descriptor of a
    new temp file beside it, it writes the content and returns its size): fsynced, renamed over
    ``dest``, the folder fsynced. ``what`` names the copy in errors. A failure leaves nothing."""
    folder = os.path.dirname(dest)
    tmp = os.path.join(folder, "." + os.path.basename(dest) + "." + os.urandom(8).hex() + ".part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise storage_error(exc, f"could not {what}", folder) from None
    try:
        try:
            size = fill(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return size
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage_error(exc, f"could not {what}", folder) from None
        raise


def read_source(path: str) -> int:
    """Open the local file ``path`` (a piece to send) for reading; errors are BunkerErrors."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise storage_error(exc, f"could not read {path} to send it", os.path.dirname(path) or ".") from None


# ----------------------------------------------------------------------------------- object stores


class ObjectStoreMailbox(Mailbox):
    """A mailbox under a prefix of an object store, through the repository's ObjectStoreBackend
    (its hooks, with names checked here). One PUT per piece: see the module docstring for its
    memory; fetches are range reads of FETCH_PIECE bytes."""

    def __init__(self, backend: ObjectStoreBackend) -> None:
        self._backend = backend
        self.url = backend.url

    def _entries(self) -> list[Entry]:
        out = []
        for info in self._backend._list(""):
            name = info.name
            if name == "/":
                continue  # the folder itself (WebDAV lists its collection)
            if name.endswith("/"):
                out.append(Entry(ObjectInfo(name.rstrip("/"), 0, 0.0), regular=False, directory=True))
                continue
            if info.mtime == 0.0 and is_piece_name(name):
                # a service that lists no times (the backend then asks only for repository names)
                stated = self._backend._stat(name)
                if stated is None:
                    continue  # deleted meanwhile
                info = stated
            out.append(Entry(info, regular=True))
        return out

    def _put_file(self, name: str, path: str, consume: bool) -> None:
        fd = read_source(path)
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
        except OSError as exc:
            raise storage_error(exc, f"could not read {path} to send it", os.path.dirname(path)) from None
        finally:
            os.close(fd)
        try:
            self._backend._put(name, data, False)
        except RepositoryFull as exc:
            raise mailbox_full(
                name, self.url, len(data), None, exc.message, exc.free_step or "Free space at the service"
            ) from None

    def _fetch(self, name: str, dest: str) -> int:
        info = self._backend._stat(name)
        if info is None:
            raise PieceMissing(name, self.url)
        size = info.size

        def fill(fd: int) -> int:
            done = 0
            while done < size:
                try:
                    data = self._backend._get(name, done, min(FETCH_PIECE, size - done))
                except ObjectMissing:
                    raise PieceMissing(name, self.url) from None
                if not data:
                    raise BunkerError(
                        f"piece {name} in the mailbox {self.url} shrank while it was read ({done} of {size} bytes)",
                        "another writer replaced it; run the command again",
                        exit_code=ExitCode.FATAL,
                    )
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                done += len(data)
            return done

        return write_atomically(dest, fill, f"fetch piece {name} from the mailbox {self.url} into {dest}")

    def _delete(self, name: str) -> None:
        self._backend._delete(name)

    def _stat(self, name: str) -> ObjectInfo | None:
        return self._backend._stat(name)

    def close(self) -> None:
        self._backend.close()


# -------------------------------------------------------------------------------------------- open


def open_mailbox(url: str, *, create: bool = False) -> Mailbox:
    """Open the mailbox at ``url``: a local path or ``file://`` URL, ``sftp://``, or an object
    store's (``s3://``, ``gcs://``, ``azblob://``, ``b2://``, ``webdav+https://``), with the
    repositories' URL rules and settings (credentials, BUNKER_STORAGE_* retries and timeouts).
    ``create`` makes a local or sftp folder (and its missing parents) when it is not there; an
    object store needs nothing made. ``ssh://`` and ``unix://`` name a bunker server: refused."""
    if not url:
        raise BunkerError(
            "no mailbox URL given", "give the link's folder: a path, sftp://... or s3://...", exit_code=ExitCode.USAGE
        )
    path = local_path(url, what="mailbox")
    if path is not None:
        from bunker.storage.mailbox_local import LocalMailbox

        return LocalMailbox(path, create=create)
    scheme = urlparse(url).scheme.lower()
    if scheme in OBJECT_STORE_SCHEMES:
        from bunker.storage.services import open_object_store  # OpenDAL is loaded only when used

        return ObjectStoreMailbox(open_object_store(url, create=create))
    if scheme == "sftp":
        from bunker.storage.mailbox_sftp import SftpMailbox  # asyncssh is loaded only when used

        return SftpMailbox(url, create=create)
    raise BunkerError(
        f"mailbox {url!r} names a bunker server ({scheme}://): a link's mailbox is a folder, not a bunker server",
        "give the folder's own URL: a local path (a folder on a carried disk), sftp://USER@HOST/PATH for a folder on "
        "an ssh server, or an object store's prefix such as s3://BUCKET/PREFIX",
        exit_code=ExitCode.USAGE,
    )
