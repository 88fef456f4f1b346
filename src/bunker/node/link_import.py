"""`bunker node import`: take in the pieces waiting in the node's mailboxes (docs/hierarchy.md,
"Links and bundles").

For every piece in a link's mailbox, in this order, and before anything is written:

1. its name must be the keyed hash of its bytes under the link's name key for pieces *to this
   node*: pieces for another node (or this node's own, waiting for the far side) are left where
   they are; one whose sealed key opens for this node but whose name does not match is damaged
   (cut short, altered) and is moved to ``state/quarantine`` — named, nothing imported;
2. its seal opens, its header is signed by the link's far node and names this node, the far node
   and a repository this node relays (else quarantined);
3. replay: a sequence number imported before is a duplicate (removed, noted); one at or below
   the low-water mark is a replay (removed, an error); gaps are allowed;
4. the far node must hold a certificate of the repository that is not revoked;
5. each object is checked against its manifest digest as it streams, and its name against the
   digest (every object that crosses a link is hash-named). Data from a downstream node may only
   be packs, index, reference objects and snapshots, and in gc/ nodes' session acknowledgements,
   checkpoint roots and holding records that verify; snapshots are staged (node/staging.py).
   Records from an upstream node may only be configs, certificates, retirement and GC records
   and receipts (node/receipt_flow.py); a config must verify as the repository's.

A piece imported whole is removed from the mailbox. Data pieces are answered with a hop receipt
(written into the mailbox at once: a carried disk takes it back).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, StorageError
from bunker.node.bundle_format import PieceError
from bunker.node.bundle_reader import identify, open_piece
from bunker.node.holdings import UP_PREFIXES, UpstreamState
from bunker.node.links import DUPLICATE, NEW, Link, LinkCounters, links
from bunker.node.listing_link import is_answer as is_listing_answer
from bunker.node.listing_link import take_answer as take_listing_answer
from bunker.node.listing_link import take_listed_object
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.receipt_flow import ReceiptOutcome, apply_receipt, issue_hop_receipt, note_received
from bunker.node.receipts import PREFIX as RECEIPT_PREFIX
from bunker.node.receipts import parse_receipt
from bunker.node.relay_link import send_down
from bunker.node.request_link import PREFIX as REQUEST_PREFIX
from bunker.node.request_link import take_answer, take_request
from bunker.node.rotation import Candidate, apply_successors, candidates, keep_successor, opened_with
from bunker.node.staging import publish_ready, stage
from bunker.node.staleness import note_records_asof
from bunker.node.successor import PREFIX as SUCCESSOR_PREFIX
from bunker.repo.certs import parse_certificate
from bunker.repo.checkpoint_roots import read_checkpoint_root
from bunker.repo.config import parse_config
from bunker.repo.holding_records import read_holding
from bunker.repo.node_acks import parse_ack, verify_ack
from bunker.repo.node_certs import node_certificates, trusted_node
from bunker.repo.objects import MAGIC_CKROOT, MAGIC_HOLDING, is_hash_name
from bunker.repo.policy import parse_policy
from bunker.repo.repository import Repository
from bunker.storage.mailbox import open_mailbox

RECORD_PREFIXES = ("config/", "clients/", "nodes/", "retired/", "gc/", "policy/")


@dataclass
class ImportReport:
    link: str
    direction: str
    pieces: int = 0  # imported whole
    objects: int = 0
    bytes: int = 0
    published: list[str] = field(default_factory=list)
    waiting: dict[str, list[str]] = field(default_factory=dict)
    duplicates: int = 0
    replayed: list[str] = field(default_factory=list)
    foreign: int = 0  # pieces in the mailbox that are not for this node
    own: int = 0  # pieces in the mailbox this node wrote itself (for the far node: left there)
    unknown_sender: list[tuple[str, str]] = field(default_factory=list)  # (piece, sender): left to wait
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (piece, why)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (object, why)
    receipts: ReceiptOutcome = field(default_factory=ReceiptOutcome)
    records: int = 0
    adopted: str = ""  # the far node's new id, when this import took up its key rotation
    successor_waiting: list[str] = field(default_factory=list)  # why its successor record waits
    requests: list[dict[str, Any]] = field(default_factory=list)  # restore requests from below, as taken
    answers: int = 0  # objects this node requested that came down
    listings: list[dict[str, Any]] = field(default_factory=list)  # listing answers that came down, as taken

    def to_json(self) -> dict[str, object]:
        return {
            "link": self.link,
            "direction": self.direction,
            "pieces": self.pieces,
            "objects": self.objects,
            "bytes": self.bytes,
            "published": self.published,
            "waiting": self.waiting,
            "duplicates": self.duplicates,
            "replayed": self.replayed,
            "foreign": self.foreign,
            "own": self.own,
            "unknown_sender": [{"piece": p, "sender": who} for p, who in self.unknown_sender],
            "quarantined": [{"piece": p, "why": w} for p, w in self.quarantined],
            "refused": [{"object": o, "why": w} for o, w in self.refused],
            "receipts_accepted": self.receipts.accepted,
            "receipts_refused": self.receipts.refused,
            "recorded": self.receipts.recorded,
            "records": self.records,
            "peer_rotated_to": self.adopted or None,
            "restore_requests": self.requests,
            "requested_objects_received": self.answers,
            "listings": self.listings,
        }

    def summary(self) -> str:
        return (
            f"{self.link} ({self.direction}): {self.pieces} pieces, {self.objects} objects, "
            f"{len(self.published)} snapshots published, {len(self.waiting)} staged, "
            f"{len(self.receipts.accepted)} receipts"
        )


def _asof_path(nd: NodeDir, repo_id: str, link: Link) -> str:
    return os.path.join(nd.state_dir("links", link.name), f"{repo_id}-asof.json")


def _claims_asof(nd: NodeDir, repo_id: str, link: Link, seq: int, asof: float) -> None:
    """The down bundle that ends with piece ``seq`` says: every record the sender held at
    ``asof`` is in its pieces up to ``seq``."""
    path = _asof_path(nd, repo_id, link)
    claims: dict[str, float] = read_json(path, {})
    claims[str(seq)] = asof
    write_json(path, claims)


def _settle_asof(nd: NodeDir, repo_id: str, link: Link) -> None:
    """Take the newest claim whose pieces, and every piece before them, were all imported (pieces
    arrive in any order; one lost piece holds every later claim back)."""
    path = _asof_path(nd, repo_id, link)
    claims: dict[str, float] = read_json(path, {})
    if not claims:
        return
    counters = LinkCounters(nd, link.name, repo_id)
    upto = counters.floor
    while upto + 1 in counters.seen:
        upto += 1
    done = [s for s in claims if int(s) <= upto]
    if done:
        note_records_asof(nd, repo_id, max(claims[s] for s in done))
        write_json(path, {s: v for s, v in claims.items() if int(s) > upto})


def _quarantine(nd: NodeDir, path: str, name: str) -> None:
    dest = os.path.join(nd.state_dir("quarantine"), name)
    with contextlib.suppress(OSError):
        os.replace(path, dest)


def _digest_name_ok(name: str, digest: bytes) -> bool:
    return is_hash_name(name) and name.split("/", 1)[1] == digest.hex()


def import_link(nd: NodeDir, link: Link) -> ImportReport:
    """Import every piece for this node waiting in ``link``'s mailbox."""
    report = ImportReport(link.name, link.direction)
    _take_successors(nd, link, report)  # a certificate that came since may let one wait no longer
    # this node's current and previous keys, the far node's current and previous (node/rotation.py)
    cands = candidates(nd, link.conf, nd.repositories())
    own = set(read_json(os.path.join(nd.state_dir("links", link.name), "own-pieces.json"), {}))
    incoming = nd.state_dir("incoming")
    imported: dict[str, tuple[list[str], list[int]]] = {}
    mailbox = open_mailbox(link.conf.url)
    try:
        for info in mailbox.list():
            if info.name in own:
                report.own += 1
                continue
            tmp = os.path.join(incoming, info.name)
            mailbox.fetch(info.name, tmp)
            try:
                try:
                    keys = identify(tmp, [c.link for c in cands], my_keys=nd.keys, name=info.name)
                except PieceError as exc:
                    report.quarantined.append((info.name, exc.message))
                    _quarantine(nd, tmp, info.name)
                    mailbox.delete(info.name)
                    continue
                if keys is None:
                    report.foreign += 1
                    continue
                cand = next(c for c in cands if c.link is keys)
                outcome = _import_piece(nd, link, keys.repo_id, tmp, info.name, cand, report)
                if outcome is WAIT:
                    continue
                if outcome is None:
                    _quarantine(nd, tmp, info.name)
                    mailbox.delete(info.name)
                    continue
                names, seq = outcome
                opened_with(nd, link.name, cand.mine)
                if seq:
                    got = imported.setdefault(keys.repo_id, ([], []))
                    got[0].extend(names)
                    got[1].append(seq)
                mailbox.delete(info.name)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    finally:
        mailbox.close()
    _take_successors(nd, link, report)
    for repo_id in nd.repositories():
        if link.direction == "up":
            _settle_asof(nd, repo_id, link)
        staged = publish_ready(nd, repo_id, nd.store(repo_id))
        report.published += staged.published
        report.waiting.update(staged.waiting)
        if link.direction == "down" and repo_id in imported:
            names, seqs = imported[repo_id]
            lacking = sorted({n for need in staged.waiting.values() for n in need})
            issue_hop_receipt(nd, repo_id, link, names, seqs, lacking)
            send_down(nd, repo_id, link.conf)
    return report


