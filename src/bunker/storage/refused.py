"""A repository that was reached but refuses to be written: read-only, or not this user's to write.

Unreachable and refused are different faults. An *unreachable* repository (no network, the
server down, a removable disk not mounted) is expected to come back by itself: a backup goes to
the local spool quietly (level note) and is forwarded later. A *refused* repository answered, and
will keep refusing until someone acts: a disk the kernel remounted read-only after errors (ext4
``errors=remount-ro``), a directory whose permissions changed, credentials that may read but not
write, a `bunker serve` whose disk refuses writes. So a refusal is :class:`StorageRefused`: still
a StorageError, so that a backup keeps its data in the spool, but the run ends at level ``err``
at once (exit 3) with the next step, instead of passing as ``note`` for days.

A full disk or a used-up quota is a third case (storage/full.py): the run stops (exit 4) and does
not spool, since freeing space and running again is all it takes.

What counts as "refused" is recognised here and by each backend's error mapping:

- a local disk: EROFS, EACCES, EPERM (``errno_refusal``);
- an object store: 403 / AccessDenied and the like (OpenDAL's PermissionDenied);
- sftp: SSH_FX_PERMISSION_DENIED, and SSH_FX_FAILURE for a write (OpenSSH's sftp-server answers
  a read-only or full disk with "Failure": it answered, so the repository was reached);
- `bunker serve`: REFUSED replies (an append-only server's refusal), and FAILED with the kind
  ``refused`` (FORMAT.md section 22: the server's disk refuses writes).
"""

from __future__ import annotations

import errno
import os

from bunker.errors import ExitCode, StorageError

REFUSED_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class StorageRefused(StorageError):
    """The storage was reached and refuses to store (or read) objects: read-only, permissions,
    credentials without write access. A backup spools and ends at level err; other commands stop
    (exit 4) with the next step. ``fix`` is what makes the storage take writes again (a clause
    without a full stop); the hint adds "then run the command again"."""

    def __init__(self, message: str, fix: str, *, exit_code: int | None = None) -> None:
        super().__init__(
            message, f"{fix}, then run the command again", exit_code=ExitCode.FATAL if exit_code is None else exit_code
        )
        self.fix = fix


class NodeStoreFull(StorageError):
    """A node answered that it cannot take this backup's packs now: its store is full of data its
    upstream has not recorded yet, or this client's quota there is used up (docs/hierarchy.md).
    Not a fault of this machine and not for ever: the node frees room once its upstream records
    what it holds. A backup keeps its data in the spool and the run ends at level warn."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message, hint, exit_code=ExitCode.WARN)


def is_refused_errno(code: int | None) -> bool:
    """Whether an OSError's errno means the storage refuses (read-only, permissions)."""
    return code in REFUSED_ERRNOS


def local_refusal(what: str, exc: OSError, root: str) -> StorageRefused:
    """This machine's directory ``root`` refused: read-only filesystem or permissions."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        return StorageRefused(
            f"{what}: {reason}: the filesystem that holds the repository is mounted read-only",
            "a disk with errors is often remounted read-only by the kernel (`dmesg` says so): repair it (fsck) "
            f"or remount it read-write (`mount -o remount,rw` on the mount point of {root})",
        )
    return StorageRefused(
        f"{what}: {reason}: this user ({_user()}) may not write into the repository",
        f"make {root} and everything in it writable by this user (or run bunker as the user that owns it)",
    )


def _user() -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(os.geteuid()).pw_name}, uid {os.geteuid()}"
    except (KeyError, ImportError):
        return f"uid {os.geteuid()}"
