"""The metadata of an inode beyond stat(): sparse holes, extended attributes, POSIX ACLs and inode
flags (chattr) -- read during backup, written back during restore. The tree keys they become
(``hole``, ``x``, ``acl``, ``fl``) are defined in FORMAT.md section 14.

Reading works on an open descriptor where the caller has one (regular files are open anyway to be
read, directories to be listed): the flag ioctl needs one, and ``flistxattr`` on it saves a path
lookup. Other items (symlinks, fifos, devices, sockets) are never opened; their xattrs are read by
path without following symlinks. No function here raises for a problem that concerns one item
only: problems come back as short messages that the caller turns into run-log events.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any

from bunker.fs import deep_path
from bunker.runlog import display_path

# <linux/fs.h>: _IOR('f', 1, long) and _IOW('f', 2, long); the kernel reads and writes an int
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602

# The flags a tree stores: the chattr flags a user or root sets, in lsattr's order. Flags the
# filesystem manages itself (extents, inline data, hashed directory, encryption, verity ...) and
# the ones that depend on the filesystem's features (DAX, casefold) are never stored.
FLAG_LETTERS = (
    (0x00000001, "s"),  # secure deletion
    (0x00000002, "u"),  # undelete
    (0x00000008, "S"),  # synchronous updates
    (0x00010000, "D"),  # synchronous directory updates
    (0x00000010, "i"),  # immutable
    (0x00000020, "a"),  # append only
    (0x00000040, "d"),  # no dump
    (0x00000080, "A"),  # no atime updates
    (0x00000004, "c"),  # compressed
    (0x00004000, "j"),  # data journalling
    (0x00008000, "t"),  # no tail-merging
    (0x00020000, "T"),  # top of directory hierarchy
    (0x00800000, "C"),  # no copy on write
    (0x20000000, "P"),  # project id inheritance
    (0x00000400, "m"),  # do not compress
)
STORED_FLAGS = sum(bit for bit, _ in FLAG_LETTERS)
FL_IMMUTABLE, FL_APPEND = 0x10, 0x20
LOCK_FLAGS = FL_IMMUTABLE | FL_APPEND  # forbid writing, linking, renaming, setting times/xattrs
# only root sets these: i and a need CAP_LINUX_IMMUTABLE, j needs CAP_SYS_RESOURCE
PRIVILEGED_FLAGS = FL_IMMUTABLE | FL_APPEND | 0x00004000

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
CAPABILITY = b"security.capability"

# errors meaning "this filesystem (or item type) has no such thing": not worth an event
_UNSUPPORTED = frozenset((errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS))
_OPEN_META = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def _why(exc: OSError) -> str:
    return f"{exc.strerror or exc} (errno {exc.errno})"


# ---------------------------------------------------------------------------------- inode flags


def flag_letters(fl: int) -> str:
    """lsattr-style letters of the stored flags that are set (``""`` for none)."""
    return "".join(letter for bit, letter in FLAG_LETTERS if fl & bit)


def get_flags(fd: int) -> int:
    """All FS_IOC_GETFLAGS bits of an open regular file or directory (raises OSError)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return int(struct.unpack("@i", buf)[0]) & 0xFFFFFFFF


def set_flags_fd(fd: int, fl: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("@i", fl - (1 << 32) if fl >= 1 << 31 else fl))


def open_for_flags(path: bytes) -> int:
    """Open a regular file or directory to read or change its flags, never following a symlink and
    never opening anything else (a fifo would block, a device could act); raises OSError."""
    fd = deep_path.open(path, _OPEN_META)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        os.close(fd)
        raise OSError(errno.ENOTTY, "not a regular file or directory")
    return fd


def set_flags(path: bytes, fl: int, as_root: bool) -> tuple[int, str]:
    """Set the stored flags ``fl`` of a restored item (other bits as the filesystem has them).
    Without root the privileged flags are left out. Returns (flags that could not be set, why)."""
    try:
        fd = open_for_flags(path)
    except FileNotFoundError:
        return 0, ""  # the item itself could not be restored, and that was reported
    except OSError as exc:
        return fl, _why(exc)
    try:
        cur = get_flags(fd)
        want = fl if as_root else fl & ~PRIVILEGED_FLAGS
        lost = fl & ~want
        if (cur & STORED_FLAGS) != want:
            try:
                set_flags_fd(fd, (cur & ~STORED_FLAGS) | want)
            except PermissionError:
                if want & PRIVILEGED_FLAGS == 0:
                    raise
                set_flags_fd(fd, (cur & ~STORED_FLAGS) | (want & ~PRIVILEGED_FLAGS))
                lost |= want & PRIVILEGED_FLAGS
        return lost, "only root can set them" if lost else ""
    except OSError as exc:
        return fl, _why(exc)
    finally:
        os.close(fd)


