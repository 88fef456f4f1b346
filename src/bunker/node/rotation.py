"""Rotating a node's key (docs/hierarchy.md, "Rotating a node's key").

`bunker node rotate-key DIR` makes a new node seed: ``node.key`` holds the new one, the old one
stays as ``node.key.previous`` (one generation: a second rotation drops the oldest key, so it is
refused while any link still waits for the first), and a successor record signed by both keys
(node/successor.py) waits in ``state/rotation.json``. The master key certifies the new card as
it certified the first (`bunker key new-node CARD --caps ...`).

The safe rule, per link: the node keeps sealing, signing and naming what it sends over a link
with its *old* keys, and sends the successor record with each bundle (on its own once every
``resend_after`` when there is nothing else), until a piece from the far node opens with the
*new* keys. The far node seals to the new keys only after it took the record up, and it takes
it up only when the record verifies against the keys it pinned for the link and its own store
holds a master-signed, non-revoked certificate of the new keys under the node's name (in every
repository where the old keys were certified). So nothing is ever sent under keys the receiver
cannot check, whichever certificate or bundle arrives first, and a link whose far node never
hears of the rotation simply goes on with the old keys (valid until the master revokes them).

Receivers try their current and previous keys: a node opens pieces sealed to its current or its
previous keys, from the far node's current or previous keys (pieces written before a rotation
travel on for days on a carried disk), and accepts receipts issued to either of its ids.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from dataclasses import dataclass, field

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys, NodePublic
from bunker.errors import ExitCode
from bunker.node.bundle_format import LinkKeys
from bunker.node.node_dir import (
    KEY_FILE,
    NEXT_KEY_FILE,
    PREVIOUS_KEY_FILE,
    NodeDir,
    NodeError,
    Upstream,
    key_text,
    read_json,
    write_json,
)
from bunker.node.receipts import IssuedChain, ReceivedChain
from bunker.node.successor import Successor, make_successor, parse_successor, verify_successor
from bunker.private_files import fsync_dir, write_private_file
from bunker.repo.node_certs import trusted_node
from bunker.repo.repository import Repository

STATE_FILE = "rotation.json"


@dataclass
class Rotation:
    """The node's last rotation (``state/rotation.json``)."""

    previous: str  # the old node id
    current: str  # the new node id
    record: bytes  # the successor record
    pending: dict[str, float]  # link -> when the record last went over it (0: not yet); gone once adopted
    time: float

    @property
    def successor(self) -> Successor:
        return parse_successor(self.record)


def _state_path(nd: NodeDir) -> str:
    return os.path.join(nd.state_dir(), STATE_FILE)


def _link_names(nd: NodeDir) -> list[str]:
    return [u.name for u in nd.config.upstreams if u.kind == "link"] + [d.name for d in nd.config.downstreams]


def load_rotation(nd: NodeDir) -> Rotation | None:
    """The node's last rotation, or None (never rotated, or a rotation that stopped before the
    node took the new key: then the old one is still current and nothing was announced)."""
    doc = read_json(_state_path(nd), None)
    if not isinstance(doc, dict) or doc.get("current") != nd.config.node_id:
        return None
    known = set(_link_names(nd))
    return Rotation(
        previous=str(doc["previous"]),
        current=str(doc["current"]),
        record=bytes.fromhex(str(doc["record"])),
        pending={k: float(v) for k, v in dict(doc.get("pending", {})).items() if k in known},
        time=float(doc.get("time", 0.0)),
    )


def _save(nd: NodeDir, r: Rotation) -> None:
    write_json(
        _state_path(nd),
        {"previous": r.previous, "current": r.current, "record": r.record.hex(), "pending": r.pending, "time": r.time},
    )