def _take_successors(nd: NodeDir, link: Link, report: ImportReport) -> None:
    taken = apply_successors(nd, link.conf)
    report.adopted = taken.adopted or report.adopted
    report.successor_waiting = taken.waiting
    report.refused += taken.refused


WAIT: tuple[list[str], int] = ([], -1)  # _import_piece: leave the piece in the mailbox for a later import


def _import_piece(
    nd: NodeDir,
    link: Link,
    repo_id: str,
    path: str,
    name: str,
    cand: Candidate,
    report: ImportReport,
) -> tuple[list[str], int] | None:
    """Import one piece; None when it must be quarantined (the reason is in the report).
    Returns the names imported and the piece's number (0 for a duplicate or a replay)."""
    store = nd.store(repo_id)
    try:
        opened = open_piece(path, cand.mine, cand.link, cand.peer, name=name)
    except PieceError as exc:
        report.quarantined.append((name, exc.message))
        return None
    with opened:
        h = opened.header
        counters = LinkCounters(nd, link.name, repo_id)
        verdict = counters.judge(h.seq)
        if verdict != NEW:
            if verdict == DUPLICATE:
                report.duplicates += 1
            else:
                report.replayed.append(name)
            return [], 0
        repo = Repository.open(store, repo_id, floor=False)
        if trusted_node(repo, h.sender) is None and not any(c.node_id == h.sender for c in node_certificates(repo)):
            # certified at the top after this node's store last heard from it: not damage, so the
            # piece stays in the mailbox for the import after the certificate has come down
            report.unknown_sender.append((name, f"node {link.conf.peer_name} ({h.sender[:16]})"))
            return WAIT
        if trusted_node(repo, h.sender) is None:
            report.quarantined.append(
                (
                    name,
                    f"it comes from node {link.conf.peer_name} ({h.sender[:16]}), which holds no certificate of "
                    "this repository that is not revoked",
                )
            )
            return None
        want = "data" if link.direction == "down" else "down"
        if h.kind != want:
            report.quarantined.append((name, f"a {h.kind} piece cannot come this way over link {link.name}"))
            return None
        names: list[str] = []
        try:
            for entry, chunks in opened.stream():
                data = b"".join(chunks)
                if _take(nd, link, repo_id, store, entry.name, entry.digest, data, report):
                    names.append(entry.name)
                    report.objects += 1
                    report.bytes += len(data)
        except PieceError as exc:
            report.quarantined.append((name, exc.message))
            return None
        if link.direction == "down":
            # noted before the piece counts as imported: a run killed after that sees the piece
            # as a duplicate next time, and what it carried must still get its record receipt
            note_received(nd, repo_id, link.name, names)
        counters.imported(h.seq, time.time())
        counters.save()
        asof = h.extra.get("records_asof")
        if link.direction == "up" and h.index == h.count - 1 and isinstance(asof, (int, float)):
            _claims_asof(nd, repo_id, link, h.seq, float(asof))
        report.pieces += 1
        return names, h.seq