def locked_flags(path: bytes) -> int:
    """The immutable/append-only flags of an existing regular file or directory (0 if none or
    not readable)."""
    try:
        fd = open_for_flags(path)
    except OSError:
        return 0
    try:
        return get_flags(fd) & LOCK_FLAGS
    except OSError:
        return 0
    finally:
        os.close(fd)


def unlock(path: bytes) -> bool:
    """Clear immutable/append-only on an existing regular file or directory (needs root).
    True if a flag was cleared."""
    try:
        fd = open_for_flags(path)
    except OSError:
        return False
    try:
        cur = get_flags(fd)
        if not cur & LOCK_FLAGS:
            return False
        set_flags_fd(fd, cur & ~LOCK_FLAGS)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def locked_message(path: bytes) -> str:
    return (
        "an existing item is immutable or append-only (chattr +i/+a) and only root can clear that: run "
        f"`chattr -i -a {display_path(path)}` as root, or restore into an empty --target"
    )


# ---------------------------------------------------------------------------------- sparse files


def hole_map(fd: int, size: int) -> list[int]:
    """The holes of an open regular file of ``size`` bytes as a flat list ``[offset, length, ...]``
    (empty for a file without holes), found with SEEK_HOLE/SEEK_DATA. Moves the file offset."""
    if size <= 0:
        return []
    try:
        pos = os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:
        return []  # the filesystem cannot tell: the file is read whole
    holes: list[int] = []
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = size  # no data after pos
        data = min(data, size)
        if data > pos:
            holes += (pos, data - pos)
        if data >= size:
            break
        pos = os.lseek(fd, data, os.SEEK_HOLE)
    return holes


def data_regions(size: int, holes: list[int]) -> list[tuple[int, int]]:
    """The (start, end) ranges of a file that are not holes."""
    out = []
    pos = 0
    for i in range(0, len(holes), 2):
        off, length = holes[i], holes[i + 1]
        if off > pos:
            out.append((pos, off))
        pos = off + length
    if pos < size:
        out.append((pos, size))
    return out


def hole_bytes(holes: list[int]) -> int:
    return sum(holes[1::2])


class RegionCursor:
    """Walks a sparse file's data regions in order: where the next data byte is and how many
    follow it before the next hole. Shared by reading (backup) and writing (restore)."""

    def __init__(self, size: int, holes: list[int]) -> None:
        self.regions = data_regions(size, holes)
        self._i = 0
        self._pos = self.regions[0][0] if self.regions else 0

    def next_span(self, limit: int) -> tuple[int, int] | None:
        """(file offset, length <= ``limit``) of the next run of data bytes; None past the end."""
        while self._i < len(self.regions):
            end = self.regions[self._i][1]
            if self._pos < end:
                return self._pos, min(limit, end - self._pos)
            self._i += 1
            if self._i < len(self.regions):
                self._pos = self.regions[self._i][0]
        return None

    def advance(self, n: int) -> None:
        self._pos += n


class DataReader:
    """A stream of a file's data regions, holes left out (``readinto`` for the chunker)."""

    def __init__(self, fd: int, size: int, holes: list[int]) -> None:
        self.fd = fd
        self.cursor = RegionCursor(size, holes)

    def readinto(self, b: memoryview) -> int:
        span = self.cursor.next_span(len(b))
        if span is None:
            return 0
        n = os.preadv(self.fd, [b[: span[1]]], span[0])
        if n <= 0:
            return 0  # the file shrank: the caller's fstat notices
        self.cursor.advance(n)
        return n

    def read_all(self) -> bytes:
        parts: list[bytes] = []
        for start, end in self.cursor.regions:
            pos = start
            while pos < end:
                b = os.pread(self.fd, min(end - pos, 8 << 20), pos)
                if not b:
                    return b"".join(parts)
                parts.append(b)
                pos += len(b)
        return b"".join(parts)


