"""The client's memory of its own snapshot chain head (docs/security.md section 6.1).

Stored in the data directory (not the cache: losing it weakens rollback detection). When the
repository's newest trusted snapshot of this client is older than what the client remembers,
someone deleted snapshots or rolled the repository back. (Rollbacks of the config are caught
when a repository is opened: repo/config_chain.py.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from bunker import dirs
from bunker.crypto.keyfile import write_private_file


@dataclass(frozen=True)
class ChainHead:
    seq: int
    name: str  # snapshots/<hex>
    cert: str = ""  # clients/<hex> of the chain ("" in records written before it was kept)


def load_head(state_dir: str) -> ChainHead | None:
    """The remembered head, or None if this client never finished a snapshot here."""
    try:
        with open(os.path.join(state_dir, "chain.json"), encoding="utf-8") as f:
            d = json.load(f)
        return ChainHead(int(d["seq"]), str(d["name"]), str(d.get("cert", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_head(state_dir: str, head: ChainHead) -> None:
    """Remember a new head durably."""
    record = {"seq": head.seq, "name": head.name, "cert": head.cert}
    write_private_file(os.path.join(state_dir, "chain.json"), json.dumps(record))


def witnesses(repo_id: str) -> list[ChainHead]:
    """Every chain head this machine remembers for repository ``repo_id`` (one per client that
    backed up from here): witnesses outside the storage that its newest snapshots exist."""
    root = os.path.join(dirs.data_dir(), "state", repo_id[:32])
    try:
        tags = sorted(os.listdir(root))
    except OSError:
        return []
    heads = [load_head(os.path.join(root, t)) for t in tags]
    return [h for h in heads if h is not None and h.cert]