def rotate_key(nd: NodeDir) -> Rotation:
    """Give ``nd`` a new key (see the module's docstring); returns the rotation. The caller
    opens the node directory again to use the new key."""
    before = load_rotation(nd)
    if before is not None and before.pending:
        raise NodeError(
            f"node {nd.name} still waits for its last key rotation to be taken up over links "
            f"{', '.join(sorted(before.pending))}: a second rotation now would drop the key those links still use",
            "certify the current card at the top (`bunker key new-node CARD`), then forward and import until "
            f"`bunker node status {nd.root}` shows no link waiting; or remove a link that is gone for good",
            exit_code=ExitCode.USAGE,
        )
    old = nd.keys
    with open(os.path.join(nd.root, KEY_FILE), encoding="utf-8") as f:
        old_text = f.read()
    seed = os.urandom(32)
    new = NodeKeys.from_seed(seed)
    write_private_file(os.path.join(nd.root, PREVIOUS_KEY_FILE), old_text)
    record = make_successor(old, new, nd.name)
    rotation = Rotation(old.node_id, new.node_id, record.raw, dict.fromkeys(_link_names(nd), 0.0), time.time())
    _save(nd, rotation)
    # node.json names the new key before node.key holds it: NodeDir.keys finishes a rotation
    # that stops between the two (node.key.next is renamed over node.key)
    write_private_file(os.path.join(nd.root, NEXT_KEY_FILE), key_text(seed))
    nd.config.node_id = new.node_id
    nd.save()
    os.replace(os.path.join(nd.root, NEXT_KEY_FILE), os.path.join(nd.root, KEY_FILE))
    fsync_dir(nd.root)
    return rotation


# ---------------------------------------------------------------------- sending


def sending_keys(nd: NodeDir, link: str) -> NodeKeys:
    """The keys ``nd`` seals, signs and names with over ``link``: the previous ones while the
    far node has not taken up the last rotation, else the current ones."""
    r = load_rotation(nd)
    if r is not None and link in r.pending:
        prev = nd.previous_keys
        if prev is not None and prev.node_id == r.previous:
            return prev
    return nd.keys


def successor_for(nd: NodeDir, link: str) -> Successor | None:
    """The successor record to send over ``link`` with each bundle (None: the far node has it)."""
    r = load_rotation(nd)
    return r.successor if r is not None and link in r.pending else None


def successor_due(nd: NodeDir, link: str, resend_after: float) -> bool:
    """Whether the record must go over ``link`` even in a bundle of its own: never sent yet, or
    not within ``resend_after`` seconds."""
    r = load_rotation(nd)
    return r is not None and link in r.pending and time.time() - r.pending[link] >= resend_after


def successor_sent(nd: NodeDir, link: str) -> None:
    r = load_rotation(nd)
    if r is not None and link in r.pending:
        r.pending[link] = time.time()
        _save(nd, r)


# ---------------------------------------------------------------------- receiving


@dataclass(frozen=True)
class Candidate:
    """One way a piece may have come over a link: this node's keys, the far node's, the keys
    of the link between them for one repository."""

    link: LinkKeys
    mine: NodeKeys
    peer: NodePublic


def candidates(nd: NodeDir, conf: Upstream, repos: list[str]) -> list[Candidate]:
    """Every (my keys, far node's keys) pair a piece over the link ``conf`` may use, current ones
    first: this node's current and previous keys, the far node's current and previous ones."""
    mine = [nd.keys]
    prev = nd.previous_keys
    if prev is not None and prev.node_id != nd.keys.node_id:
        mine.append(prev)
    peers = [conf.peer_public()]
    old_peer = conf.previous_public()
    if old_peer is not None:
        peers.append(old_peer)
    return [Candidate(LinkKeys.between(m, p, repo), m, p) for repo in repos for m in mine for p in peers]


def opened_with(nd: NodeDir, link: str, mine: NodeKeys) -> bool:
    """Note that a piece over ``link`` opened with ``mine``: when those are the current keys and
    the link waited for the rotation, the far node took it up (True) and the link moves to them."""
    r = load_rotation(nd)
    if r is None or link not in r.pending or mine.node_id != r.current:
        return False
    del r.pending[link]
    _save(nd, r)
    return True


def my_ids(nd: NodeDir) -> tuple[str, ...]:
    """This node's current id and, after a rotation, its previous one (receipts name either)."""
    prev = nd.previous_keys
    return (nd.config.node_id,) + ((prev.node_id,) if prev is not None else ())


def peer_ids(conf: Upstream) -> tuple[str, ...]:
    """The far node's current id and, after it rotated, its previous one."""
    old = conf.previous_public()
    return (conf.peer,) + ((old.node_id,) if old is not None else ())


