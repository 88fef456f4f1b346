"""What this machine knows about the snapshots it wrote: its own client (a machine with a put key),
and the chain heads it remembers (backup/chain.py witnesses), some of which may still wait in its
local spool. `latest` and `snapshots` use them so that a missing or damaged newest snapshot is
named, never silently replaced by an older one (repo/selection.py)."""

from __future__ import annotations

import os

from bunker import encoding
from bunker.backup.chain import witnesses
from bunker.cli.context import Options
from bunker.crypto.keyfile import PutKey, load_put_key
from bunker.errors import BunkerError
from bunker.node.spool import Spool
from bunker.repo.certs import parse_certificate
from bunker.repo.repository import Repository
from bunker.repo.selection import KnownHead


def own_put_key(opts: Options, repo: Repository) -> PutKey | None:
    """This machine's put key for ``repo``, if it has a readable one (its certificate is not
    checked here)."""
    path = opts.put_key_file(repo.repo_id)
    if not path or not os.path.exists(path):
        return None
    try:
        put = load_put_key(path)
    except (BunkerError, encoding.FormatError, OSError):
        return None  # an unusable put key is `key info`'s and `backup`'s to report, not a reader's
    return put if put.repo_id == repo.repo_id else None


def own_client(repo: Repository, put: PutKey | None) -> str | None:
    """The client name of this machine's put key ``put`` (:func:`own_put_key`), if it is usable."""
    if put is None:
        return None
    try:
        return parse_certificate(put.certificate, repo.config.master_verify, repo.repo_id).client
    except (BunkerError, encoding.FormatError):
        return None


def known_heads(opts: Options, repo: Repository) -> list[KnownHead]:
    """Every chain head this machine remembers for ``repo``; ``pending`` when it waits in the
    spool of the repository URL given."""
    spooled = {name for chain in Spool(opts.repo_url).pending_snapshots().values() for name, _ in chain.values()}
    return [KnownHead(h.cert, h.seq, h.name, h.name in spooled, h.spooled) for h in witnesses(repo.repo_id)]
