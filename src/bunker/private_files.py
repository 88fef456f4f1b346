"""Files and directories bunker keeps on this machine (key files, chain heads and session records,
the spool, the files and index caches): private to the user whatever the umask, and written so
that nobody else can steer a write (docs/security.md, section 12, "Permissions").

- A directory bunker creates is 0700, and so is every missing parent it creates on the way.
  Directories of bunker's own (the ``bunker`` directories in the config, data and cache base
  directories, and everything below them) that an older version left wider are tightened to
  0700 when bunker next uses them. Directories bunker did not make (the XDG base directories,
  the directory of a ``--out FILE``) are never changed.
- A file is written whole under a random name in its own directory (created with O_EXCL and
  O_NOFOLLOW, mode 0600 from the start), fsynced, renamed over the final name, and the directory
  fsynced: a reader sees the old file or the new one, and a name planted in advance (a symlink,
  another user's file) is never written through. The temp file is removed on any failure.
"""

from __future__ import annotations

import contextlib
import os
import stat

from bunker import dirs

FILE_MODE = 0o600
DIR_MODE = 0o700
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_TRIES = 100
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def own_roots() -> tuple[str, ...]:
    """Bunker's own directories on this machine (dirs.py): what may be tightened."""
    return tuple(os.path.abspath(p) for p in (dirs.config_dir(), dirs.data_dir(), dirs.cache_dir()))


def _is_own(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def _tighten(path: str, mode: int, want_dir: bool) -> None:
    """Take the group's and others' bits off ``path`` if it is ours and of the expected kind
    (a symlink the user made to another disk is followed: the directory is still bunker's)."""
    try:
        st = os.stat(path) if want_dir else os.lstat(path)
    except OSError:
        return
    kind_ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if kind_ok and st.st_uid == os.geteuid() and st.st_mode & 0o777 != mode and st.st_mode & 0o077:
        with contextlib.suppress(OSError):
            os.chmod(path, mode)


def private_dirs(path: str) -> str:
    """Make the directory ``path`` exist: every missing directory on the way is created 0700
    whatever the umask; bunker's own directories on the way are tightened to 0700. Returns the
    absolute path."""
    path = os.path.abspath(path)
    roots = own_roots()
    chain = []
    p = path
    while True:
        chain.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for p in reversed(chain):
        if os.path.isdir(p):
            if _is_own(p, roots):
                _tighten(p, DIR_MODE, want_dir=True)
            continue
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            if _is_own(p, roots):
                _tighten(p, DIR_MODE, want_dir=True)
            continue
        # the umask may have taken bits off: 0700 exactly, never more
        os.chmod(p, DIR_MODE)
    return path


def tighten_own(path: str, *, children: bool = False) -> None:
    """Tighten bunker's own directories that already exist along ``path`` (and ``path`` itself
    if it is one; with ``children``, the directories right below it too: a repository's or the
    spool's prefix directories): for what bunker uses without creating it (key files, the
    default repository, the spool). Creates nothing; paths outside bunker's own directories are
    left alone."""
    path = os.path.abspath(path)
    roots = own_roots()
    if children and _is_own(path, roots):
        with contextlib.suppress(OSError), os.scandir(path) as entries:
            for e in entries:
                if e.is_dir():
                    _tighten(e.path, DIR_MODE, want_dir=True)
    p = path
    while _is_own(p, roots):
        if os.path.isdir(p):
            _tighten(p, DIR_MODE, want_dir=True)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new file under an unpredictable name next to ``name``, open for writing, mode 0600."""
    for _ in range(_TEMP_TRIES):
        tmp = os.path.join(directory, f".{name[:180]}.{os.urandom(8).hex()}.tmp")
        try:
            fd = os.open(tmp, _CREATE, FILE_MODE)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken owner bits off
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp
    raise FileExistsError(f"no free temporary name in {directory}")


def fsync_dir(directory: str) -> None:
    """Make the directory's entries (a rename into it) durable; a filesystem that cannot fsync a
    directory is let be."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_private_file(path: str, data: str | bytes, *, durable: bool = True) -> None:
    """Replace ``path`` atomically with ``data`` (text is written as UTF-8), mode 0600 and owned
    by this user, through a random temp name (see the module docstring). ``durable``: fsync the
    file and the directory (off only for caches that are rebuilt when lost)."""
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    private_dirs(directory)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = _create_temp(directory, name)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def private_file(path: str, side_files: tuple[str, ...] = ()) -> str:
    """Make ``path`` a file private to this user before a library opens it by name (sqlite): a
    missing one is created empty with mode 0600 (never through a planted symlink), an existing
    one of ours is tightened to 0600, and so are its ``side_files`` (suffixes, e.g. sqlite's
    -wal and -shm, which sqlite creates with the database file's mode). Returns the absolute path."""
    path = os.path.abspath(path)
    private_dirs(os.path.dirname(path))
    try:
        fd = os.open(path, _CREATE, FILE_MODE)
    except FileExistsError:
        _tighten(path, FILE_MODE, want_dir=False)
    else:
        try:
            os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
    for suffix in side_files:
        _tighten(path + suffix, FILE_MODE, want_dir=False)
    return path
