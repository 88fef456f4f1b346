"""Writing one restored file and applying an entry's metadata. Shared by the restorer's threads
(large files) and its worker processes (small files).

Per inode the order is: data (holes left as holes), owner, permission bits, xattrs
(security.capability last: chown clears it), ACL (chmod after it would rewrite its mask), times;
without root, an item its owner may not write gets its bits after its xattrs (see apply_meta).
Inode flags come last of all, after every item of the restore (see restorer.py)."""

from __future__ import annotations

import contextlib
import errno
import grp
import itertools
import os
import pwd
import stat
from collections.abc import Callable
from typing import Any, NamedTuple

from bunker.errors import BunkerError, RequestedUpstream
from bunker.fs import deep_path
from bunker.fs.fsmeta import RegionCursor, apply_xattrs, locked_flags, locked_message, unlock
from bunker.repo.blob_reader import BlobRef

# A chunk that could not be resolved in the main process (missing index entry, damaged trailer):
# its raw length if known, and why.
Unresolved = tuple[int, str]
Piece = BlobRef | Unresolved


# (event code, message) for a part of an item's metadata that could not be restored
MetaNote = tuple[str, str]


class WriteResult(NamedTuple):
    """status: ok, damaged (written with zero-filled gaps, ``message`` lists them), error."""

    status: str
    nbytes: int
    message: str = ""
    errno: int = 0
    meta_notes: tuple[MetaNote, ...] = ()
    requested: bool = False  # a gap is data the node evicted and requested upstream (rerun later)


class _SparseOut:
    """Places a sparse file's stored data (its data regions, one after the other) at the regions'
    offsets; the holes are never written."""

    def __init__(self, fd: int, size: int, holes: list[int]) -> None:
        self.fd = fd
        self.cursor = RegionCursor(size, holes)

    def put(self, data: bytes | None, n: int) -> None:
        """Write ``data`` (or skip ``n`` bytes of damaged data, leaving a hole)."""
        view = memoryview(data) if data is not None else None
        done = 0
        while done < n and (span := self.cursor.next_span(n - done)) is not None:
            pos, k = span
            if view is not None:
                part = view[done : done + k]
                while part:
                    w = os.pwrite(self.fd, part, pos)
                    part = part[w:]
                    pos += w
            self.cursor.advance(k)
            done += k


def write_file(
    path: bytes,
    pieces: list[Piece],
    fetch: Callable[[BlobRef], bytes],
    *,
    fresh: bool = False,
    meta: Callable[[int], list[MetaNote]] | None = None,
    size: int = 0,
    holes: list[int] | None = None,
    as_root: bool = False,
    dir_fd: int | None = None,
) -> WriteResult:
    """Create ``path`` and write its chunks in order. A chunk that cannot be read leaves a hole
    of its length (the rest of the file is still right) and is reported. ``fresh``: the parent
    directory was created empty by this restore, so nothing can be in the way. ``holes`` (the
    entry's hole map) makes a sparse file of ``size`` bytes. ``meta`` applies owner, mode, xattrs,
    ACL and times through the open descriptor once the data is written.

    The file is written under a temporary name in the same directory (PART_PREFIX) and renamed
    to ``path`` only once its data and metadata are written: a restore stopped by a full disk, an
    error or a kill never leaves a partial file under the real name (an existing file there stays
    as it was until it is replaced whole). An existing file that is immutable or append-only is
    unlocked first as root (``as_root``), else refused. ``dir_fd``: a descriptor of the directory
    that holds ``path`` (deep_path.open_parent), so that creating and renaming need no lookups."""
    try:
        if not fresh:
            remove_existing(path, keep_regular=True, as_root=as_root)  # a regular file is replaced by the rename
        fd, part = open_part(path, dir_fd)
    except OSError as exc:
        return WriteResult("error", 0, f"cannot create file: {exc.strerror}", exc.errno or 0)
    pos = 0
    gaps: list[str] = []
    requested = False
    sparse = _SparseOut(fd, size, holes) if holes else None
    try:
        for piece in pieces:
            if isinstance(piece, BlobRef):
                try:
                    data = fetch(piece)
                except BunkerError as exc:
                    requested = requested or isinstance(exc, RequestedUpstream)
                    gaps.append(f"bytes {pos}-{pos + piece.raw_length}: {exc.message}")
                    pos += piece.raw_length
                    if sparse is not None:
                        sparse.put(None, piece.raw_length)
                    else:
                        os.lseek(fd, pos, os.SEEK_SET)
                    continue
                if sparse is not None:
                    sparse.put(data, len(data))
                else:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                pos += len(data)
            else:
                length, why = piece
                gaps.append(f"bytes {pos}-{pos + length}: {why}")
                pos += length
                if sparse is not None:
                    sparse.put(None, length)
                else:
                    os.lseek(fd, pos, os.SEEK_SET)
        if sparse is not None:
            os.ftruncate(fd, size)  # the holes at the end, if any
        elif gaps:
            os.ftruncate(fd, pos)
        notes = tuple(meta(fd)) if meta is not None else ()
    except OSError as exc:
        os.close(fd)
        _discard(part)
        return WriteResult("error", pos, f"cannot write file: {exc.strerror}", exc.errno or 0)
    os.close(fd)
    failed = _put_in_place(part, path, as_root, dir_fd)
    if failed is not None:
        return failed
    if gaps:
        more = f" (+{len(gaps) - 5} more)" if len(gaps) > 5 else ""
        return WriteResult("damaged", pos, "; ".join(gaps[:5]) + more, meta_notes=notes, requested=requested)
    return WriteResult("ok", pos, meta_notes=notes)


