"""This machine's copy of the newest policy it applied (repo/policy.py), kept in its data
directory beside the clients' state directories.

The copy is a witness outside the storage, as a client's chain head is (docs/security.md section
6.1): a repository (or node) that holds an older version than this machine applied was rolled
back or had policy objects deleted, and the run applies the copy and warns. An offline run (only
the local spool is reachable, and it holds no policy) applies the copy quietly.
"""

from __future__ import annotations

import contextlib
import os

from bunker import dirs, encoding
from bunker.errors import BunkerError
from bunker.private_files import write_private_file
from bunker.repo.policy import RepoPolicy, parse_policy, read_policies
from bunker.repo.repository import Repository

POLICY_FILE = "policy.obj"


def _path(repo_id: str) -> str:
    return os.path.join(dirs.data_dir(), "state", repo_id[:32], POLICY_FILE)


def remembered_policy(repo: Repository) -> RepoPolicy | None:
    """The newest policy this machine applied for ``repo`` (None if none, or the copy does not
    verify: a damaged copy witnesses nothing)."""
    try:
        with open(_path(repo.repo_id), "rb") as f:
            data = f.read()
        return parse_policy(data, repo.config.master_verify, repo.repo_id)
    except (OSError, encoding.FormatError):
        return None


def policy_in_force(repo: Repository) -> tuple[RepoPolicy | None, list[tuple[str, str, str]]]:
    """The policy this run applies, and (level, code, message) events about it: the repository's
    newest, or this machine's copy when the repository holds an older one."""
    events: list[tuple[str, str, str]] = []
    state = read_policies(repo)
    mine = remembered_policy(repo)
    if state.forked:
        events.append(
            (
                "warn",
                "policy-forked",
                "two policy objects claim one version (only the master key makes them): the version below applies; "
                "the owner sets a new one with `bunker policy set FILE`",
            )
        )
    current = state.current
    if mine is not None and (current is None or current.version < mine.version):
        if not repo.backend.capabilities().partial:
            held = f"version {current.version}" if current is not None else "no policy"
            events.append(
                (
                    "warn",
                    "policy-rollback",
                    f"the repository holds {held}, but this machine applied policy version {mine.version} before: "
                    "policy objects were deleted or the repository was rolled back; this run applies version "
                    f"{mine.version}. Run `bunker check` on the repository of record and compare it with a mirror",
                )
            )
        return mine, events
    if current is not None and (mine is None or current.name != mine.name):
        with contextlib.suppress(OSError, BunkerError):  # a full disk here: the next run remembers it
            write_private_file(_path(repo.repo_id), repo.get_object(current.name))
    return current, events
