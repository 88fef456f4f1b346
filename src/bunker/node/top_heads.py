"""The newest snapshot of every client at a direct upstream (docs/hierarchy.md, "A client
without a chain head").

A node that writes the repository of record reads its snapshot envelopes (no key needed) and
keeps, as witnessed heads (node/witnessed.py), the newest snapshot of every client there whose
signature verifies with the client's certificate: not only the clients it serves. A client
that comes to this node without a chain head (its state lost, or it moved here from another
node) then continues its chain from the right place, and record receipts this node issues carry
the heads down to the nodes below it (node/receipt_flow.py).

Each snapshot is read once: ``state/<repository>/up/<upstream>/top-snapshots.json`` keeps the
certificate and number of every envelope already verified.
"""

from __future__ import annotations

import os
import time

from bunker import encoding
from bunker.errors import CorruptObject, ObjectMissing
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.witnessed import note_witnessed
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.repo.witnesses import WitnessedHead
from bunker.storage.backend import Backend


def top_snapshots(nd: NodeDir, repo_id: str, upstream: str, top: Backend, store: Backend) -> dict[str, tuple[str, int]]:
    """Every snapshot at ``top`` whose signature verifies with a certificate in the node's
    ``store``: name -> (certificate, sequence number). Envelopes are read once (the state file
    keeps what was verified); one that does not verify yet is read again next time (its
    certificate may not have come down yet)."""
    path = os.path.join(nd.state_dir(repo_id, "up", upstream), "top-snapshots.json")
    known: dict[str, list[object]] = read_json(path, {})
    repo = Repository.open(store, repo_id, floor=False)
    listed = [i.name for i in top.list("snapshots/")]
    added = False
    for name in listed:
        if name in known:
            continue
        try:
            snap = parse_snapshot(top.get(name))
        except (encoding.FormatError, ObjectMissing, CorruptObject):
            continue  # damaged or gone: `check` at the top names it
        if repo.verify_snapshot_signature(snap)[0]:
            known[name] = [snap.env.cert, snap.env.seq]
            added = True
    if added or len(known) > len(listed):
        write_json(path, {n: known[n] for n in listed if n in known})
    return {n: (str(known[n][0]), int(str(known[n][1]))) for n in listed if n in known}


def note_top_heads(nd: NodeDir, repo_id: str, upstream: str, top: Backend, store: Backend) -> int:
    """Witness the newest verified snapshot of each client at ``top``. Returns how many heads
    were raised."""
    heads: dict[str, tuple[int, str]] = {}
    for name, (cert, seq) in top_snapshots(nd, repo_id, upstream, top, store).items():
        if seq > heads.get(cert, (0, ""))[0]:
            heads[cert] = (seq, name)
    now = time.time()
    return note_witnessed(
        nd, repo_id, [WitnessedHead(cert, seq, name, "direct", upstream, now) for cert, (seq, name) in heads.items()]
    )
