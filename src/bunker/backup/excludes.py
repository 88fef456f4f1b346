"""Exclusion patterns.

A pattern without "/" matches a file or directory name anywhere (``*.tmp``, ``node_modules``).
A pattern with "/" matches the whole absolute path (``/home/*/.cache``); ``*`` also matches "/".
An excluded directory is skipped with everything below it. Lines of an exclude file are patterns;
empty lines and lines starting with "#" are ignored.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable

from bunker.errors import BunkerError, ExitCode
from bunker.fs import deep_path

CACHEDIR_TAG = b"CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"  # https://bford.info/cachedir/

# Filesystems whose files are made up by the kernel: a backup of / keeps their mount points as
# empty directories and does not read them (unless the mount point itself is given as a path).
PSEUDO_FILESYSTEMS = frozenset(
    [
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "mqueue",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
        "efivarfs",
        "rpc_pipefs",
        "nsfs",
        "selinuxfs",
    ]
)


def mount_types(mountinfo: str = "/proc/self/mountinfo") -> dict[bytes, str]:
    """Mount point -> filesystem type, from the kernel's mount table ({} if it cannot be read)."""
    out: dict[bytes, str] = {}
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(b" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        # spaces, tabs, newlines and backslashes in mount points are written as octal escapes
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
        out[point] = right.split()[0].decode("ascii", "replace")
    return out


class Excludes:
    def __init__(
        self,
        patterns: list[str],
        skip_paths: list[str] | None = None,
        *,
        exclude_caches: bool = False,
        if_present: list[str] | None = None,
    ) -> None:
        names, paths = [], []
        for p in patterns:
            p = p.strip()
            if not p:
                continue
            if "/" in p:
                paths.append(fnmatch.translate(os.path.normpath(os.path.expanduser(p))))
            else:
                names.append(fnmatch.translate(p))
        self._name_re = re.compile("|".join(names).encode()) if names else None
        self._path_re = re.compile("|".join(paths).encode()) if paths else None
        self._skip = {os.fsencode(os.path.realpath(p)) for p in (skip_paths or [])}
        self.exclude_caches = exclude_caches
        self.if_present = [os.fsencode(n) for n in (if_present or [])]

    def tagged(self, dir_path: bytes) -> bytes | None:
        """The tag file that marks ``dir_path``'s contents as excluded (--exclude-caches: a
        CACHEDIR.TAG with the standard signature; --exclude-if-present NAME), or None."""
        for name in self.if_present:
            if deep_path.lexists(os.path.join(dir_path, name)):
                return name
        if self.exclude_caches:
            try:
                # O_NONBLOCK: a fifo of that name must not block the backup
                fd = deep_path.open(os.path.join(dir_path, CACHEDIR_TAG), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    if f.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE:
                        return CACHEDIR_TAG
            except OSError:
                pass
        return None

    def kept(self, base: bytes, names: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
        """(name, path) of each of ``names`` in the directory ``base`` (ending in "/") that is
        not excluded."""
        if self._name_re is None and self._path_re is None:
            skip = self._skip
            return [(n, p) for n in names if (p := base + n) not in skip]
        return [(n, p) for n in names if not self.excluded(p := base + n, n)]

    def excluded(self, path: bytes, name: bytes) -> bool:
        if path in self._skip:
            return True
        if self._name_re is not None and self._name_re.match(name):
            return True
        return self._path_re is not None and self._path_re.match(path) is not None


def read_exclude_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return [ln.rstrip("\n") for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise BunkerError(
            f"cannot read exclude file {path}: {exc.strerror}",
            "fix the path given with --exclude-file; no backup was taken",
            exit_code=ExitCode.USAGE,
        ) from None
