"""Where each object a link's bundle brings goes (docs/hierarchy.md, "Links and bundles"; the
piece-level checks come first, in node/link_import.py): records from above, data from below,
receipts, restore requests and their answers, listings, and what is refused and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.node.holdings import UP_PREFIXES, UpstreamState
from bunker.node.links import Link
from bunker.node.listing_link import is_answer as is_listing_answer
from bunker.node.listing_link import take_answer as take_listing_answer
from bunker.node.listing_link import take_listed_object
from bunker.node.node_dir import NodeDir
from bunker.node.receipt_flow import ReceiptOutcome, apply_receipt
from bunker.node.receipts import PREFIX as RECEIPT_PREFIX
from bunker.node.receipts import parse_receipt
from bunker.node.request_link import PREFIX as REQUEST_PREFIX
from bunker.node.request_link import take_answer, take_request
from bunker.node.rotation import keep_successor
from bunker.node.staging import stage
from bunker.node.successor import PREFIX as SUCCESSOR_PREFIX
from bunker.repo.certs import parse_certificate
from bunker.repo.checkpoint_roots import read_checkpoint_root
from bunker.repo.config import parse_config
from bunker.repo.holding_records import read_holding
from bunker.repo.node_acks import parse_ack, verify_ack
from bunker.repo.node_certs import trusted_node
from bunker.repo.objects import MAGIC_CKROOT, MAGIC_HOLDING, is_hash_name
from bunker.repo.policy import parse_policy
from bunker.repo.repository import Repository

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


def digest_name_ok(name: str, digest: bytes) -> bool:
    return is_hash_name(name) and name.split("/", 1)[1] == digest.hex()


def take_object(
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
    if not digest_name_ok(name, digest):
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
    readers: tuple[tuple[bytes, Callable[[Repository, str, bytes], object], str], ...] = (
        (MAGIC_CKROOT, read_checkpoint_root, "checkpoint root"),
        (MAGIC_HOLDING, read_holding, "holding record"),
    )
    for magic, read, what in readers:
        if data.startswith(magic):
            try:
                read(repo, "", data)
            except encoding.FormatError as exc:
                return f"not a valid {what} ({exc})"
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