# ---------------------------------------------------------------------------------- xattrs, ACLs

# POSIX ACL xattr: u32 version 2, then entries (u16 tag, u16 perm, u32 id), little-endian
_ACL_VERSION = 2
_UNDEFINED_ID = 0xFFFFFFFF
_TAG_NAMES = {1: ("user", False), 2: ("user", True), 4: ("group", False), 8: ("group", True)}
_TAG_NAMES.update({16: ("mask", False), 32: ("other", False)})
_TAG_VALUES = {("user", False): 1, ("user", True): 2, ("group", False): 4, ("group", True): 8}
_TAG_VALUES.update({("mask", False): 16, ("other", False): 32})


def parse_acl(value: bytes) -> list[list[Any]]:
    """The entries of a system.posix_acl_* value: ``[tag, perm]`` for the owner, owning group, mask
    and other, ``[tag, perm, id, ""]`` for a named user or group (the name is filled in later)."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != _ACL_VERSION:
        raise ValueError("not a version 2 POSIX ACL")
    out: list[list[Any]] = []
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        kind = _TAG_NAMES.get(tag)
        if kind is None:
            raise ValueError(f"unknown ACL tag {tag:#x}")
        out.append([kind[0], perm & 7, ident, ""] if kind[1] else [kind[0], perm & 7])
    return out


def build_acl(entries: list[list[Any]], uid: Callable[[str, int], int], gid: Callable[[str, int], int]) -> bytes:
    """The system.posix_acl_* value of stored entries; ``uid``/``gid`` map (name, stored id) to the
    id to use here. Entries are sorted the way the kernel requires."""
    packed = []
    for e in entries:
        named = len(e) == 4
        tag = _TAG_VALUES[(e[0], named)]
        ident = (uid if e[0] == "user" else gid)(e[3], e[2]) if named else _UNDEFINED_ID
        packed.append((tag, ident, e[1]))
    packed.sort()
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", t, p, i) for t, i, p in packed)


def acl_text(entries: list[list[Any]]) -> str:
    """Short text form (``user::rw-,user:alice:r--,...``) with names, or ids where names are unknown."""

    def perm(p: int) -> str:
        return ("r" if p & 4 else "-") + ("w" if p & 2 else "-") + ("x" if p & 1 else "-")

    parts = []
    for e in entries:
        who = (e[3] or str(e[2])) if len(e) == 4 else ""
        parts.append(f"{e[0]}:{who}:{perm(e[1])}")
    return ",".join(parts)


def read_xattrs(target: int | bytes) -> tuple[dict[bytes, bytes], dict[str, list[list[Any]]], list[str]]:
    """(xattrs, ACL, problems) of an open descriptor or, for a path, the item itself (a symlink is
    not followed). The xattrs map raw names to raw values, sorted by name; the POSIX ACL
    xattrs are returned parsed as ``{"a": access entries, "d": default entries}`` instead (an
    access ACL that only repeats the permission bits is left out)."""
    try:
        names = os.listxattr(target) if isinstance(target, int) else os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return {}, {}, []
        return {}, {}, [f"extended attributes not readable: {_why(exc)}"]
    if not names:
        return {}, {}, []
    x: dict[bytes, bytes] = {}
    acl: dict[str, list[list[Any]]] = {}
    problems = []
    for name in sorted(os.fsencode(n) for n in names):
        try:
            value = (
                os.getxattr(target, name)
                if isinstance(target, int)
                else os.getxattr(target, name, follow_symlinks=False)
            )
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed since it was listed
                problems.append(
                    f"extended attribute {name.decode('utf-8', 'backslashreplace')} not readable: {_why(exc)}"
                )
            continue
        if name in (ACL_ACCESS, ACL_DEFAULT):
            try:
                entries = parse_acl(value)
            except ValueError as exc:
                problems.append(f"{name.decode()} not understood ({exc}); not stored")
                continue
            if name == ACL_DEFAULT:
                acl["d"] = entries
            elif len(entries) > 3:
                acl["a"] = entries
            continue
        x[name] = value
    if "d" in acl and "a" in acl:
        acl = {"a": acl["a"], "d": acl["d"]}  # canonical key order
    return x, acl, problems


def name_acl(acl: dict[str, list[list[Any]]], user: Callable[[int], str], group: Callable[[int], str]) -> None:
    """Fill in the user and group names of named ACL entries (in place)."""
    for entries in acl.values():
        for e in entries:
            if len(e) == 4:
                e[3] = (user if e[0] == "user" else group)(e[2])


def inode_meta(fd: int) -> tuple[dict[str, Any], list[str]]:
    """The ``x``, ``acl`` and ``fl`` keys of an open regular file or directory, and problems.
    Runs for every file backed up: two system calls when there is nothing to find."""
    meta: dict[str, Any] = {}
    problems: list[str] = []
    names, problem = _xattr_names(fd)
    if problem:
        problems.append(problem)
    if names:
        x, acl, problems = read_xattrs(fd)
        if x:
            meta["x"] = x
        if acl:
            meta["acl"] = acl
    fl, problem = _stored_flags(fd)
    if problem:
        problems.append(problem)
    elif fl:
        meta["fl"] = fl
    return meta, problems


def bare_inode_flags(fd: int) -> int | None:
    """The stored inode flags of an open file that has no extended attributes (0 where the
    filesystem keeps none), or None when :func:`inode_meta` has more to find or to report
    (extended attributes, an ACL, a read that failed)."""
    names, problem = _xattr_names(fd)
    if names or problem:
        return None
    fl, problem = _stored_flags(fd)
    return None if problem else fl


def _xattr_names(fd: int) -> tuple[list[str], str | None]:
    """The names of an open item's extended attributes (none where the filesystem keeps
    none), and the problem if they cannot be listed."""
    try:
        return os.listxattr(fd), None
    except OSError as exc:
        return [], None if exc.errno in _UNSUPPORTED else f"extended attributes not readable: {_why(exc)}"


def _stored_flags(fd: int) -> tuple[int, str | None]:
    """An open item's inode flags that a tree stores (0 where the filesystem keeps none), and
    the problem if they cannot be read."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    except OSError as exc:
        return 0, None if exc.errno in _UNSUPPORTED else f"inode flags not readable: {_why(exc)}"
    return int.from_bytes(buf, sys.byteorder) & STORED_FLAGS, None