def keep_successor(nd: NodeDir, link: str, data: bytes) -> str | None:
    """Hold a successor record that came over ``link`` until :func:`apply_successors` can check
    it; the reason when it is not one."""
    try:
        record = parse_successor(data)
    except encoding.FormatError as exc:
        return f"malformed successor record: {exc}"
    write_private_file(os.path.join(nd.state_dir("links", link, "successors"), record.hash), data.hex())
    return None


@dataclass
class Taken:
    """What :func:`apply_successors` did for one link."""

    adopted: str = ""  # the far node's new id, when the link now pins it
    waiting: list[str] = field(default_factory=list)  # why a record waits
    refused: list[tuple[str, str]] = field(default_factory=list)  # (record, why)


def apply_successors(nd: NodeDir, conf: Upstream) -> Taken:
    """Check the successor records held for the link ``conf``: pin the far node's new keys when
    one verifies and is certified; refuse those that do not verify; keep the rest."""
    out = Taken()
    where = nd.state_dir("links", conf.name, "successors")
    for leaf in sorted(os.listdir(where)):
        path = os.path.join(where, leaf)
        try:
            with open(path, encoding="utf-8") as f:
                record = parse_successor(bytes.fromhex(f.read()))
        except (OSError, ValueError, encoding.FormatError) as exc:
            out.refused.append((leaf, f"unreadable successor record ({exc})"))
            os.unlink(path)
            continue
        if record.new_id in peer_ids(conf):
            os.unlink(path)  # taken up before: the far node repeats it until it hears back
            continue
        why = verify_successor(record, conf.peer_public())
        if why is not None:
            out.refused.append((record.object_name, f"a successor record of node {conf.peer_name} is refused: {why}"))
            os.unlink(path)
            continue
        lacking = _uncertified(nd, record)
        if lacking:
            out.waiting.append(
                f"node {conf.peer_name} rotated its key to {record.new_id[:16]}; this node goes on with the old key "
                f"until a certificate of the new one (same node name) reaches its store for repository "
                f"{', '.join(r[:16] for r in lacking)}: certify the new card at the top (`bunker key new-node CARD`) "
                "and let the records come down (forward and import)"
            )
            continue
        _adopt(nd, conf, record)
        os.unlink(path)
        out.adopted = record.new_id
    return out


def _uncertified(nd: NodeDir, record: Successor) -> list[str]:
    """Repositories where the old keys are certified and the new ones are not (under the same
    node name); every repository when the old keys are certified nowhere."""
    lacking, certified = [], 0
    for repo_id in nd.repositories():
        repo = Repository.open(nd.store(repo_id), repo_id, floor=False)
        old = trusted_node(repo, record.old)
        if old is None:
            continue
        certified += 1
        new = trusted_node(repo, record.new_id)
        if new is None or new.node != old.node:
            lacking.append(repo_id)
    return lacking if certified else nd.repositories()


def _adopt(nd: NodeDir, conf: Upstream, record: Successor) -> None:
    """Pin the far node's new keys for the link ``conf`` (its old ones stay as the previous)."""
    old_id, new_id = conf.peer, record.new_id
    fresh = NodeDir(nd.root)  # node.json as it is now: another command may have changed it
    for link in (*fresh.config.upstreams, *fresh.config.downstreams, conf):
        if link.name == conf.name and link.kind == conf.kind:
            link.previous_card, link.peer = link.card, new_id
            link.card = base64.b64encode(record.new.to_bytes()).decode()
    fresh.save()
    nd.config = fresh.config
    # the receipts this node issues to the far node, and those it received from it, go on in
    # the same chains under the new id (a chain that restarted would look like a rollback)
    for repo_id in nd.repositories():
        for kind in ("hop", "record"):
            for old, new in (
                (IssuedChain(nd, repo_id, kind, old_id).path, IssuedChain(nd, repo_id, kind, new_id).path),
                (ReceivedChain(nd, repo_id, kind, old_id).path, ReceivedChain(nd, repo_id, kind, new_id).path),
            ):
                if os.path.exists(old) and not os.path.exists(new):
                    shutil.copyfile(old, new)


def rotation_status(nd: NodeDir) -> dict[str, object] | None:
    """For `node status`: the last rotation and the links still waiting for it."""
    r = load_rotation(nd)
    if r is None:
        return None
    return {"previous": r.previous, "rotated": r.time, "waiting_links": sorted(r.pending)}
