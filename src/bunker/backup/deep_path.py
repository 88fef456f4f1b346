"""Filesystem calls that also work for paths longer than PATH_MAX.

The kernel refuses any path argument of PATH_MAX (4096) bytes or more with ENAMETOOLONG, yet a
tree can be much deeper than that: only each name is limited (NAME_MAX, 255 bytes). Every call
here takes a full path like its ``os`` namesake. A path shorter than :data:`SHORT` goes straight
to ``os`` (the only cost is one length check: normal trees keep their speed). A longer one is
reached through a descriptor of its parent directory: the longest ancestor that is short enough
is opened by path, every further component with ``openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)``
(a symlink among them is refused, never followed), and the call is made relative to that
descriptor (``dir_fd``). Extended attribute calls have no ``dir_fd`` in Python: they get a
``/proc/self/fd/N/name`` path (:func:`xattr_path`).

Walks visit the entries of one directory one after the other, so each thread keeps the
descriptor of the last deep parent it resolved: it is reused for the same directory, and for
another one the walk starts there (``..`` up to the common ancestor, then down), so descending or
coming back up one level costs one ``openat``, whatever the depth.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading

# below PATH_MAX (4096 bytes with the terminating NUL), with room to spare
SHORT = 4000

_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_local = threading.local()


class _Parent:
    """The cached descriptor of one directory (closed when replaced or when its thread ends)."""

    __slots__ = ("fd", "path")

    def __init__(self, path: bytes, fd: int) -> None:
        self.path, self.fd = path, fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def is_deep(path: bytes) -> bool:
    """Whether ``path`` is too long for a plain system call."""
    return len(path) >= SHORT


def _split(path: bytes) -> tuple[bytes, bytes]:
    """(parent, leaf) of a path, trailing slashes ignored."""
    path = path.rstrip(b"/") or b"/"
    head, _, leaf = path.rpartition(b"/")
    return head or (b"/" if path.startswith(b"/") else b"."), leaf


def _walk_down(fd: int, components: list[bytes]) -> int:
    """Open the directory ``components`` below the directory ``fd`` (which stays open), one
    component at a time, never following a symlink. Returns a new descriptor."""
    cur = fd
    try:
        for c in components:
            if not c or c == b".":
                continue
            nxt = os.open(c, _O_DIR | os.O_NOFOLLOW, dir_fd=cur)
            if cur != fd:
                os.close(cur)
            cur = nxt
    except BaseException:
        if cur != fd:
            os.close(cur)
        raise
    return os.dup(fd) if cur == fd else cur


def open_dir(path: bytes) -> int:
    """A new ``O_PATH`` descriptor of the directory ``path`` (of any length); the caller closes it."""
    if len(path) < SHORT:
        return os.open(path, _O_DIR)
    cut = path.rfind(b"/", 0, SHORT)
    if cut < 0:  # a relative path whose first components are long: start at the working directory
        top, rest = b".", path
    else:
        top, rest = path[:cut] or b"/", path[cut + 1 :]
    fd = os.open(top, _O_DIR)
    try:
        return _walk_down(fd, rest.split(b"/"))
    finally:
        os.close(fd)


def _parent(path: bytes) -> tuple[int, bytes]:
    """(descriptor of the parent directory, leaf name) of a deep path. The descriptor belongs to
    this thread's cache: it stays valid only until this thread's next call of this module."""
    head, leaf = _split(path)
    cached: _Parent | None = getattr(_local, "parent", None)
    if cached is not None and cached.path == head:
        return cached.fd, leaf
    fd = _from_cached(cached, head) if cached is not None else None
    if fd is None:
        fd = open_dir(head)
    _local.parent = _Parent(head, fd)  # the one it replaces is closed
    return fd, leaf


def _from_cached(cached: _Parent, head: bytes) -> int | None:
    """A new descriptor of ``head`` reached from the cached directory: up to their closest common
    ancestor with ``..``, then down (a walk that goes deep and comes back up costs one step per
    level). None when the path from the top is as short, or when the common ancestor lies in the
    part opened by path: only steps that were walked without following symlinks are retraced."""
    a, b = cached.path, head
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the longest common prefix, by bisection (each comparison runs in C)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    common = lo  # ... cut back to whole components
    if not ((common == len(a) or a[common] == 0x2F) and (common == len(b) or b[common] == 0x2F)):
        common = a.rfind(b"/", 0, common)
    if common < SHORT:
        return None
    ups = a.count(b"/", common)
    downs = b[common + 1 :].split(b"/") if common < len(b) else []
    if ups + len(downs) >= b.count(b"/", b.rfind(b"/", 0, SHORT)):
        return None
    return _walk_down(cached.fd, [b".."] * ups + downs)


def forget() -> None:
    """Close this thread's cached descriptor. Backup, restore and verify start with it: what an
    earlier run in the same process cached may have been replaced since."""
    _local.parent = None


def lstat(path: bytes) -> os.stat_result:
    """``os.lstat`` for a path of any length."""
    if len(path) < SHORT:
        return os.lstat(path)
    fd, leaf = _parent(path)
    return os.lstat(leaf, dir_fd=fd)


def lexists(path: bytes) -> bool:
    """``os.path.lexists`` for a path of any length."""
    try:
        lstat(path)
    except OSError:
        return False
    return True


def open(path: bytes, flags: int, mode: int = 0o777) -> int:  # called as deep_path.open
    """``os.open`` for a path of any length."""
    if len(path) < SHORT:
        return os.open(path, flags, mode)
    fd, leaf = _parent(path)
    return os.open(leaf, flags, mode, dir_fd=fd)


def listdir(path: bytes) -> list[bytes]:
    """The names in a directory of any length of path, as bytes (unsorted)."""
    if len(path) < SHORT:
        return os.listdir(path)
    fd = open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # listdir(fd) gives str names (surrogate-escaped): fsencode gives back the raw bytes
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)


def readlink(path: bytes) -> bytes:
    """``os.readlink`` for a path of any length."""
    if len(path) < SHORT:
        return os.readlink(path)
    fd, leaf = _parent(path)
    return os.readlink(leaf, dir_fd=fd)


def mkdir(path: bytes, mode: int = 0o777) -> None:
    """``os.mkdir`` for a path of any length."""
    if len(path) < SHORT:
        os.mkdir(path, mode)
        return
    fd, leaf = _parent(path)
    os.mkdir(leaf, mode, dir_fd=fd)


def makedirs(path: bytes, mode: int = 0o777) -> None:
    """``os.makedirs(path, mode, exist_ok=True)`` for a path of any length."""
    if len(path) < SHORT:
        os.makedirs(path, mode, exist_ok=True)
        return
    missing: list[bytes] = []
    p = path.rstrip(b"/")
    while True:  # find the deepest existing ancestor (no recursion: the depth is unbounded)
        try:
            st = lstat(p)
        except FileNotFoundError:
            missing.append(p)
            p = _split(p)[0]
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", p)
        break
    for p in reversed(missing):
        try:
            mkdir(p, mode)
        except FileExistsError:
            if not stat.S_ISDIR(lstat(p).st_mode):
                raise


def symlink(target: bytes, path: bytes) -> None:
    """``os.symlink`` for a link path of any length (the target is stored, never resolved)."""
    if len(path) < SHORT:
        os.symlink(target, path)
        return
    fd, leaf = _parent(path)
    os.symlink(target, leaf, dir_fd=fd)


def mkfifo(path: bytes, mode: int) -> None:
    """``os.mkfifo`` for a path of any length."""
    if len(path) < SHORT:
        os.mkfifo(path, mode)
        return
    fd, leaf = _parent(path)
    os.mkfifo(leaf, mode, dir_fd=fd)


def mknod(path: bytes, mode: int, device: int = 0) -> None:
    """``os.mknod`` for a path of any length."""
    if len(path) < SHORT:
        os.mknod(path, mode, device)
        return
    fd, leaf = _parent(path)
    os.mknod(leaf, mode, device, dir_fd=fd)


def unlink(path: bytes) -> None:
    """``os.unlink`` for a path of any length."""
    if len(path) < SHORT:
        os.unlink(path)
        return
    fd, leaf = _parent(path)
    os.unlink(leaf, dir_fd=fd)


def link(src: bytes, dst: bytes) -> None:
    """``os.link(src, dst, follow_symlinks=False)`` for paths of any length."""
    if len(src) < SHORT and len(dst) < SHORT:
        os.link(src, dst, follow_symlinks=False)
        return
    shead, sleaf = _split(src)
    sfd = open_dir(shead)  # its own descriptor: the cache holds one directory, dst's
    try:
        dfd, dleaf = _parent(dst)
        os.link(sleaf, dleaf, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(sfd)


def chown(path: bytes, uid: int, gid: int) -> None:
    """``os.chown(path, uid, gid, follow_symlinks=False)`` for a path of any length."""
    if len(path) < SHORT:
        os.chown(path, uid, gid, follow_symlinks=False)
        return
    fd, leaf = _parent(path)
    os.chown(leaf, uid, gid, dir_fd=fd, follow_symlinks=False)


def chmod(path: bytes, mode: int) -> None:
    """``os.chmod`` for a path of any length (follows a symlink: Linux cannot change a
    symlink's own mode, so callers never pass one)."""
    if len(path) < SHORT:
        os.chmod(path, mode)
        return
    fd, leaf = _parent(path)
    os.chmod(leaf, mode, dir_fd=fd)


def utime(path: bytes, ns: tuple[int, int]) -> None:
    """``os.utime(path, ns=ns, follow_symlinks=False)`` for a path of any length."""
    if len(path) < SHORT:
        os.utime(path, ns=ns, follow_symlinks=False)
        return
    fd, leaf = _parent(path)
    os.utime(leaf, ns=ns, dir_fd=fd, follow_symlinks=False)


def xattr_path(path: bytes) -> bytes:
    """A path the xattr calls (``os.getxattr`` ... with ``follow_symlinks=False``) accept for
    ``path``: itself when short, else ``/proc/self/fd/N/leaf`` through the parent's descriptor
    (the magic link is followed, the leaf is not). Valid until this thread's next call of this
    module."""
    if len(path) < SHORT:
        return path
    fd, leaf = _parent(path)
    return b"/proc/self/fd/%d/%s" % (fd, leaf)
