"""A node's delivery to a *direct* upstream: the repository of record itself, on any backend
(docs/hierarchy.md, "Up").

Every object is written, read back and checked against its name before it counts as delivered;
that read-back is what a record receipt certifies, so a direct delivery marks what it wrote as
*recorded* at once (only recorded objects may be evicted). Snapshots go last, each only once
every pack its pack set names is at the top, in chain order; a snapshot whose place in its
client's chain the top already holds with another snapshot is a fork: it is kept on the node and
named, never sent. Each snapshot read back is a head the node witnesses (node/witnessed.py), and
so is the newest snapshot of every other client at the top (node/top_heads.py).

The same run brings the top's records down into the node's store (configs, certificates, node
certificates, retirement and GC records), so the node's clients see revocations and condemned
packs as the top does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bunker import encoding
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.node.acks import (
    acks_to_send,
    certified_keys,
    checkpoint_roots_held,
    condemned_since,
    drop_older_acks,
    own_ack,
)
from bunker.node.holding import holdings_ahead
from bunker.node.holdings import DOWN_PREFIXES, UpstreamState, owed, snapshot_packs
from bunker.node.node_dir import NodeDir, Upstream, read_json, write_json
from bunker.node.staging import staged_names
from bunker.node.staleness import note_heard, note_records_asof
from bunker.node.top_heads import note_top_heads, top_snapshots
from bunker.node.witnessed import note_witnessed
from bunker.repo.moves import PackMoves
from bunker.repo.node_acks import parse_ack
from bunker.repo.objects import MAGIC_ACK, MAGIC_CKROOT, MAGIC_HOLDING, content_hash, is_hash_name
from bunker.repo.repository import Repository
from bunker.repo.witnesses import WitnessedHead
from bunker.storage.backend import Backend, ObjectInfo
from bunker.storage.url import open_backend

UPLOAD_THREADS = 3
UP_ONLY = (MAGIC_ACK, MAGIC_CKROOT, MAGIC_HOLDING)  # gc/ objects that come from nodes and never go back down
ACK_STEP = 3600.0  # an acknowledgement without new data is written once it says this much more


@dataclass
class DirectReport:
    """What one delivery to a direct upstream did."""

    upstream: str
    repo_id: str
    sent: int = 0
    sent_bytes: int = 0
    present: int = 0  # already at the top (counted as delivered)
    snapshots: list[str] = field(default_factory=list)
    held: list[tuple[str, str]] = field(default_factory=list)  # (snapshot, why) kept for a later run
    forks: list[str] = field(default_factory=list)  # snapshots whose chain place the top holds otherwise
    damaged: list[str] = field(default_factory=list)
    down: int = 0  # records brought down from the top

    def to_json(self) -> dict[str, object]:
        return {
            "upstream": self.upstream,
            "repository": self.repo_id,
            "sent": self.sent,
            "sent_bytes": self.sent_bytes,
            "present": self.present,
            "snapshots": self.snapshots,
            "held": [{"snapshot": s, "why": w} for s, w in self.held],
            "forks": self.forks,
            "damaged": self.damaged,
            "records_down": self.down,
        }


def open_top(upstream: Upstream, repo_id: str) -> tuple[Backend, Repository]:
    """The repository of record behind a direct upstream, checked to be ``repo_id``."""
    backend = open_backend(upstream.url)
    try:
        return backend, Repository.open(backend, repo_id, floor=False, pinned_by=f"upstream {upstream.name}")
    except BaseException:
        backend.close()
        raise


def not_moved(missing: list[str], moves: PackMoves, at_top: set[str]) -> list[str]:
    """Those of ``missing`` (``packs/<hex>`` absent at the top) whose blobs no repack there moved
    into packs the top holds. A pack the top repacked while a snapshot naming it waited below is
    not owed again: the top's snapshot reads it through the move record (docs/format.md section
    15), and the old pack, deleted there, may be gone from the node too."""
    held = {n.split("/", 1)[1] for n in at_top}
    return [p for p in missing if not moves.covered(p.split("/", 1)[1], held)]


def _copy(src: Backend, dst: Backend, info: ObjectInfo) -> bool:
    """Copy one object, read it back and check it by name; False if it was already there."""
    data = src.get(info.name)
    if is_hash_name(info.name) and content_hash(data) != info.name.split("/", 1)[1]:
        raise CorruptObject(info.name, "its bytes in the node's store do not match its name")
    stored = dst.put(info.name, data, if_absent=True)
    back = dst.get(info.name)
    if back != data:
        raise BunkerError(
            f"{info.name} does not read back from the upstream as written",
            "the upstream's storage is damaged or another writer replaced the object; run `bunker check` there",
            exit_code=ExitCode.INTEGRITY,
        )
    return stored


def bring_down(top: Backend, store: Backend, state: UpstreamState | None = None) -> int:
    """Copy the top's records the node's store lacks; returns how many. With ``state``, every
    record the top holds counts as recorded there (a certificate is never sent back up)."""
    n = 0
    for prefix in DOWN_PREFIXES:
        have = {i.name for i in store.list(prefix)}
        for info in top.list(prefix):
            if state is not None and prefix == "clients/" and info.name not in state.recorded:
                state.mark_recorded([info.name])
            if info.name in have:
                continue
            data = top.get(info.name)
            if is_hash_name(info.name) and content_hash(data) != info.name.split("/", 1)[1]:
                continue  # damaged at the top: `check` there names it; never spread it
            if data[:4] in UP_ONLY:
                continue  # nodes' acknowledgements, checkpoint roots and holding records only ever go up
            if store.put(info.name, data, if_absent=True):
                n += 1
    return n


def _send_acks(
    nd: NodeDir, repo_id: str, store: Backend, top: Backend, state: UpstreamState, caught_up: bool, moved: bool
) -> None:
    """This node's acknowledgement for the top, and those of the nodes below it that it passes on
    (node/acks.py): after the data, so an acknowledgement never arrives before what it covers."""
    caught_up = caught_up and not staged_names(nd, repo_id) and not owed(store, state).count
    checkpoint_roots_held(nd, repo_id, store)  # dead sessions' checkpoints go up as roots
    # what went up once is not sent again: a root the top removed (its session is in a snapshot
    # there, or it could not be adopted) stays removed
    have = {i.name for i in top.list("gc/")} | set(state.delivered)
    for info in acks_to_send(nd, store, have, caught_up):
        _copy(store, top, info)
        state.mark_recorded([info.name])
    name, data = own_ack(nd, repo_id, store, state.delivered)
    said = os.path.join(state.dir, "ack-before.json")
    before = parse_ack(data)[2]
    last = float(read_json(said, 0.0))
    # a new object when it says something: new data, a condemnation that waits, or an hour more
    if moved or before > last + ACK_STEP or (before > last and condemned_since(top, last)):
        top.put(name, data, if_absent=True)
        write_json(said, before)


def forward_direct(
    node: NodeDir, repo_id: str, upstream: Upstream, progress: Callable[[int, int], None] | None = None
) -> DirectReport:
    """Deliver what ``node`` holds of ``repo_id`` to the direct ``upstream``."""
    report = DirectReport(upstream.name, repo_id)
    store = node.store(repo_id)
    state = UpstreamState(node, repo_id, upstream.name)
    state.delivered_is_recorded()
    top, top_repo = open_top(upstream, repo_id)
    lock = threading.Lock()
    seen: list[WitnessedHead] = []  # snapshots written to the top and read back: witnessed
    try:
        todo = owed(store, state)
        report.damaged = todo.damaged
        # holding records first (node/holding.py): the top hears what is on its way before the data
        keys = certified_keys(node, Repository.open(store, repo_id, floor=False))
        for info in holdings_ahead(node, repo_id, store, state, upstream.name, todo.snapshots, keys):
            _copy(store, top, info)
            state.mark_recorded([info.name])
        done = 0

        def one(info: ObjectInfo) -> None:
            nonlocal done
            stored = _copy(store, top, info)
            with lock:
                if stored:
                    report.sent += 1
                    report.sent_bytes += info.size
                else:
                    report.present += 1
                state.mark_recorded([info.name])
                done += 1
                if progress:
                    progress(done, todo.count)

        pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="bunker-node-up")
        try:
            for _ in pool.map(one, todo.data):
                pass
        finally:
            # a failure or a stop (SIGTERM to `node run`) ends the run after the objects in
            # flight: the rest is not tried (an unreachable upstream would fail each in turn)
            pool.shutdown(wait=True, cancel_futures=True)
        state.save()
        at_top = {i.name for i in top.list("packs/")}
        # (certificate, sequence number) -> the top's verified snapshot there (each read once)
        verified = top_snapshots(node, repo_id, upstream.name, top, store) if todo.snapshots else {}
        places = {place: name for name, place in verified.items()}
        moves: PackMoves | None = None  # the top's move records, read when a pack is not there
        for info, env in todo.snapshots:
            # a snapshot that links to one kept back as a fork continues the fork: the top
            # would get a link to a snapshot it never holds (snapshots come in chain order)
            if places.get((env.cert, env.seq), info.name) != info.name or env.prev in report.forks:
                report.forks.append(info.name)
                continue
            try:
                missing = [p for p in snapshot_packs(env, top.get) if p not in at_top]
                if missing:
                    moves = moves or PackMoves.load(top_repo)
                    missing = not_moved(missing, moves, at_top)
            except (encoding.FormatError, ObjectMissing, CorruptObject) as exc:
                report.held.append((info.name, f"its pack set cannot be read at the top ({exc})"))
                continue
            if missing:
                report.held.append((info.name, f"{len(missing)} of its packs are not at the top yet"))
                continue
            one(info)
            places[(env.cert, env.seq)] = info.name
            report.snapshots.append(info.name)
            seen.append(WitnessedHead(env.cert, env.seq, info.name, "direct", upstream.name, time.time()))
        state.save()
        moved = bool(report.sent or report.snapshots)
        _send_acks(node, repo_id, store, top, state, caught_up=not report.held and not report.forks, moved=moved)
        asof = time.time()  # every record the top held by now is in the store after bring_down
        report.down = bring_down(top, store, state)
        note_records_asof(node, repo_id, asof)
        note_top_heads(node, repo_id, upstream.name, top, store)  # with the certificates just brought down
        note_heard(node, repo_id, upstream.name)
        drop_older_acks(node, store)
    finally:
        state.save()
        note_witnessed(node, repo_id, seen)
        top.close()
    return report
