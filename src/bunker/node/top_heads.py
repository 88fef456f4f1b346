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


def note_top_heads(nd: NodeDir, repo_id: str, upstream: str, top: Backend, store: Backend) -> int:
    """Verify the envelopes at ``top`` not read before (with the certificates in the node's
    ``store``) and witness the newest of each client. Returns how many heads were raised."""
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
        trusted, _problem = repo.verify_snapshot_signature(snap)
        if trusted:  # else read again next time: its certificate may not have come down yet
            known[name] = [snap.env.cert, snap.env.seq]
            added = True
    if added:
        write_json(path, {n: known[n] for n in listed if n in known})
    heads: dict[str, tuple[int, str]] = {}
    for name in listed:
        entry = known.get(name)
        if entry is None:
            continue
        cert, seq = str(entry[0]), int(str(entry[1]))
        if seq > heads.get(cert, (0, ""))[0]:
            heads[cert] = (seq, name)
    now = time.time()
    return note_witnessed(
        nd, repo_id, [WitnessedHead(cert, seq, name, "direct", upstream, now) for cert, (seq, name) in heads.items()]
    )
