"""What a node holds for one repository, and what it still owes each upstream
(docs/hierarchy.md, "Up").

Per (repository, upstream) the node keeps, under ``state/<repository id>/up/<upstream>/``:

- ``delivered.json``: objects the upstream is known to hold (a direct upstream: written there and
  read back; a link: listed in a hop receipt), so they are not sent again;
- ``recorded.json``: objects covered by a record receipt (the repository of record holds them):
  only these may ever be evicted (node/eviction.py).

Objects go up in the format's write order (docs/format.md section 17): packs, index and reference
objects, then snapshots; a snapshot goes only once every pack its pack set names is upstream, so
an upstream never publishes a snapshot with holes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bunker import encoding
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.repo import refs
from bunker.repo.snapshot import Envelope, parse_snapshot
from bunker.storage.backend import Backend, ObjectInfo

# what flows up, in the order it is sent; sessions/ (leases, checkpoints) stay on the node.
# clients/: a certificate a client brought to the node (node/node_serve.py) reaches the top before
# any snapshot it signed (one the top issued is already there: sent once, found present)
SESSION_OUTPUT = ("packs/", "index/", "refs/", "snapshots/")  # what clients' backups write
UP_PREFIXES = ("clients/", *SESSION_OUTPUT, "status/")  # status records travel with the data
# what flows down from the repository of record to every node
DOWN_PREFIXES = ("config/", "clients/", "nodes/", "retired/", "gc/", "policy/")


@dataclass
class Owed:
    """What one upstream still lacks: data objects (sent first) and snapshots."""

    data: list[ObjectInfo]
    snapshots: list[tuple[ObjectInfo, Envelope]]
    damaged: list[str]  # snapshots in the store that do not parse: never sent, `check` names them

    @property
    def count(self) -> int:
        return len(self.data) + len(self.snapshots)

    @property
    def size(self) -> int:
        return sum(i.size for i in self.data) + sum(i.size for i, _ in self.snapshots)


class UpstreamState:
    """The delivered and recorded sets of one (repository, upstream)."""

    def __init__(self, node: NodeDir, repo_id: str, upstream: str) -> None:
        self.dir = node.state_dir(repo_id, "up", upstream)
        self.delivered: dict[str, float] = read_json(os.path.join(self.dir, "delivered.json"), {})
        self.recorded: dict[str, float] = read_json(os.path.join(self.dir, "recorded.json"), {})

    def mark_delivered(self, names: Iterable[str]) -> None:
        now = time.time()
        for n in names:
            self.delivered.setdefault(n, now)

    def mark_recorded(self, names: Iterable[str]) -> None:
        now = time.time()
        for n in names:
            self.recorded.setdefault(n, now)
            self.delivered.setdefault(n, now)

    def save(self) -> None:
        # recorded first: a kill between the two writes then leaves names recorded but not
        # delivered, which the next run sends again (harmless), never names delivered but not
        # recorded, which a direct upstream's forward would skip for ever without recording them
        write_json(os.path.join(self.dir, "recorded.json"), self.recorded)
        write_json(os.path.join(self.dir, "delivered.json"), self.delivered)

    def delivered_is_recorded(self) -> None:
        """For a direct upstream, where delivering is recording: forget as delivered what is not
        recorded (left by a run killed between the two writes of a version that wrote delivered
        first), so it is copied again and recorded."""
        for n in [n for n in self.delivered if n not in self.recorded]:
            del self.delivered[n]


def owed(store: Backend, state: UpstreamState) -> Owed:
    """What ``store`` holds that the upstream of ``state`` is not known to hold."""
    data: list[ObjectInfo] = []
    snaps: list[tuple[ObjectInfo, Envelope]] = []
    damaged: list[str] = []
    for prefix in UP_PREFIXES:
        for info in store.list(prefix):
            if info.name in state.delivered:
                continue
            if prefix != "snapshots/":
                data.append(info)
                continue
            try:
                env = parse_snapshot(store.get(info.name)).env
            except (encoding.FormatError, Exception):  # noqa: BLE001 - any unreadable envelope is held back
                damaged.append(info.name)
                continue
            snaps.append((info, env))
    # a client's snapshots in chain order, so an upstream's chain grows without gaps
    snaps.sort(key=lambda s: (s[1].cert, s[1].seq))
    return Owed(data, snaps, damaged)


def snapshot_packs(env: Envelope, fetch: Callable[[str], bytes]) -> list[str]:
    """The packs (``packs/<hex>``) a snapshot's pack set names, read keylessly."""
    return [f"packs/{p}" for p in refs.read_set(env.packset, fetch)]
