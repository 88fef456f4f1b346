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

Below a *confined* root (:func:`confined`: a restore's target, a tree ``verify`` reads), every
path is resolved that way whatever its length: from the root's descriptor, one component at a
time with ``O_NOFOLLOW | O_DIRECTORY``, so a symlink planted in an intermediate component (before
or during the run, by anyone) makes the call fail instead of leading elsewhere, and the leaf is
never followed either (``open`` gets ``O_NOFOLLOW``, ``chmod`` refuses a symlink). Each thread
keeps the descriptors of the directories it resolved last (:data:`BELOW_CACHE`), by path, so a
walk costs about one ``openat`` per directory it enters. The root itself is opened by path, as
its caller named it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator

# below PATH_MAX (4096 bytes with the terminating NUL), with room to spare
SHORT = 4000

_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
# a directory opened to list it or open its entries (never a symlink, never blocking)
READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_local = threading.local()
BELOW_CACHE = 64  # directories below a confined root whose descriptors each thread keeps
# confined roots (normalized path ending in "/") -> their O_PATH descriptor; process-wide
_roots: dict[bytes, int] = {}


class _Parent:
    """The cached descriptor of one directory (closed when replaced or when its thread ends)."""

    __slots__ = ("fd", "path")

    def __init__(self, path: bytes, fd: int) -> None:
        self.path, self.fd = path, fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Below:
    """This thread's descriptors of directories below confined roots, by path, least recently
    used first (all closed when the thread ends or :func:`forget` drops them)."""

    __slots__ = ("fds",)

    def __init__(self) -> None:
        self.fds: dict[bytes, int] = {}

    def get(self, path: bytes) -> int | None:
        fd = self.fds.pop(path, None)
        if fd is not None:
            self.fds[path] = fd
        return fd

    def put(self, path: bytes, fd: int) -> None:
        old = self.fds.pop(path, None)
        if old is not None:
            os.close(old)
        self.fds[path] = fd
        while len(self.fds) > BELOW_CACHE:  # the newest (the caller's) is never the one closed
            with contextlib.suppress(OSError):
                os.close(self.fds.pop(next(iter(self.fds))))

    def __del__(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def _root_key(root: bytes) -> bytes:
    root = os.path.abspath(root)
    return root if root.endswith(b"/") else root + b"/"


def confine(root: bytes, expect: tuple[int, int] | None = None) -> tuple[int, int]:
    """From now on in this process, resolve every path strictly below the directory ``root``
    from its descriptor without following symlinks (see the module's doc). ``root`` itself is
    opened by path; ``expect``: the (st_dev, st_ino) it must have (a worker process confining
    itself to the directory its parent confined). Returns the root's (st_dev, st_ino)."""
    key = _root_key(root)
    fd = open_dir(key.rstrip(b"/") or b"/")
    st = os.fstat(fd)
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        os.close(fd)
        raise OSError(errno.ESTALE, "the directory was replaced while in use", root)
    old = _roots.pop(key, None)
    if old is not None:
        os.close(old)
    _roots[key] = fd
    forget()
    return st.st_dev, st.st_ino


def release(root: bytes) -> None:
    """Undo :func:`confine` (this thread's cached descriptors are dropped too)."""
    fd = _roots.pop(_root_key(root), None)
    if fd is not None:
        os.close(fd)
    forget()


@contextlib.contextmanager
def confined(root: bytes) -> Iterator[tuple[int, int]]:
    """:func:`confine` ``root`` for the duration of a ``with`` block; gives its (st_dev, st_ino)."""
    ident = confine(root)
    try:
        yield ident
    finally:
        release(root)


def _confined(path: bytes) -> tuple[bytes, int] | None:
    """(root key, root descriptor) of the innermost confined root strictly above ``path``."""
    best: tuple[bytes, int] | None = None
    for key, fd in _roots.items():
        if len(path) > len(key) and path.startswith(key) and (best is None or len(key) > len(best[0])):
            best = (key, fd)
    return best


def _below(key: bytes, root_fd: int, path: bytes) -> tuple[int, bytes]:
    """(descriptor of the parent directory, leaf) of ``path`` below the confined root ``key``,
    every component reached with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink or a non-directory on
    the way raises NotADirectoryError, ``..`` PermissionError). The descriptor belongs to this
    thread's cache: valid until this thread's next call of this module."""
    rel = path[len(key) :].rstrip(b"/")
    head, _, leaf = rel.rpartition(b"/")
    if leaf in (b"", b".", b".."):
        raise PermissionError(errno.EACCES, "not a name below the restore's root", path)
    if not head:
        return root_fd, leaf
    cache: _Below | None = getattr(_local, "below", None)
    if cache is None:
        cache = _local.below = _Below()
    fd = cache.get(key + head)
    if fd is not None:
        return fd, leaf
    # start at the deepest directory on the way that this thread holds, else at the root
    cur, done = root_fd, 0
    up = head
    while True:
        up, sep, _ = up.rpartition(b"/")
        if not sep:
            break
        hit = cache.get(key + up)
        if hit is not None:
            cur, done = hit, len(up) + 1
            break
    pos = done
    for c in head[done:].split(b"/"):
        pos += len(c) + 1
        if c in (b"", b"."):
            continue
        if c == b"..":
            raise PermissionError(errno.EACCES, "'..' below the restore's root", path)
        nxt = os.open(c, _O_DIR | os.O_NOFOLLOW, dir_fd=cur)
        cache.put(key + head[: pos - 1], nxt)
        cur = nxt
    return cur, leaf


def _at(path: bytes) -> tuple[int | None, bytes, bool]:
    """(dir_fd, name, below a confined root) to make a call on ``path`` with: ``(None, path,
    False)`` for a short path outside every confined root."""
    if _roots:
        root = _confined(path)
        if root is not None:
            return (*_below(root[0], root[1], path), True)
    if len(path) < SHORT:
        return None, path, False
    fd, leaf = _parent(path)
    return fd, leaf, False


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


def open_parent(path: bytes) -> int:
    """A new ``O_PATH`` descriptor of the directory that holds ``path``, reached as every call of
    this module reaches it (below a confined root: no symlink followed); the caller closes it.
    Calls with ``dir_fd=`` on it and the leaf name then need no lookup of the path's directories
    (a restore writes many files into one directory)."""
    fd, _, _ = _at(path)
    if fd is None:  # a short path outside every confined root
        cut = path.rfind(b"/")
        return os.open(path[:cut] if cut > 0 else b"/" if cut == 0 else b".", _O_DIR)
    return os.dup(fd)  # its own: the cached one is valid only until this thread's next call here


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
    """Close this thread's cached descriptors. Backup, restore and verify start with it: what an
    earlier run in the same process cached may have been replaced since."""
    _local.parent = None
    _local.below = None


def lstat(path: bytes) -> os.stat_result:
    """``os.lstat`` for a path of any length."""
    fd, leaf, _ = _at(path)
    return os.lstat(leaf, dir_fd=fd)


def lexists(path: bytes) -> bool:
    """``os.path.lexists`` for a path of any length."""
    try:
        lstat(path)
    except OSError:
        return False
    return True


def open(path: bytes, flags: int, mode: int = 0o777) -> int:  # called as deep_path.open
    """``os.open`` for a path of any length (below a confined root never following a symlink)."""
    fd, leaf, below = _at(path)
    return os.open(leaf, flags | (os.O_NOFOLLOW if below else 0), mode, dir_fd=fd)


def listdir(path: bytes) -> list[bytes]:
    """The names in a directory of any length of path, as bytes (unsorted)."""
    if len(path) < SHORT and not (_roots and _confined(path)):
        return os.listdir(path)
    fd = open(path, READ_DIR)
    try:
        # listdir(fd) gives str names (surrogate-escaped): fsencode gives back the raw bytes
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)


def readlink(path: bytes) -> bytes:
    """``os.readlink`` for a path of any length."""
    fd, leaf, _ = _at(path)
    return os.readlink(leaf, dir_fd=fd)


def mkdir(path: bytes, mode: int = 0o777) -> None:
    """``os.mkdir`` for a path of any length."""
    fd, leaf, _ = _at(path)
    os.mkdir(leaf, mode, dir_fd=fd)


def makedirs(path: bytes, mode: int = 0o777) -> None:
    """``os.makedirs(path, mode, exist_ok=True)`` for a path of any length."""
    if len(path) < SHORT and not (_roots and _confined(path)):
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
    fd, leaf, _ = _at(path)
    os.symlink(target, leaf, dir_fd=fd)


def mkfifo(path: bytes, mode: int) -> None:
    """``os.mkfifo`` for a path of any length."""
    fd, leaf, _ = _at(path)
    os.mkfifo(leaf, mode, dir_fd=fd)


def mknod(path: bytes, mode: int, device: int = 0) -> None:
    """``os.mknod`` for a path of any length."""
    fd, leaf, _ = _at(path)
    os.mknod(leaf, mode, device, dir_fd=fd)


def unlink(path: bytes) -> None:
    """``os.unlink`` for a path of any length."""
    fd, leaf, _ = _at(path)
    os.unlink(leaf, dir_fd=fd)


def link(src: bytes, dst: bytes) -> None:
    """``os.link(src, dst, follow_symlinks=False)`` for paths of any length."""
    sfd, sleaf, _ = _at(src)
    if sfd is None:
        dfd, dleaf, _ = _at(dst)
        os.link(sleaf, dleaf, dst_dir_fd=dfd, follow_symlinks=False)
        return
    sfd = os.dup(sfd)  # its own descriptor: resolving dst may close the cached one
    try:
        dfd, dleaf, _ = _at(dst)
        os.link(sleaf, dleaf, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(sfd)


_NOT_NAMES = (b"", b".", b"..")


def rename(src: bytes, dst: bytes) -> None:
    """``os.rename(src, dst)`` for paths of any length (neither is followed if a symlink)."""
    sfd, sleaf, _ = _at(src)
    cut = dst.rfind(b"/")
    leaf = dst[cut + 1 :]
    if sfd is not None and cut > 0 and src.rfind(b"/") == cut and src[:cut] == dst[:cut] and leaf not in _NOT_NAMES:
        # within one directory (a restored file put in place): one descriptor serves both names
        os.rename(sleaf, leaf, src_dir_fd=sfd, dst_dir_fd=sfd)
        return
    if sfd is None:
        dfd, dleaf, _ = _at(dst)
        os.rename(sleaf, dleaf, dst_dir_fd=dfd)
        return
    sfd = os.dup(sfd)  # its own descriptor: resolving dst may close the cached one
    try:
        dfd, dleaf, _ = _at(dst)
        os.rename(sleaf, dleaf, src_dir_fd=sfd, dst_dir_fd=dfd)
    finally:
        os.close(sfd)


def chown(path: bytes, uid: int, gid: int) -> None:
    """``os.chown(path, uid, gid, follow_symlinks=False)`` for a path of any length."""
    fd, leaf, _ = _at(path)
    os.chown(leaf, uid, gid, dir_fd=fd, follow_symlinks=False)


def chmod(path: bytes, mode: int) -> None:
    """``os.chmod`` for a path of any length. Linux cannot change a symlink's own mode, so callers
    never pass one; a short path outside confined roots is followed, any other one is refused
    (ELOOP) when the leaf is a symlink (it may have been planted since it was created)."""
    fd, leaf, _ = _at(path)
    if fd is None:
        os.chmod(path, mode)
        return
    # through an O_PATH descriptor of the leaf itself: fchmodat cannot refuse a symlink
    item = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        if stat.S_ISLNK(os.fstat(item).st_mode):
            raise OSError(errno.ELOOP, "a symlink's mode cannot be set", path)
        os.chmod(f"/proc/self/fd/{item}", mode)
    finally:
        os.close(item)


def utime(path: bytes, ns: tuple[int, int]) -> None:
    """``os.utime(path, ns=ns, follow_symlinks=False)`` for a path of any length."""
    fd, leaf, _ = _at(path)
    os.utime(leaf, ns=ns, dir_fd=fd, follow_symlinks=False)


def xattr_path(path: bytes) -> bytes:
    """A path the xattr calls (``os.getxattr`` ... with ``follow_symlinks=False``) accept for
    ``path``: itself when short, else ``/proc/self/fd/N/leaf`` through the parent's descriptor
    (the magic link is followed, the leaf is not). Valid until this thread's next call of this
    module."""
    fd, leaf, _ = _at(path)
    return path if fd is None else b"/proc/self/fd/%d/%s" % (fd, leaf)
