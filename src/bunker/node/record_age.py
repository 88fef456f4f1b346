"""A client's watch on its node (docs/hierarchy.md, "Receipts"): a snapshot the repository of
record has not recorded after N days is `warn`, so a middle node that drops or withholds data is
caught by the machines that back up through it.

A node answers a STAT of ``snapshots/<hex>`` with the time it stored the snapshot and when an
upstream recorded it at the top (record receipt, or a direct delivery read back; 0: not yet).
Before a backup into a node, the client walks back from the newest snapshot it remembers (its
chain head) to the newest one that is at least N days old (``BUNKER_RECORD_WARN_DAYS``, default
7): if the node stored that one N days ago or more and it is still not recorded, the run ends at
`warn`. A recorded snapshot on the way ends the walk: what came before it went up too.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, cast

from bunker import dirs, encoding
from bunker.backup.chain import load_head
from bunker.backup.client_dirs import client_tag
from bunker.crypto.keyfile import PutKey
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot

if TYPE_CHECKING:
    from bunker.storage.remote import RemoteBackend

MAX_WALK = 200  # envelopes read at most (a week of hourly backups is 168)


def unrecorded_events(repo: Repository, put: PutKey, now: float | None = None) -> list[tuple[str, str, str]]:
    """(level, code, message) when this client's snapshots wait on its node unrecorded for N
    days or more; nothing when the repository is not a node, or a node that does not say."""
    # only a `bunker serve` node says (storage/remote.py, which a local repository never loads)
    remote = sys.modules.get("bunker.storage.remote")
    if remote is None or not isinstance(repo.backend, remote.RemoteBackend):
        return []
    backend = cast("RemoteBackend", repo.backend)
    if not backend.server_node:
        return []
    head = load_head(dirs.state_dir(repo.repo_id, client_tag(put)))
    if head is None:
        return []
    from bunker.repo.holding_records import warn_days  # (a node's records: not loaded by a local backup)

    days = warn_days()
    now = time.time() if now is None else now
    name = head.name
    for _ in range(MAX_WALK):
        got = backend.snapshot_recorded(name)
        if got is None or got[1] is None or got[1] > 0:
            return []  # not on the node (spooled, or evicted by nobody), a node that does not say, or recorded
        stored, _ = got
        waited = now - stored
        if waited >= days * 86400:
            return [_event(backend.server_node, name, waited)]
        try:
            name = parse_snapshot(backend.get(name)).env.prev
        except (encoding.FormatError, ObjectMissing, CorruptObject):
            return []  # `check` names a damaged envelope; this watch only looks for delays
        if not name:
            return []
    return []


def _event(node: str, name: str, waited: float) -> tuple[str, str, str]:
    from bunker.repo.holding_records import RECORD_WARN_ENV, warn_days

    days = waited / 86400
    return (
        "warn",
        "not-recorded",
        f"snapshot {name.split('/', 1)[1][:12]} has waited {days:.1f} days on node {node} and the repository of record "
        f"has not recorded it yet: the node has not delivered it upstream, or its record receipts do not come back, "
        f"so this machine's backups since then may exist only on node {node}. Run `bunker node status` on node "
        f"{node} and check its upstream link (forward, import, a carried disk that did not travel); "
        f"{RECORD_WARN_ENV} sets how many days are allowed (now {warn_days():g})",
    )
