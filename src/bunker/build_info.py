"""Which source this bunker runs from: the version and the git commit id, the fingerprint a
stranger uses to check the source they install in a disaster (RECOVERY.md, `bunker --version`).

An installed copy (``pip install .``, scripts/install) carries the commit in ``_commit.py``,
written when it was built (setup.py); a source checkout used in place (an editable install)
reads it from the checkout's ``.git``. Neither: the commit is unknown ("")."""

from __future__ import annotations

import functools
from pathlib import Path

from bunker import __version__


def _from_checkout(root: Path) -> str:
    """The commit a git checkout at ``root`` has checked out (a worktree's ``.git`` file is
    followed), read from its files: no git command runs."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached
        ref = head[5:]
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        pass
    return ""


@functools.cache
def source_commit() -> str:
    """The git commit id of the source this bunker runs from, "" when unknown."""
    try:
        from bunker._commit import COMMIT  # type: ignore[import-not-found,unused-ignore]

        return str(COMMIT)
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent.parent  # src/bunker/ -> the checkout
    commit = _from_checkout(root) if (root / "pyproject.toml").is_file() else ""
    return commit if len(commit) >= 40 and all(c in "0123456789abcdef" for c in commit) else ""


def version_text() -> str:
    """``VERSION (commit ID)``, as `bunker --version` prints it after ``bunker``."""
    commit = source_commit()
    return f"{__version__} (commit {commit or 'unknown'})"
