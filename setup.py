"""Writes the git commit of the source into the built package (bunker/_commit.py), so that an
installed bunker names the source it came from (`bunker --version`, RECOVERY.md). Everything
else about the package is in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _git(*args: str) -> str:
    try:
        cp = subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return cp.stdout.strip() if cp.returncode == 0 else ""


def _commit() -> str:
    commit = _git("rev-parse", "HEAD")
    if not commit:  # no git command here (a minimal system): the checkout's own files say it
        sys.path.insert(0, os.path.join(HERE, "src"))
        from bunker.build_info import _from_checkout

        return _from_checkout(Path(HERE))
    if _git("status", "--porcelain", "--untracked-files=no", "--", "src", "pyproject.toml"):
        commit += "+local-changes"  # not exactly that commit's code
    return commit


class BuildWithCommit(build_py):
    def run(self) -> None:
        super().run()
        commit = _commit()
        target = os.path.join(self.build_lib, "bunker", "_commit.py")
        with open(target, "w", encoding="ascii") as f:
            f.write(f'"""Written when this copy was built (setup.py)."""\n\nCOMMIT = {commit!r}\n')


setup(cmdclass={"build_py": BuildWithCommit})
