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
   and receipts (node/receipt_flow.py); a config must verify as the repository's. Where each
   object goes is node/link_objects.py's.

A piece imported whole is removed from the mailbox. Data pieces are answered with a hop receipt
(written into the mailbox at once: a carried disk takes it back).
"""

from __future__ import annotations

import contextlib
import os
import time

from bunker.errors import BunkerError, StorageError
from bunker.node.bundle_format import PieceError
from bunker.node.bundle_reader import identify, open_piece
from bunker.node.link_objects import ImportReport, take_object
from bunker.node.links import DUPLICATE, NEW, Link, LinkCounters, links
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.receipt_flow import issue_hop_receipt, note_received
from bunker.node.relay_link import send_down
from bunker.node.rotation import Candidate, apply_successors, candidates, opened_with
from bunker.node.staging import publish_ready
from bunker.node.staleness import note_records_asof
from bunker.repo.node_certs import node_certificates, trusted_node
from bunker.repo.repository import Repository
from bunker.storage.mailbox import open_mailbox


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


def import_link(nd: NodeDir, link: Link) -> ImportReport:
    """Import every piece for this node waiting in ``link``'s mailbox."""
    report = ImportReport(link.name, link.direction)
    _take_successors(nd, link, report)  # a certificate that came since may let one wait no longer
    # this node's current and previous keys, the far node's current and previous (node/rotation.py)
    cands = candidates(nd, link.conf, nd.repositories())
    own = set(read_json(os.path.join(nd.state_dir("links", link.name), "own-pieces.json"), {}))
    incoming = nd.scratch_dir("incoming")
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
                if take_object(nd, link, repo_id, store, entry.name, entry.digest, data, report):
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
