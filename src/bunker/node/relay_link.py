"""Sending over links (docs/hierarchy.md, "Links and bundles"): data up to an upstream node,
records and receipts down to a downstream node.

Up: what the upstream is not known to hold (no hop receipt names it) and was not bundled within
``resend_after`` goes into one bundle (pieces of at most the link's piece size), in the format's
write order; a snapshot goes once every pack its pack set names was sent or acknowledged, so the
far side can publish it. Each piece is written in the node's own ``state/outgoing`` and then put
into the mailbox whole (a reader never sees half a piece).

Down: the repository's records (configs, certificates, node certificates, retirement and GC
records) the downstream node was not sent yet, and the receipts queued for it, in one bundle.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from bunker.errors import ObjectMissing
from bunker.node.acks import acks_to_send, checkpoint_roots_held, condemned_since, own_ack
from bunker.node.bundle import BundleObject, write_bundle
from bunker.node.bundle_format import ManifestEntry, plan_pieces
from bunker.node.holding import holdings_ahead
from bunker.node.holdings import DOWN_PREFIXES, UpstreamState, owed, snapshot_packs
from bunker.node.links import Link, LinkCounters, link_keys
from bunker.node.listing_link import answers_to_send as listing_answers
from bunker.node.listing_link import answers_went as listing_answers_went
from bunker.node.node_dir import NodeDir, Upstream, read_json, write_json
from bunker.node.receipts import Receipt, parse_receipt
from bunker.node.request_link import answers_owed, answers_sent, mark_sent, parse_request, requests_to_send
from bunker.node.rotation import sending_keys, successor_due, successor_for, successor_sent
from bunker.node.staging import staged_names
from bunker.node.staleness import records_asof
from bunker.repo.node_acks import parse_ack
from bunker.repo.objects import MAGIC_ACK, MAGIC_CKROOT, MAGIC_HOLDING
from bunker.storage.backend import Backend, ObjectInfo
from bunker.storage.local import LocalBackend
from bunker.storage.mailbox import open_mailbox

DEFAULT_PIECE_SIZE = 256 << 20
DEFAULT_RESEND_AFTER = 7 * 86400.0
REQUEST_RESEND = 86400.0  # a restore request with no answer goes up again after this
ACK_STEP = 3600.0  # an acknowledgement alone goes up once it says at least this much more
ASOF_STEP = 3600.0  # nothing but a newer "records as of" goes down once it is this much newer


@dataclass
class LinkReport:
    """What one run sent over one link for one repository."""

    link: str
    repo_id: str
    direction: str
    pieces: list[str] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0
    snapshots: list[str] = field(default_factory=list)
    receipts: int = 0
    held: list[tuple[str, str]] = field(default_factory=list)
    forks: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    requested: int = 0  # up: objects asked for by restore requests (node/request_link.py)
    answers: int = 0  # down: requested objects sent

    def to_json(self) -> dict[str, object]:
        return {
            "link": self.link,
            "repository": self.repo_id,
            "direction": self.direction,
            "pieces": self.pieces,
            "objects": self.objects,
            "bytes": self.bytes,
            "snapshots": self.snapshots,
            "receipts": self.receipts,
            "held": [{"snapshot": s, "why": w} for s, w in self.held],
            "requested": self.requested,
            "answers": self.answers,
        }

    def summary(self) -> str:
        if self.direction == "down":
            return (
                f"{self.link} ({self.repo_id[:16]}, down): {len(self.pieces)} pieces, {self.objects} records, "
                f"{self.receipts} receipts" + (f", {self.answers} requested objects" if self.answers else "")
            )
        return (
            f"{self.link} ({self.repo_id[:16]}): {len(self.pieces)} pieces, {self.objects} objects "
            f"({self.bytes} bytes), {len(self.snapshots)} snapshots"
            + (f", a restore request for {self.requested} objects" if self.requested else "")
        )


class SentLog:
    """Objects bundled over one (link, repository), with when: not bundled again before
    ``resend_after`` unless a receipt says the far side lacks them."""

    def __init__(self, nd: NodeDir, repo_id: str, link: str, direction: str) -> None:
        self.path = os.path.join(nd.state_dir(repo_id, direction, link), "sent.json")
        self.sent: dict[str, float] = read_json(self.path, {})

    def due(self, name: str, resend_after: float, now: float) -> bool:
        when = self.sent.get(name)
        return when is None or now - when >= resend_after

    def mark(self, names: list[str]) -> None:
        now = time.time()
        for n in names:
            self.sent[n] = now

    def forget(self, names: list[str]) -> None:
        for n in names:
            self.sent.pop(n, None)

    def save(self) -> None:
        write_json(self.path, self.sent)


def _entry(info: ObjectInfo) -> ManifestEntry:
    # every object that crosses a link is hash-named: the name is the BLAKE3 of its bytes
    return ManifestEntry(info.name, info.size, bytes.fromhex(info.name.split("/", 1)[1]))


def _opener(path: str):  # type: ignore[no-untyped-def]
    def open_it() -> contextlib.AbstractContextManager[BinaryIO]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return os.fdopen(fd, "rb", buffering=0)

    return open_it


def _send(
    nd: NodeDir, link: Link, repo_id: str, kind: str, objects: list[BundleObject], extra: dict[str, object]
) -> list[str]:
    """Write ``objects`` as one bundle over ``link`` and put its pieces into the mailbox (with
    the node's successor record while the far node has not taken up its last key rotation)."""
    conf = link.conf
    successor = successor_for(nd, link.name)
    if successor is not None:
        objects = [*objects, BundleObject(ManifestEntry.of(successor.object_name, successor.raw), successor.raw)]
    keys = link_keys(nd, link, repo_id)
    peer = conf.peer_public()
    size = conf.piece_size or DEFAULT_PIECE_SIZE
    plan = plan_pieces([o.entry for o in objects], size, extra)
    counters = LinkCounters(nd, link.name, repo_id)
    first = counters.take(len(plan))
    outgoing = nd.scratch_dir("outgoing")
    written = write_bundle(
        sending_keys(nd, link.name),
        keys,
        peer,
        outgoing,
        kind=kind,
        first_seq=first,
        objects=objects,
        max_piece_size=size,
        extra=extra,
    )
    names = []
    mailbox = open_mailbox(conf.url, create=True)
    try:
        for piece in written:
            try:
                mailbox.put_file(piece.name, piece.path, consume=True)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(piece.path)
            names.append(piece.name)
    finally:
        mailbox.close()
    own = os.path.join(nd.state_dir("links", link.name), "own-pieces.json")
    mine: dict[str, float] = read_json(own, {})
    mine.update({n: time.time() for n in names})
    write_json(own, mine)
    if successor is not None:
        successor_sent(nd, link.name)
    return names


def forward_link(nd: NodeDir, repo_id: str, conf: Upstream) -> LinkReport:
    """Send what the upstream node behind ``conf`` is not known to hold."""
    link = Link(conf, "up")
    report = LinkReport(conf.name, repo_id, "up")
    store = nd.store(repo_id)
    state = UpstreamState(nd, repo_id, conf.name)
    log = SentLog(nd, repo_id, conf.name, "up")
    now = time.time()
    resend = conf.resend_after or DEFAULT_RESEND_AFTER
    todo = owed(store, state)
    report.damaged = todo.damaged
    data = [i for i in todo.data if log.due(i.name, resend, now)]
    going = {i.name for i in data} | set(log.sent) | set(state.delivered)
    held = {i.name for p in ("packs/",) for i in store.list(p)}
    snaps: list[ObjectInfo] = []
    for info, env in todo.snapshots:
        if not log.due(info.name, resend, now):
            continue
        try:
            packs = snapshot_packs(env, store.get)
        except Exception as exc:  # noqa: BLE001 - an unreadable pack set: the snapshot waits, named
            report.held.append((info.name, f"its pack set cannot be read on this node ({exc})"))
            continue
        lacking = [p for p in packs if p not in going and p not in held]
        if lacking:
            report.held.append((info.name, f"{len(lacking)} of its packs are not on this node"))
            continue
        snaps.append(info)
    caught_up = not todo.count and not report.held and not staged_names(nd, repo_id)
    checkpoint_roots_held(nd, repo_id, store)  # dead sessions' checkpoints go up as roots
    relayed = acks_to_send(nd, store, set(state.delivered) | set(log.sent), caught_up)
    # holding records ahead of the data they speak for (node/holding.py): in the first piece
    keys = sending_keys(nd, conf.name)
    ahead = holdings_ahead(nd, repo_id, store, state, conf.name, todo.snapshots, keys)
    chosen = [i for i in ahead if log.due(i.name, resend, now)] + data + snaps + relayed
    ack_name, ack = own_ack(nd, repo_id, store, state.delivered, keys)
    ack_path = os.path.join(nd.state_dir(repo_id, "up", conf.name), "ack-before.json")
    before = parse_ack(ack)[2]
    said = read_json(ack_path, {})
    said = said if isinstance(said, dict) else {"before": said, "at": 0.0}
    last, last_at = float(said.get("before", 0.0)), float(said.get("at", 0.0))
    # worth a piece alone: an hour more, or a condemnation that came down since and waits for it
    quiet = before <= last + ACK_STEP and not (before > last and condemned_since(store, last_at))
    # restore requests: asked again after a day if no answer came (node/request_link.py)
    asking = requests_to_send(nd, repo_id, conf.name, min(resend, REQUEST_RESEND))
    if not chosen and quiet and asking is None and not successor_due(nd, conf.name, resend):
        return report  # nothing new to say: no piece
    root = store.root if isinstance(store, LocalBackend) else ""
    objects = [BundleObject(_entry(i), _opener(os.path.join(root, i.name))) for i in chosen]
    if asking is not None:
        objects.append(BundleObject(ManifestEntry.of(*asking), asking[1]))
    objects.append(BundleObject(ManifestEntry.of(ack_name, ack), ack))  # last: after what it covers
    report.pieces = _send(nd, link, repo_id, "data", objects, {})
    if asking is not None:
        mark_sent(nd, repo_id, conf.name, asking[1])
        report.requested = len(parse_request(asking[1], repo_id))
    write_json(ack_path, {"before": before, "at": time.time()})
    log.mark([i.name for i in chosen])
    log.save()
    report.objects = len(chosen)
    report.bytes = sum(i.size for i in chosen)
    report.snapshots = [i.name for i in snaps]
    return report


def _up_only(store: Backend, info: ObjectInfo) -> bool:
    """Nodes' acknowledgements, checkpoint roots and holding records only ever go up
    (repo/node_acks.py, repo/checkpoint_roots.py, repo/holding_records.py)."""
    if not info.name.startswith("gc/"):
        return False
    try:
        return store.get(info.name, 0, 4) in (MAGIC_ACK, MAGIC_CKROOT, MAGIC_HOLDING)
    except ObjectMissing:
        return True


def queue_receipt(nd: NodeDir, repo_id: str, link: str, receipt: Receipt) -> None:
    """Keep ``receipt`` for the next down bundle over ``link``."""
    path = os.path.join(nd.state_dir(repo_id, "down", link, "outbox"), receipt.hash)
    with open(path + ".tmp", "wb") as f:
        f.write(receipt.raw)
    os.replace(path + ".tmp", path)


def send_down(nd: NodeDir, repo_id: str, conf: Upstream) -> LinkReport:
    """Send the downstream node behind ``conf`` the records it was not sent and the queued
    receipts (nothing to say: no piece)."""
    link = Link(conf, "down")
    report = LinkReport(conf.name, repo_id, "down")
    store = nd.store(repo_id)
    log = SentLog(nd, repo_id, conf.name, "down")
    records = [i for p in DOWN_PREFIXES for i in store.list(p) if i.name not in log.sent and not _up_only(store, i)]
    outbox = nd.state_dir(repo_id, "down", conf.name, "outbox")
    receipts: list[Receipt] = []
    for leaf in sorted(os.listdir(outbox)):
        if leaf.endswith(".tmp"):
            continue
        with open(os.path.join(outbox, leaf), "rb") as f:
            receipts.append(parse_receipt(f.read()))
    answers = answers_owed(nd, repo_id, conf.name, store)  # objects its restore requests asked for
    listed = listing_answers(nd, repo_id, conf.name)  # listings it asked for (node/listing_link.py)
    asof = records_asof(nd, repo_id)
    told = os.path.join(nd.state_dir(repo_id, "down", conf.name), "asof-sent.json")
    quiet = asof <= float(read_json(told, 0.0)) + ASOF_STEP
    if (
        not records
        and not receipts
        and not answers
        and not listed
        and quiet
        and not successor_due(nd, conf.name, conf.resend_after or DEFAULT_RESEND_AFTER)
    ):
        return report
    write_json(told, asof)
    root = store.root if isinstance(store, LocalBackend) else ""
    objects = [BundleObject(_entry(i), _opener(os.path.join(root, i.name))) for i in records]
    objects += [BundleObject(ManifestEntry.of(r.object_name, r.raw), r.raw) for r in receipts]
    answered = [i for i in (store.stat(n) for n in answers) if i is not None]
    objects += [BundleObject(_entry(i), _opener(os.path.join(root, i.name))) for i in answered]
    # a listing's answer after its objects: the node below finds them all when it reads it
    objects += [BundleObject(ManifestEntry.of(name, raw), raw) for name, raw in listed]
    # the node below may then say its sessions saw every record the top held at this time
    report.pieces = _send(nd, link, repo_id, "down", objects, {"records_asof": records_asof(nd, repo_id)})
    log.mark([i.name for i in records])
    log.save()
    answers_sent(nd, repo_id, conf.name, [i.name for i in answered])
    listing_answers_went(nd, repo_id, conf.name, [name for name, _ in listed])
    report.answers = len(answered)
    for r in receipts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(outbox, r.hash))
    report.objects = len(records)
    report.receipts = len(receipts)
    return report
