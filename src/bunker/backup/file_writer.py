"""Writing one restored file and applying an entry's metadata. Shared by the restorer's threads
(large files) and its worker processes (small files)."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable
from typing import Any, NamedTuple

from bunker.errors import BunkerError
from bunker.repo.blob_reader import BlobRef

# A chunk that could not be resolved in the main process (missing index entry, damaged trailer):
# its raw length if known, and why.
Unresolved = tuple[int, str]
Piece = BlobRef | Unresolved


class WriteResult(NamedTuple):
    """status: ok, damaged (written with zero-filled gaps, ``message`` lists them), error."""

    status: str
    nbytes: int
    message: str = ""
    errno: int = 0
    meta_warning: str = ""


def write_file(
    path: bytes,
    pieces: list[Piece],
    fetch: Callable[[BlobRef], bytes],
    *,
    fresh: bool = False,
    meta: Callable[[int], str] | None = None,
) -> WriteResult:
    """Create ``path`` and write its chunks in order. A chunk that cannot be read leaves a hole
    of its length (the rest of the file is still right) and is reported. ``fresh``: the parent
    directory was created empty by this restore, so nothing can be in the way. ``meta`` applies
    owner, mode and times through the open descriptor once the data is written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if fresh:
            flags |= os.O_EXCL
        else:
            remove_existing(path, keep_regular=True)
            flags |= os.O_TRUNC
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        return WriteResult("error", 0, f"cannot create file: {exc.strerror}", exc.errno or 0)
    pos = 0
    gaps: list[str] = []
    try:
        for piece in pieces:
            if isinstance(piece, BlobRef):
                try:
                    data = fetch(piece)
                except BunkerError as exc:
                    gaps.append(f"bytes {pos}-{pos + piece.raw_length}: {exc.message}")
                    pos += piece.raw_length
                    os.lseek(fd, pos, os.SEEK_SET)
                    continue
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                pos += len(data)
            else:
                length, why = piece
                gaps.append(f"bytes {pos}-{pos + length}: {why}")
                pos += length
                os.lseek(fd, pos, os.SEEK_SET)
        if gaps:
            os.ftruncate(fd, pos)
        warning = meta(fd) if meta is not None else ""
    except OSError as exc:
        return WriteResult("error", pos, f"cannot write file: {exc.strerror}", exc.errno or 0)
    finally:
        os.close(fd)
    if gaps:
        more = f" (+{len(gaps) - 5} more)" if len(gaps) > 5 else ""
        return WriteResult("damaged", pos, "; ".join(gaps[:5]) + more, meta_warning=warning)
    return WriteResult("ok", pos, meta_warning=warning)


def apply_meta(path: bytes, e: dict[str, Any], as_root: bool, numeric_owner: bool) -> str:
    """Owner (as root), mode and times of one restored item; returns a warning or ""."""
    try:
        if as_root and "u" in e:
            uid, gid = (e["u"], e["g"]) if numeric_owner else owner_ids(e)
            os.chown(path, uid, gid, follow_symlinks=False)
        if e["t"] != "l" and "m" in e:
            os.chmod(path, e["m"])
        if "mt" in e:
            os.utime(path, ns=(e.get("at", e["mt"]), e["mt"]), follow_symlinks=False)
    except OSError as exc:
        return f"metadata not fully restored: {exc.strerror}"
    return ""


def apply_meta_fd(fd: int, e: dict[str, Any], as_root: bool, numeric_owner: bool) -> str:
    """Owner (as root), mode and times of a regular file through its open descriptor (saves the
    path lookups of :func:`apply_meta`); returns a warning or ""."""
    try:
        if as_root and "u" in e:
            uid, gid = (e["u"], e["g"]) if numeric_owner else owner_ids(e)
            os.fchown(fd, uid, gid)
        if "m" in e:
            os.fchmod(fd, e["m"])
        if "mt" in e:
            os.utime(fd, ns=(e.get("at", e["mt"]), e["mt"]))
    except OSError as exc:
        return f"metadata not fully restored: {exc.strerror}"
    return ""


_owner_cache: dict[tuple[str, str], tuple[int | None, int | None]] = {}


def owner_ids(e: dict[str, Any]) -> tuple[int, int]:
    """Map stored user/group names to this machine's ids (fall back to the stored ids)."""
    key = (e.get("U", ""), e.get("G", ""))
    if key not in _owner_cache:
        u = g = None
        with contextlib.suppress(KeyError):
            u = pwd.getpwnam(key[0]).pw_uid if key[0] else None
        with contextlib.suppress(KeyError):
            g = grp.getgrnam(key[1]).gr_gid if key[1] else None
        _owner_cache[key] = (u, g)
    u, g = _owner_cache[key]
    return (e["u"] if u is None else u), (e["g"] if g is None else g)


def remove_existing(path: bytes, keep_regular: bool = False) -> None:
    """Clear the way for a restored item (a directory in the way is an error)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way", path)
    if keep_regular and stat.S_ISREG(st.st_mode):
        return
    os.unlink(path)
