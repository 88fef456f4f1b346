"""A node's links: the keys, sequence numbers and replay window of each (link, repository)
(docs/hierarchy.md, "Links and bundles").

A link joins two nodes through a mailbox; each side configures it (an *upstream* link on the
node that sends data up, a *downstream* link on the node that receives it) with the far node's
card. Pieces are numbered per (link, repository, direction) from 1. The receiver keeps which
numbers it imported: a number seen again is a duplicate (a no-op, noted), a gap is allowed (a
lost disk loses only its own pieces), and a number at or below the low-water mark is refused
as a replay. The window is REPLAY_WINDOW numbers wide: the mark follows the highest number
imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bunker.node.bundle_format import LinkKeys
from bunker.node.node_dir import NodeDir, Upstream, read_json, write_json
from bunker.node.rotation import sending_keys

REPLAY_WINDOW = 100_000

# what an imported piece number is
NEW, DUPLICATE, REPLAYED = "new", "duplicate", "replayed"


@dataclass(frozen=True)
class Link:
    """One configured link of this node: ``up`` (this node sends data over it) or ``down``
    (it receives data and sends records and receipts back)."""

    conf: Upstream
    direction: str  # "up" | "down"

    @property
    def name(self) -> str:
        return self.conf.name


def links(nd: NodeDir) -> list[Link]:
    """Every link of ``nd``: upstream links, then downstream links."""
    ups = [Link(u, "up") for u in nd.config.upstreams if u.kind == "link"]
    return ups + [Link(d, "down") for d in nd.config.downstreams]


def link_keys(nd: NodeDir, link: Link, repo_id: str) -> LinkKeys:
    """The keys this node sends with over ``link`` (its previous ones while the far node has
    not taken up its last key rotation: node/rotation.py)."""
    return LinkKeys.between(sending_keys(nd, link.name), link.conf.peer_public(), repo_id)


class LinkCounters:
    """The sequence numbers of one (link, repository): the next number to send, and the
    numbers imported from the far side."""

    def __init__(self, nd: NodeDir, link: str, repo_id: str) -> None:
        self.path = os.path.join(nd.state_dir("links", link), f"{repo_id}.json")
        doc = read_json(self.path, {})
        self.next_out: int = int(doc.get("next_out", 1))
        self.seen: set[int] = set(doc.get("seen", []))
        self.floor: int = int(doc.get("floor", 0))
        self.last_heard: float = float(doc.get("last_heard", 0.0))

    def take(self, n: int = 1) -> int:
        """Reserve ``n`` numbers to send; return the first. Saved at once: a number is never
        used twice, even by a run that dies before its piece reaches the mailbox."""
        first = self.next_out
        self.next_out += n
        self.save()
        return first

    def judge(self, seq: int) -> str:
        """NEW, DUPLICATE (imported before) or REPLAYED (at or below the low-water mark)."""
        if seq in self.seen:
            return DUPLICATE
        if seq <= self.floor:
            return REPLAYED
        return NEW

    def imported(self, seq: int, when: float) -> None:
        self.seen.add(seq)
        self.last_heard = max(self.last_heard, when)
        top = max(self.seen)
        if top - REPLAY_WINDOW > self.floor:
            self.floor = top - REPLAY_WINDOW
            self.seen = {s for s in self.seen if s > self.floor}

    def save(self) -> None:
        write_json(
            self.path,
            {"next_out": self.next_out, "seen": sorted(self.seen), "floor": self.floor, "last_heard": self.last_heard},
        )
