"""What a node knows the repository of record holds: per repository, the newest snapshot of each
client certificate it saw there, and how (docs/hierarchy.md, "Witnesses").

Two ways: a direct delivery writes each snapshot to the top and reads it back
(node/relay_direct.py), and a record receipt accepted from a ``record`` node names the chain
heads it covers (node/receipt_flow.py). The state is one small file per repository,
``state/<repository>/witnessed.json``: certificate -> the head (repo/witnesses.py
WitnessedHead), only ever raised. `bunker node witness` signs it as a witness statement for
`bunker check --witness`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from bunker import encoding
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.receipts import Receipt
from bunker.repo.witnesses import WitnessedHead, make_statement

FILE = "witnessed.json"


def _path(nd: NodeDir, repo_id: str) -> str:
    return os.path.join(nd.state_dir(repo_id), FILE)


def witnessed_heads(nd: NodeDir, repo_id: str) -> list[WitnessedHead]:
    """The heads ``nd`` saw the repository of record hold, one per client certificate (a damaged
    entry is left out: it witnesses nothing)."""
    doc = read_json(_path(nd, repo_id), {})
    out = []
    for value in doc.values() if isinstance(doc, dict) else ():
        try:
            out.append(WitnessedHead.from_body(value))
        except encoding.FormatError:
            continue
    return sorted(out, key=lambda h: h.cert)


def note_witnessed(nd: NodeDir, repo_id: str, heads: Iterable[WitnessedHead]) -> int:
    """Keep each of ``heads`` whose sequence number is above what the node knew of its client's
    chain (the first evidence of a head stays). Returns how many were new."""
    known = {h.cert: h for h in witnessed_heads(nd, repo_id)}
    raised = 0
    for h in heads:
        if h.seq > (known[h.cert].seq if h.cert in known else 0):
            known[h.cert] = h
            raised += 1
    if raised:
        write_json(_path(nd, repo_id), {c: h.to_body() for c, h in sorted(known.items())})
    return raised


def note_record_receipt(nd: NodeDir, repo_id: str, receipt: Receipt, issuer_name: str) -> int:
    """Keep the chain heads an accepted record receipt says the repository of record holds."""
    heads = []
    for cert, (seq, name) in receipt.heads.items():
        h = WitnessedHead(cert, seq, name, "record", issuer_name, receipt.time, receipt.issuer, receipt.seq)
        try:
            heads.append(WitnessedHead.from_body(h.to_body()))  # the issuer's names, checked
        except encoding.FormatError:
            continue
    return note_witnessed(nd, repo_id, heads)


def statement_for(nd: NodeDir, repo_id: str) -> bytes:
    """The node's witness statement for ``repo_id``, signed with its current key."""
    nd.store(repo_id)  # a repository the node does not relay: a clear error
    return make_statement(nd.keys, repo_id, witnessed_heads(nd, repo_id))
