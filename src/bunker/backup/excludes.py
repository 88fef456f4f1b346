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

from bunker.errors import BunkerError, ExitCode


class Excludes:
    def __init__(self, patterns: list[str], skip_paths: list[str] | None = None) -> None:
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
