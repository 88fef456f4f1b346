"""Files a command writes where the user said (key exports, put keys, archives): a filesystem
error is a message that names the file and the next step, never a traceback."""

from __future__ import annotations

import errno
import os

from bunker.errors import BunkerError, ExitCode
from bunker.private_files import write_private_file

_HINTS = {
    errno.EROFS: "that filesystem is mounted read-only: name a file on a writable one",
    errno.EACCES: "this user may not write there: name a file in a directory you own",
    errno.EPERM: "the file or its directory does not take changes (immutable?): name another file",
    errno.ENOSPC: "that filesystem is full: free space there, or name a file on another one",
    errno.EDQUOT: "your disk quota is used up: free space, or name a file on another filesystem",
    errno.ENOENT: "its directory does not exist: create it first, or name a file in an existing directory",
    errno.ENOTDIR: "a part of that path is a file, not a directory: name another file",
    errno.EISDIR: "that is a directory: name a file in it",
}


def os_failure(exc: OSError, doing: str, path: str | bytes | None = None) -> BunkerError:
    """A fatal error for a filesystem failure while ``doing`` something with ``path`` (default:
    the file the error names)."""
    name = path if path is not None else exc.filename
    shown = os.fsdecode(name) if name is not None else ""
    where = f" {shown}" if shown else ""
    return BunkerError(
        f"cannot {doing}{where}: {exc.strerror or exc}",
        _HINTS.get(exc.errno or 0, f"check that{where or ' the file'} can be written, or name another file"),
        exit_code=ExitCode.FATAL,
    )


def check_writable(dest: str, what: str) -> None:
    """Fail before any work is done when ``dest``'s directory takes no new file (a key must not
    be issued, nor a passphrase asked for, only to find that its file cannot be written)."""
    directory = os.path.dirname(os.path.abspath(dest))
    probe = os.path.join(directory, f".{os.path.basename(dest)[:180]}.{os.urandom(6).hex()}.probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise os_failure(exc, f"write {what} to", dest) from None
    os.close(fd)
    os.unlink(probe)


def write_output(dest: str, data: str | bytes, what: str) -> None:
    """Write a private file where the user asked (atomically, mode 0600); a filesystem error is
    a fatal BunkerError naming ``dest``."""
    try:
        write_private_file(dest, data)
    except OSError as exc:
        raise os_failure(exc, f"write {what} to", dest) from None


def unexpected_os_error(exc: OSError) -> BunkerError:
    """A filesystem error no command turned into its own message: still a message (the file,
    what the system said, where to look), never a traceback."""
    name = os.fsdecode(exc.filename) if exc.filename is not None else ""
    return BunkerError(
        f"a filesystem operation failed{' on ' + name if name else ''}: {exc.strerror or exc}; the command stopped "
        "there (what it had finished stays as it was)",
        (
            f"check that disk and the permissions there (`ls -ld {name}`, `df -h {os.path.dirname(name) or '.'}`), "
            "then run the command again"
            if name
            else "check the disks and permissions of the files this command uses, then run it again"
        ),
        exit_code=ExitCode.FATAL,
    )