def path_meta(path: bytes) -> tuple[dict[str, Any], list[str]]:
    """The ``x`` and ``acl`` keys of an item that is never opened (symlink, fifo, device, socket)."""
    meta: dict[str, Any] = {}
    x, acl, problems = read_xattrs(deep_path.xattr_path(path))
    if x:
        meta["x"] = x
    if acl:
        meta["acl"] = acl
    return meta, problems


def apply_xattrs(
    target: int | bytes,
    x: dict[bytes, bytes],
    acl: dict[str, list[list[Any]]] | None,
    uid: Callable[[str, int], int],
    gid: Callable[[str, int], int],
) -> list[tuple[str, str]]:
    """Set a restored item's xattrs (security.capability last), then its ACL. ``target``: an open
    descriptor, or a path (symlinks not followed). Returns (code, message) for what failed."""

    def put(name: bytes, value: bytes) -> str:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as exc:
            return "only root can set it" if exc.errno in (errno.EPERM, errno.EACCES) else _why(exc)
        return ""

    failed: dict[str, list[str]] = {}
    for name in sorted(x, key=lambda n: n == CAPABILITY):  # security.capability last
        why = put(name, x[name])
        if why:
            failed.setdefault(why, []).append(name.decode("utf-8", "backslashreplace"))
    out = [
        ("xattr-not-restored", f"extended attributes not restored ({why}): {', '.join(names)}")
        for why, names in failed.items()
    ]
    for key, name in (("a", ACL_ACCESS), ("d", ACL_DEFAULT)):
        if acl and key in acl:
            what = "default ACL" if key == "d" else "ACL"
            try:
                why = put(name, build_acl(acl[key], uid, gid))
            except (KeyError, IndexError, TypeError, struct.error) as exc:
                why = f"malformed: {exc}"
            if why:
                out.append(("acl-not-restored", f"{what} not restored ({why}): {acl_text(acl[key])}"))
    return out