def _take(
    nd: NodeDir,
    link: Link,
    repo_id: str,
    store: object,
    name: str,
    digest: bytes,
    data: bytes,
    report: ImportReport,
) -> bool:
    """Put one verified object where it belongs; False (and the reason) when it is refused."""
    from bunker.storage.backend import Backend

    assert isinstance(store, Backend)
    if name.startswith(SUCCESSOR_PREFIX):  # the far node rotated its key (node/rotation.py)
        why = keep_successor(nd, link.name, data)
        if why is not None:
            report.refused.append((name, why))
        return False
    if name.startswith(RECEIPT_PREFIX) and link.direction == "up":
        try:
            receipt = parse_receipt(data)
        except encoding.FormatError as exc:
            report.refused.append((name, f"malformed receipt: {exc}"))
            return False
        apply_receipt(nd, repo_id, link, receipt, report.receipts)
        return True
    if name.startswith(REQUEST_PREFIX) and link.direction == "up" and is_listing_answer(data):
        try:
            report.listings.append(take_listing_answer(nd, repo_id, store, link.name, data))
        except encoding.FormatError as exc:
            report.refused.append((name, f"malformed listing answer: {exc}"))
        return False  # (not an object of the repository)
    if name.startswith(REQUEST_PREFIX) and link.direction == "down":  # restore requests from below
        try:
            taken = take_request(nd, repo_id, link.name, data, store)
        except encoding.FormatError as exc:
            report.refused.append((name, f"malformed restore request: {exc}"))
            return False
        report.requests.append(taken)
        return False  # (not an object of the repository: no receipt names it)
    if not _digest_name_ok(name, digest):
        report.refused.append((name, "its name is not the hash of its bytes"))
        return False
    if link.direction == "up" and name.startswith("packs/") and take_answer(nd, repo_id, store, name, data):
        report.answers += 1  # an object this node requested for a restore
        return True
    if link.direction == "up" and take_listed_object(nd, repo_id, store, name, data):
        report.answers += 1  # an object a listing this node asked for brings
        return True
    allowed = UP_PREFIXES if link.direction == "down" else RECORD_PREFIXES
    if link.direction == "down" and name.startswith("gc/"):
        why = _ack_problem(nd, repo_id, data)
        if why:
            report.refused.append((name, why))
            return False
        store.put(name, data, if_absent=True)
        return True
    if not name.startswith(allowed):
        report.refused.append((name, f"a {name.split('/', 1)[0]}/ object cannot come this way over link {link.name}"))
        return False
    # a certificate from below (a client certified after the node was seeded), a policy from
    # above: master-signed, checked against the config the store holds
    if (link.direction == "down" and name.startswith("clients/")) or name.startswith("policy/"):
        parse, what = (parse_certificate, "certificate") if name.startswith("clients/") else (parse_policy, "policy")
        repo = Repository.open(store, repo_id, floor=False)
        try:
            parse(data, repo.config.master_verify, repo_id)
        except encoding.FormatError as exc:
            report.refused.append((name, f"not a {what} the master key signed for this repository ({exc})"))
            return False
    if name.startswith("config/"):
        try:
            cfg = parse_config(data)
        except encoding.FormatError as exc:
            report.refused.append((name, f"invalid config: {exc}"))
            return False
        if cfg.repo_id != repo_id:
            report.refused.append((name, f"a config of repository {cfg.repo_id[:16]}"))
            return False
    if name.startswith("snapshots/"):
        stage(nd, repo_id, name, data)
        return True
    if store.put(name, data, if_absent=True) and link.direction == "up":
        report.records += 1
        if name.startswith("clients/"):  # it came from above: never sent back up that link
            state = UpstreamState(nd, repo_id, link.name)
            state.mark_recorded([name])
            state.save()
    return True


