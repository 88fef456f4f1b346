"""A repository whose storage has no room left, whatever the backend: one error, one next step.

A full disk or a used-up quota is not an unreachable repository: the storage was reached and
answered. So it is a :class:`RepositoryFull`, deliberately not a StorageError (on which a backup
falls back to the local spool, as if the repository could not be reached): the run stops with
exit 4, says what happened, what it means for the backup, and where space must be freed, which
depends on where the storage is (this machine's disk, the disk of a `bunker serve` server, an
object store or WebDAV service).

What counts as "full" is recognised here only, from signals that mean nothing else:

- an errno: ENOSPC, EDQUOT (a local disk; `bunker serve` on its server);
- HTTP 507 Insufficient Storage (RFC 4918: WebDAV servers such as Apache mod_dav and Nextcloud,
  MinIO's ``XMinioStorageFull``), as OpenDAL shows it (``status: 507``);
- an object store's error code for a full disk or a used-up quota (MinIO, Ceph RGW, Backblaze B2);
- the C library's text for ENOSPC or EDQUOT in a server's answer (wsgidav answers a full disk
  with 500 and ``OSError(28, 'No space left on device')``).

An sftp server cannot tell: SFTP version 3 has no status for it, and OpenSSH's sftp-server and
internal-sftp answer a full disk with SSH_FX_FAILURE "Failure", which means anything.
"""

from __future__ import annotations

import errno
import re

from bunker.errors import BunkerError, ExitCode

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# strerror(ENOSPC), strerror(EDQUOT) of glibc, musl and the BSDs (macOS: "Disc quota exceeded")
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "Disc quota exceeded")
INSUFFICIENT_STORAGE = 507
# object-store error codes that mean "no room": MinIO (drives full; bucket quota), Ceph RGW
# (user or bucket quota), Backblaze B2 native API (the account's storage cap)
FULL_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded", "storage_cap_exceeded"})

MEANING = (
    "nothing stored before is damaged and nothing half-written was kept; a backup stopped here wrote no new snapshot."
)

_STATUS_507 = re.compile(rf"\bstatus: {INSUFFICIENT_STORAGE}\b")
_CODE = re.compile(r'\bcode: "([^"]*)"')


class RepositoryFull(BunkerError):
    """The storage that holds a repository (or spool) has no room left: a full disk or a used-up
    quota, on this machine, on a server or at a service. ``free_step`` says where to free space."""

    def __init__(self, message: str, hint: str = "", *, exit_code: int | None = None, free_step: str = "") -> None:
        super().__init__(message, hint, exit_code=exit_code)
        self.free_step = free_step

    def with_figures(self, kept: str, need: str) -> RepositoryFull:
        """The same error, saying what the stopped run stored (``kept``: kept, and used by the
        next run instead of storing it again) and how much room the next run needs (``need``)."""
        return RepositoryFull(
            f"{self.message}; before that, this run stored {kept}: kept, and the next run uses it instead of "
            "storing it again",
            f"{MEANING} {self.free_step}: the next run needs room for {need}. Then run the same command again",
            exit_code=self.exit_code,
            free_step=self.free_step,
        )


def repository_full(what: str, problem: str, free_step: str) -> RepositoryFull:
    """The error for a full repository: ``what`` failed (``could not write X into Y``) because
    ``problem``; ``free_step`` says where to free space (a capitalised clause, no full stop)."""
    return RepositoryFull(
        f"{what}: {problem}",
        f"{MEANING} {free_step}, then run the same command again",
        exit_code=ExitCode.FATAL,
        free_step=free_step,
    )


def local_disk_full(what: str, reason: str, root: str, free: str) -> RepositoryFull:
    """This machine's disk that holds the directory ``root`` is full (``reason``: strerror;
    ``free``: how much is free now, as text)."""
    return repository_full(
        what, f"the disk that holds it is full ({reason}; {free})", f"Free space on that disk (`df -h {root}` shows it)"
    )


def server_disk_full(what: str, server_says: str, server: str, repo: str) -> RepositoryFull:
    """The disk of the `bunker serve` server ``server`` that holds its repository ``repo`` is
    full; ``server_says`` is the server's own message."""
    shown = f"`df -h {repo}` on the server shows it" if repo else "`df -h` on the server shows it"
    return repository_full(
        what,
        f"the server's disk is full (the server says: {server_says})",
        f"Free space on the server's disk that holds the repository ({server}; {shown})",
    )


def service_full(what: str, detail: str, label: str) -> RepositoryFull:
    """The ``label`` service (WebDAV, S3...) answered that it has no room: full disks or a
    used-up quota (``detail``: its answer)."""
    return repository_full(
        what,
        f"the {label} storage is full or its quota is used up ({detail})",
        f"Free space on the {label} server, or have its quota raised (by its administrator, or in the account's "
        "storage settings)",
    )


def is_full_errno(code: int | None) -> bool:
    """Whether an OSError's errno means a full disk or a used-up quota."""
    return code in FULL_ERRNOS


def full_reason(text: str) -> str | None:
    """What in a storage service's error (OpenDAL's text of it, with the service's answer) says
    that the storage has no room: an object store's error code, HTTP 507, or ENOSPC/EDQUOT's text
    in the answer; None when nothing does."""
    for m in _CODE.finditer(text):
        if m.group(1) in FULL_CODES:
            return m.group(1)
    if _STATUS_507.search(text):
        return f"HTTP {INSUFFICIENT_STORAGE} Insufficient Storage"
    for t in FULL_TEXTS:
        if t in text:
            return f"the server says {t!r}"
    return None
