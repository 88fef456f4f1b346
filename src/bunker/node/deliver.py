"""Delivering this client's spooled snapshots onto its real chain in the repository.

A snapshot taken while the repository could not be reached follows the head this machine
remembered. That head can be wrong: the state directory was deleted (the guide says it may be) or
restored from an old copy, or another run of this client (another machine, or one that was
already linking) wrote snapshots meanwhile. Sent as they are, such snapshots would fork the
chain forever. So, under the client's chain lock and a claim of each number (backup/link.py),
each spooled snapshot of this client is, in chain order:

- dropped when the repository already holds its run (same session and checkpoint counter): a
  delivery that ran before, or beside this one, sent it, perhaps under another number;
- repaired when packs it needs vanished upstream (node/vanished.py);
- renumbered onto the repository's head when the repository already has its number, or its
  number follows the head but not its hash: signed again with the new number and previous
  snapshot (bodies are sealed to the run, session and counter, not to the number, so they still
  open: docs/format.md section 13). A spooled snapshot numbered beyond the repository's head
  keeps its number: the gap shows that the repository lost snapshots this machine wrote;
- sent, read back, and only then deleted from the spool; the chain head this machine remembers
  follows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bunker import encoding, interrupt
from bunker.backup.link import ChainWriter
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.node.spool import verify_by_name
from bunker.node.vanished import Repaired, VanishedRepair
from bunker.repo.certs import Certificate
from bunker.repo.condemnations import ListedPacks
from bunker.repo.leases import Lease
from bunker.repo.records import ChainBase
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.snapshot import Envelope, ParsedSnapshot, make_snapshot, parse_snapshot
from bunker.runlog import RunLog
from bunker.storage.local import LocalBackend


@dataclass(frozen=True)
class Renumbered:
    """A spooled snapshot linked under another number than it was taken with."""

    old: str
    new: str
    old_seq: int
    new_seq: int


@dataclass
class Delivery:
    """What delivering this client's spooled snapshots did."""

    snapshots: list[str] = field(default_factory=list)  # delivered, in chain order (their names upstream)
    sent_bytes: int = 0
    already: int = 0  # their run was upstream already (sent by another delivery)
    held: list[tuple[str, str]] = field(default_factory=list)  # (snapshot, why) kept in the spool
    repaired: list[Repaired] = field(default_factory=list)
    renumbered: list[Renumbered] = field(default_factory=list)
    log: RunLog = field(default_factory=RunLog)  # the chain's warnings (a rollback) and notes (a wait)


def deliver_own_snapshots(
    repo: Repository,
    put: PutKey,
    cert: Certificate,
    spool: LocalBackend,
    names: list[str],
    packs: ListedPacks,
    lease: Lease,
    state_dir: str,
) -> Delivery:
    """Link the spooled snapshots ``names`` of ``cert`` into its chain in ``repo`` (see the
    module's docstring). A snapshot another delivery took meanwhile is skipped quietly."""
    out = Delivery()
    repair = VanishedRepair(repo, put, cert, packs, lease.refresh_if_due)
    try:
        with ChainWriter(repo, put, cert, state_dir, lease.session, out.log, lease) as chain:
            for name, data, snap in _spooled(spool, names, out):
                upstream = _upstream_copy(repo, snap)
                if upstream is not None:
                    chain.delivered(name, upstream.snap.env.seq, upstream.name)
                    spool.delete(name)
                    out.already += 1
                    continue
                try:
                    env, fix = repair.repair(name, snap.env)
                except (encoding.FormatError, ObjectMissing, CorruptObject) as exc:
                    msg = exc.message if isinstance(exc, BunkerError) else str(exc)
                    out.held.append((name, f"its pack set cannot be read: {msg}"))
                    continue
                # a snapshot is linked whole: its claim, the snapshot, the claim's release (a signal
                # meanwhile would leave the claim behind) and the spool's copy gone
                with interrupt.deferred():
                    sent = _link(put, chain, env, data, snap)
                    lease.refresh_if_due()
                    if not verify_by_name(repo.backend, sent.name, sent.size):
                        raise CorruptObject(
                            sent.name,
                            "the upstream does not return what was just sent to it",
                            "the upstream storage is failing; the snapshot stays in the local spool: check the "
                            "storage, then run `bunker forward` again",
                        )
                    spool.delete(name)
                    out.snapshots.append(sent.name)
                    out.sent_bytes += sent.size
                    if fix is not None:
                        fix.new = sent.name
                        out.repaired.append(fix)
                    if sent.seq != snap.env.seq:
                        out.renumbered.append(Renumbered(name, sent.name, snap.env.seq, sent.seq))
    finally:
        repair.close()
    return out


@dataclass(frozen=True)
class _Sent:
    name: str
    seq: int
    size: int


def _spooled(spool: LocalBackend, names: list[str], out: Delivery) -> list[tuple[str, bytes, ParsedSnapshot]]:
    """The spooled snapshots still there (another delivery may have sent some), in chain order."""
    found = []
    for n in names:
        try:
            data = spool.get(n)
        except ObjectMissing:
            continue
        try:
            found.append((n, data, parse_snapshot(data)))
        except encoding.FormatError as exc:
            out.held.append((n, f"it cannot be read: {exc}"))
    return sorted(found, key=lambda x: x[2].env.seq)


def _upstream_copy(repo: Repository, snap: ParsedSnapshot) -> SnapshotRecord | None:
    """The trusted snapshot upstream that holds the same run of this client (under this name
    or, renumbered, under another), if there is one."""
    e = snap.env
    if not e.session:
        return None
    for r in repo.snapshots():
        theirs = r.snap.env
        if r.trusted and theirs.cert == e.cert and theirs.session == e.session and theirs.counter == e.counter:
            return r
    return None


def _place(env: Envelope, head: ChainBase) -> tuple[int, str]:
    """Where a spooled snapshot goes after the repository's head ``head``: its own place when it
    follows the head exactly, or lies beyond it (the repository lost snapshots: the gap stays
    visible); else right after the head."""
    if env.seq > head.seq + 1 or (env.seq == head.seq + 1 and env.prev == head.prev):
        return env.seq, env.prev
    return head.seq + 1, head.prev


def _link(put: PutKey, chain: ChainWriter, env: Envelope, data: bytes, snap: ParsedSnapshot) -> _Sent:
    """Link one spooled snapshot (``env``: its envelope, repaired); signed again only if its
    envelope changed."""
    made: dict[str, bytes] = {}

    def make(seq: int, prev: str) -> tuple[Envelope, bytes]:
        new = dataclasses.replace(env, seq=seq, prev=prev)
        made["data"] = data if new == snap.env else make_snapshot(new, snap.body_ct, put.client_key)
        return new, made["data"]

    # the repository's head decides, not the one this machine remembers (which may be this
    # very spooled snapshot)
    committed = chain.append(make, choose=lambda head: _place(env, head), remembered=False)
    return _Sent(committed.name, committed.seq, len(made["data"]))