def _ack_problem(nd: NodeDir, repo_id: str, data: bytes) -> str:
    """Why a gc/ object from a node below is refused ("" when it is a valid session
    acknowledgement, checkpoint root or holding record of a node certified for the repository:
    the only gc/ objects that come up)."""
    repo = Repository.open(nd.store(repo_id), repo_id, floor=False)
    if data.startswith(MAGIC_CKROOT):
        try:
            read_checkpoint_root(repo, "", data)
        except encoding.FormatError as exc:
            return f"not a valid checkpoint root ({exc})"
        return ""
    if data.startswith(MAGIC_HOLDING):
        try:
            read_holding(repo, "", data)
        except encoding.FormatError as exc:
            return f"not a valid holding record ({exc})"
        return ""
    try:
        _, node, _, _, _ = parse_ack(data)
        cert = trusted_node(repo, node)
        if cert is None:
            return f"a session acknowledgement of node {node[:16]}, which holds no certificate that is not revoked"
        verify_ack(data, repo_id, cert)
    except encoding.FormatError as exc:
        return (
            f"not a valid session acknowledgement ({exc}): only those, checkpoint roots and holding records "
            "come up in gc/"
        )
    return ""


def import_all(nd: NodeDir, only: str | None = None) -> tuple[list[ImportReport], list[tuple[str, str, str]]]:
    """Import from every link (or only ``only``); problems as (level, code, message)."""
    reports: list[ImportReport] = []
    problems: list[tuple[str, str, str]] = []
    chosen = [lk for lk in links(nd) if only is None or lk.name == only]
    if only is not None and not chosen:
        nd.upstream(only)  # names the links there are
    for link in chosen:
        try:
            r = import_link(nd, link)
        except StorageError as exc:
            problems.append(
                (
                    "warn",
                    "mailbox-unreachable",
                    f"the mailbox of link {link.name} cannot be reached ({exc.message}); nothing is lost: "
                    f"import again once it is there ({exc.hint})",
                )
            )
            continue
        except BunkerError as exc:
            problems.append(("err", "import-failed", f"link {link.name}: {exc.message} (next step: {exc.hint})"))
            continue
        reports.append(r)
        for piece, why in r.quarantined:
            problems.append(
                (
                    "err",
                    "piece-refused",
                    f"piece {piece[:16]} in the mailbox of link {link.name} was not imported: {why}; it was "
                    f"moved to {nd.state_dir('quarantine')}",
                )
            )
        for piece, who in r.unknown_sender:
            problems.append(
                (
                    "warn",
                    "sender-unknown",
                    f"piece {piece[:16]} in the mailbox of link {link.name} comes from {who}, whose certificate "
                    f"has not reached node {nd.name} yet; it was left in the mailbox, nothing imported. Next step: "
                    "bring the top's records down (`bunker node forward` on this node, or a fresh seed file with "
                    "`bunker node seed`), then import again",
                )
            )
        for piece in r.replayed:
            problems.append(
                (
                    "err",
                    "piece-replayed",
                    f"piece {piece[:16]} in the mailbox of link {link.name} is an old piece imported before "
                    "(below the replay window): someone put it back; it was removed, nothing imported",
                )
            )
        if r.duplicates:
            problems.append(
                (
                    "note",
                    "piece-duplicate",
                    f"{r.duplicates} pieces in the mailbox of link {link.name} were imported before; removed",
                )
            )
        for obj, why in r.refused:
            problems.append(("err", "object-refused", f"{obj} from link {link.name} was refused: {why}"))
        for why in r.receipts.refused:
            problems.append(("err", "receipt-refused", f"link {link.name}: {why}"))
        for why in r.successor_waiting:
            problems.append(("note", "successor-waiting", f"link {link.name}: {why}"))
        if r.foreign:
            problems.append(
                (
                    "note",
                    "foreign-pieces",
                    f"{r.foreign} pieces in the mailbox of link {link.name} are not for this node; left there",
                )
            )
    return reports, problems
