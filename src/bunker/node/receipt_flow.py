"""Issuing and applying receipts (docs/hierarchy.md, "Receipts").

Issued: a hop receipt to a downstream node after every import from it (what arrived, what its
staged snapshots lack); record receipts, by a node with the ``record`` capability, for what it
received from each downstream node and wrote to the repository of record and read back.

Applied (a receipt that came down a link): it must be signed by a node certified for this
repository and not revoked — for a record receipt, one with the ``record`` capability — name this
node (or the upstream node it relayed it for) as its downstream, and fit the issuer's receipt
chain. A hop receipt stops resending what it names and brings back what it lacks; a record
receipt marks objects as held by the repository of record (only those may be evicted), its chain
heads become heads this node witnesses (node/witnessed.py), and it is relayed unchanged to the
downstream nodes that sent any of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from bunker import encoding
from bunker.errors import CorruptObject, ObjectMissing
from bunker.node.holdings import UpstreamState
from bunker.node.links import Link
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.receipts import IssuedChain, Receipt, ReceivedChain, make_receipt, verify_receipt
from bunker.node.relay_link import SentLog, queue_receipt
from bunker.node.rotation import my_ids, peer_ids, sending_keys
from bunker.node.witnessed import note_record_receipt, witnessed_heads
from bunker.repo.node_certs import trusted_node
from bunker.repo.repository import Repository
from bunker.repo.snapshot import parse_snapshot
from bunker.storage.backend import Backend


@dataclass
class ReceiptOutcome:
    accepted: list[str] = field(default_factory=list)  # receipt kinds accepted
    refused: list[str] = field(default_factory=list)  # why each refused receipt was refused
    recorded: int = 0  # objects newly covered by record receipts
    resend: int = 0  # objects a hop receipt says the far side lacks


def received_log(nd: NodeDir, repo_id: str, link: str) -> str:
    return os.path.join(nd.state_dir(repo_id, "down", link), "received.json")


def note_received(nd: NodeDir, repo_id: str, link: str, names: list[str]) -> None:
    path = received_log(nd, repo_id, link)
    got: dict[str, float] = read_json(path, {})
    now = time.time()
    for n in names:
        got.setdefault(n, now)
    write_json(path, got)


def issue_hop_receipt(
    nd: NodeDir, repo_id: str, link: Link, covers: list[str], pieces: list[int], missing: list[str]
) -> Receipt:
    """Sign and queue a hop receipt to the downstream node of ``link``."""
    chain = IssuedChain(nd, repo_id, "hop", link.conf.peer)
    receipt = make_receipt(
        sending_keys(nd, link.name),
        kind="hop",
        repo=repo_id,
        downstream=link.conf.peer,
        seq=chain.seq + 1,
        prev=chain.prev,
        covers=covers,
        pieces=pieces,
        missing=missing,
    )
    # the number is spent before the receipt can leave: a run killed between the two must not
    # give the next receipt the same number (the far side would refuse one as a rollback)
    chain.advance(receipt)
    queue_receipt(nd, repo_id, link.name, receipt)
    return receipt


def _heads(store: Backend, names: set[str]) -> dict[str, tuple[int, str]]:
    heads: dict[str, tuple[int, str]] = {}
    for n in names:
        if not n.startswith("snapshots/"):
            continue
        try:
            env = parse_snapshot(store.get(n)).env
        except (encoding.FormatError, ObjectMissing, CorruptObject):
            continue
        if env.seq > heads.get(env.cert, (0, ""))[0]:
            heads[env.cert] = (env.seq, n)
    return heads


def _heads_known(nd: NodeDir, repo_id: str, store: Backend, names: set[str]) -> dict[str, tuple[int, str]]:
    """The chain heads a record receipt carries: those of the snapshots it covers, and every other
    client's newest this node saw at the repository of record (node/top_heads.py), so that the
    nodes below learn the heads of clients they never served (a client that moved there)."""
    heads = {h.cert: (h.seq, h.snapshot) for h in witnessed_heads(nd, repo_id)}
    for cert, (seq, name) in _heads(store, names).items():
        if seq > heads.get(cert, (0, ""))[0]:
            heads[cert] = (seq, name)
    return heads


def issue_record_receipts(nd: NodeDir, repo_id: str) -> int:
    """For each downstream link: a record receipt for what it sent that a direct upstream now
    holds (written and read back). Only a node certified with ``record`` issues them (others
    would be refused below). Returns how many were queued."""
    store = nd.store(repo_id)
    repo = Repository.open(store, repo_id, floor=False)
    recorded: set[str] = set()
    for up in nd.config.upstreams:
        if up.kind == "direct" and up.repo == repo_id:
            recorded |= set(UpstreamState(nd, repo_id, up.name).recorded)
    issued = 0
    for down in nd.config.downstreams:
        keys = sending_keys(nd, down.name)  # the key the far node knows (node/rotation.py)
        mine = trusted_node(repo, keys.node_id)
        if mine is None or not mine.can("record"):
            continue
        got = set(read_json(received_log(nd, repo_id, down.name), {}))
        done_path = os.path.join(nd.state_dir(repo_id, "down", down.name), "receipted.json")
        done: dict[str, float] = read_json(done_path, {})
        new = (got & recorded) - set(done)
        if not new:
            continue
        chain = IssuedChain(nd, repo_id, "record", down.peer)
        receipt = make_receipt(
            keys,
            kind="record",
            repo=repo_id,
            downstream=down.peer,
            seq=chain.seq + 1,
            prev=chain.prev,
            covers=sorted(new),
            heads=_heads_known(nd, repo_id, store, new),
            config_version=repo.config.version,
        )
        # number spent first (see issue_hop_receipt); killed before ``done`` is written, the
        # next run covers the same objects again under the next number: harmless
        chain.advance(receipt)
        queue_receipt(nd, repo_id, down.name, receipt)
        now = time.time()
        done.update({n: now for n in new})
        write_json(done_path, done)
        issued += 1
    return issued


def apply_receipt(nd: NodeDir, repo_id: str, link: Link, receipt: Receipt, out: ReceiptOutcome) -> None:
    """Check ``receipt`` (it came down ``link``) and act on it, or refuse it with the reason."""
    store = nd.store(repo_id)
    repo = Repository.open(store, repo_id, floor=False)
    issuer = trusted_node(repo, receipt.issuer)
    who = f"{receipt.kind} receipt #{receipt.seq} from node {receipt.issuer[:16]}"
    if receipt.repo != repo_id:
        out.refused.append(f"{who} is for repository {receipt.repo[:16]}, not {repo_id[:16]}")
        return
    if issuer is None:
        out.refused.append(f"{who}: no certificate of that node (or a revoked one) is in the repository")
        return
    try:
        verify_receipt(receipt, issuer.public)
    except encoding.FormatError as exc:
        out.refused.append(f"{who}: {exc}")
        return
    if receipt.kind == "record" and not issuer.can("record"):
        out.refused.append(f"{who}: node {issuer.node} is not certified with the record capability; it frees nothing")
        return
    if receipt.kind == "hop" and receipt.issuer not in peer_ids(link.conf):
        out.refused.append(f"{who}: a hop receipt comes from the next node only ({link.conf.peer_name})")
        return
    if receipt.downstream not in (*my_ids(nd), *peer_ids(link.conf)):
        out.refused.append(f"{who}: issued to another node ({receipt.downstream[:16]})")
        return
    chain = ReceivedChain(nd, repo_id, receipt.kind, receipt.issuer)
    verdict = chain.judge(receipt)
    if verdict == "duplicate":
        return
    if verdict == "rollback":
        out.refused.append(
            f"{who} contradicts receipts that node issued before (same number, other contents, or a broken "
            "chain): the issuer was rolled back or its key is misused; nothing is freed by it"
        )
        return
    state = UpstreamState(nd, repo_id, link.name)
    if receipt.kind == "hop":
        state.mark_delivered(receipt.covers)
        lacking = [n for n in receipt.missing if store.exists(n)]
        for n in lacking:
            state.delivered.pop(n, None)
        log = SentLog(nd, repo_id, link.name, "up")
        log.forget(lacking)
        log.save()
        out.resend += len(lacking)
    else:
        before = len(state.recorded)
        state.mark_recorded(receipt.covers)
        out.recorded += len(state.recorded) - before
        note_record_receipt(nd, repo_id, receipt, issuer.node)  # what the top holds: witnessed
        covers = set(receipt.covers)
        for down in nd.config.downstreams:  # relayed unchanged to the nodes that sent any of it
            if covers & set(read_json(received_log(nd, repo_id, down.name), {})):
                queue_receipt(nd, repo_id, down.name, receipt)
    state.save()
    # noted in the issuer's chain only once applied: a run killed before this imports the piece
    # again and applies the receipt again (applying is idempotent); noted first, the receipt
    # would be a duplicate next time and what it covers never recorded (never evicted)
    chain.accept(receipt)
    out.accepted.append(receipt.kind)
