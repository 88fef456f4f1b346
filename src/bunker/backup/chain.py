"""The client's memory of its own snapshot chain head (DESIGN.md promise 2).

Stored in the data directory (not the cache: losing it weakens rollback detection). When the
repository's newest trusted snapshot of this client is older than what the client remembers,
someone deleted snapshots or rolled the repository back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from bunker.backup.runlog import RunLog
from bunker.crypto.keyfile import write_private_file
from bunker.repo.repository import Repository


@dataclass(frozen=True)
class ChainHead:
    seq: int
    name: str  # snapshots/<hex>


def load_head(state_dir: str) -> ChainHead | None:
    """The remembered head, or None if this client never finished a snapshot here."""
    try:
        with open(os.path.join(state_dir, "chain.json"), encoding="utf-8") as f:
            d = json.load(f)
        return ChainHead(int(d["seq"]), str(d["name"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_head(state_dir: str, head: ChainHead) -> None:
    """Remember a new head durably."""
    write_private_file(os.path.join(state_dir, "chain.json"), json.dumps({"seq": head.seq, "name": head.name}))


def check_config_version(repo: Repository, state_dir: str, log: RunLog) -> None:
    """Warn when the repository's config is older than one this client has seen (a deleted
    newer config version silently re-activates an older one, e.g. to undo a revocation)."""
    path = os.path.join(state_dir, "config.json")
    seen = 0
    try:
        with open(path, encoding="utf-8") as f:
            seen = int(json.load(f)["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if repo.config.version < seen:
        log.add(
            "warn",
            "config-rollback",
            f"the repository's config is version {repo.config.version}, but this client saw version {seen}: a newer "
            "config was deleted (perhaps to undo a revocation). Restore config/ from a mirror and run `bunker check`",
        )
    elif repo.config.version > seen:
        write_private_file(path, json.dumps({"version": repo.config.version}))