PART_PREFIX = b".bunker-part-"  # a file being restored, renamed to its real name once complete


def _new_part_stem() -> None:
    global _part_stem
    _part_stem = PART_PREFIX + os.urandom(6).hex().encode() + b"-"


_part_stem = b""  # this process's random part of the names (a forked worker draws its own)
_new_part_stem()
os.register_at_fork(after_in_child=_new_part_stem)
_part_numbers = itertools.count()


def _part_name() -> bytes:
    """A fresh temporary name: PART_PREFIX, random bytes drawn once per process, a counter."""
    return _part_stem + b"%x" % next(_part_numbers)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# the entry keys :func:`write_whole` restores all of (or that are not for it: the chunk list,
# ctime, hard links and inode flags are the restorer's); an entry with any other key (xattrs,
# ACL, holes) goes through write_file and apply_meta
_WHOLE_KEYS = frozenset(("n", "t", "m", "u", "g", "U", "G", "mt", "at", "ct", "sz", "c", "ino", "nl", "fl"))


def write_whole(dir_fd: int, path: bytes, data: bytes, e: dict[str, Any], as_root: bool, numeric_owner: bool) -> bool:
    """The common case of a small restored file, in the fewest calls: ``data`` written to
    ``path`` in the directory ``dir_fd``, which this restore created (nothing is in the way),
    and the owner, permission bits and times of ``e`` (:func:`apply_meta`), under a temporary
    name renamed into place as :func:`write_file` does. A restore writes most of its files so
    (a third less CPU per small file than write_file: docs/performance.md). False when the
    file is not that simple or a call fails: nothing is left behind then, and write_file does
    it, with its reports."""
    if not e.keys() <= _WHOLE_KEYS:
        return False
    part = _part_name()
    try:
        fd = os.open(part, _CREATE, 0o600, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, "short write")  # (write_file writes the rest, or says why not)
        if apply_meta(fd, e, as_root, numeric_owner):
            raise OSError(errno.EPERM, "metadata not restored whole")  # (write_file reports it)
        os.close(fd)
        fd = -1
        os.rename(part, path[path.rfind(b"/") + 1 :], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(part, dir_fd=dir_fd)
        return False
    return True


def open_part(path: bytes, dir_fd: int | None = None) -> tuple[int, bytes]:
    """Create a new, empty temporary file (PART_PREFIX and a suffix no other run uses) beside
    ``path`` (in ``dir_fd`` when given: the directory that holds it): (descriptor, its path)."""
    head = path[: path.rfind(b"/") + 1]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = _part_name()
        try:
            if dir_fd is not None:
                return os.open(name, flags, 0o600, dir_fd=dir_fd), head + name
            return deep_path.open(head + name, flags, 0o600), head + name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name beside the file", path)


def _discard(part: bytes) -> None:
    with contextlib.suppress(OSError):
        deep_path.unlink(part)


def _put_in_place(part: bytes, path: bytes, as_root: bool, dir_fd: int | None = None) -> WriteResult | None:
    """Rename the complete temporary file to ``path`` (replacing a file there); None when done,
    else the failure (the temporary file is removed). ``dir_fd``: the directory holding both."""
    try:
        try:
            if dir_fd is not None:
                leaves = part[part.rfind(b"/") + 1 :], path[path.rfind(b"/") + 1 :]
                os.rename(*leaves, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                deep_path.rename(part, path)
        except PermissionError:
            if not locked_flags(path):
                raise
            if not (as_root and unlock(path)):
                _discard(part)
                return WriteResult("error", 0, locked_message(path), errno.EPERM)
            deep_path.rename(part, path)
    except OSError as exc:
        _discard(part)
        return WriteResult("error", 0, f"cannot put the restored file in place: {exc.strerror}", exc.errno or 0)
    return None


def _partial(exc: OSError, what: str) -> MetaNote:
    return ("metadata-partial", f"{what} not restored: {exc.strerror}")


def _id_maps(numeric_owner: bool) -> tuple[Callable[[str, int], int], Callable[[str, int], int]]:
    if numeric_owner:
        return (lambda _n, i: i), (lambda _n, i: i)
    return user_id, group_id


def apply_meta(target: bytes | int, e: dict[str, Any], as_root: bool, numeric_owner: bool) -> list[MetaNote]:
    """Owner (as root), mode, xattrs, ACL and times of one restored item, in that order. ``target``
    is a path (symlinks are not followed, and a symlink's own mode is left alone: Linux cannot
    change it) or the open descriptor of a regular file just written (no path lookups). Returns
    what could not be restored."""
    notes: list[MetaNote] = []
    if as_root and "u" in e:
        try:
            uid, gid = (e["u"], e["g"]) if numeric_owner else owner_ids(e)
            if isinstance(target, int):
                os.chown(target, uid, gid)
            else:
                deep_path.chown(target, uid, gid)
        except OSError as exc:
            notes.append(_partial(exc, "owner"))
    chmod = "m" in e and (isinstance(target, int) or e["t"] != "l")
    # Setting a user.* xattr needs write permission on the item, which root always has and its
    # owner only while the bits allow it: without root, an item the owner may not write (0o400)
    # gets its xattrs while it still may, and its own bits after them. (The bits after the ACL
    # keep its mask: an item's group bits are its ACL's mask.)
    writable_first = chmod and not as_root and "x" in e and not e["m"] & stat.S_IWUSR
    if chmod:
        try:
            _chmod(target, e["m"] | stat.S_IWUSR if writable_first else e["m"])
        except OSError as exc:
            notes.append(_partial(exc, "permission bits"))
            writable_first = False
    if "x" in e or "acl" in e:
        where = target if isinstance(target, int) else deep_path.xattr_path(target)
        notes += apply_xattrs(where, e.get("x", {}), e.get("acl"), *_id_maps(numeric_owner))
    if writable_first:
        try:
            _chmod(target, e["m"])
        except OSError as exc:
            notes.append(_partial(exc, "permission bits"))
    if "mt" in e:
        try:
            ns = (e.get("at", e["mt"]), e["mt"])
            if isinstance(target, int):
                os.utime(target, ns=ns)
            else:
                deep_path.utime(target, ns)
        except OSError as exc:
            notes.append(_partial(exc, "times"))
    return notes


def _chmod(target: bytes | int, mode: int) -> None:
    if isinstance(target, int):
        os.chmod(target, mode)
    else:
        deep_path.chmod(target, mode)


_user_cache: dict[str, int | None] = {}
_group_cache: dict[str, int | None] = {}


def user_id(name: str, stored: int) -> int:
    """This machine's uid for a stored user name, else the stored uid."""
    u = _user_cache.get(name, -1)
    if u == -1:
        u = None
        with contextlib.suppress(KeyError):
            u = pwd.getpwnam(name).pw_uid if name else None
        _user_cache[name] = u
    return stored if u is None else u


def group_id(name: str, stored: int) -> int:
    """This machine's gid for a stored group name, else the stored gid."""
    g = _group_cache.get(name, -1)
    if g == -1:
        g = None
        with contextlib.suppress(KeyError):
            g = grp.getgrnam(name).gr_gid if name else None
        _group_cache[name] = g
    return stored if g is None else g


def owner_ids(e: dict[str, Any]) -> tuple[int, int]:
    """Map stored user/group names to this machine's ids (fall back to the stored ids)."""
    return user_id(e.get("U", ""), e["u"]), group_id(e.get("G", ""), e["g"])


def remove_existing(path: bytes, keep_regular: bool = False, as_root: bool = False) -> None:
    """Clear the way for a restored item (a directory in the way is an error). An immutable or
    append-only file in the way is unlocked as root, else refused with a clear message."""
    try:
        st = deep_path.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way", path)
    if keep_regular and stat.S_ISREG(st.st_mode):
        return
    try:
        deep_path.unlink(path)
    except PermissionError:
        if not stat.S_ISREG(st.st_mode) or not locked_flags(path):
            raise
        if not (as_root and unlock(path)):
            raise PermissionError(errno.EPERM, locked_message(path)) from None
        deep_path.unlink(path)
