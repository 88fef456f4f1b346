"""Linking snapshots into a client's chain: every sequence number is taken once.

``ChainWriter`` holds the client's chain lock on this machine (backup/chain.py: a second run of
the same client waits for the first to finish linking), reads the head (the repository's newest
trusted snapshot of the certificate, or the head this machine remembers when the repository is
behind it or only the spool can be reached), claims the next number in the repository
(repo/claims.py: runs on other machines, or with another state directory, see the claim), reads
the head again, and only then signs and stores the snapshot and remembers it as the head. A run
that finds the number claimed by a live run waits until that run has linked its snapshot, then
takes the next number.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from bunker.backup.chain import ChainHead, chain_lock, load_head, read_running, save_head
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.repo.certs import Certificate
from bunker.repo.claims import Claims, Holder
from bunker.repo.leases import Lease, sessions, wait_until_listed
from bunker.repo.objects import name_for
from bunker.repo.other_secret import certificate_domains, snapshot_with_other_secret
from bunker.repo.records import ChainBase
from bunker.repo.repository import Repository
from bunker.repo.snapshot import Envelope
from bunker.runlog import RunLog

if TYPE_CHECKING:
    from bunker.backup.node_head import NodeHead

CHAIN_HEAD_FROM_NODE = "chain-head-from-node"  # a note, not a warning: the chain goes on unbroken
MAX_WAIT = 3600.0  # for a live run holding the number (it links within seconds; its lease ends in 15 min)

# (seq, prev) of the next snapshot, given the chain's head
Choose = Callable[[ChainBase], tuple[int, str]]


@dataclass(frozen=True)
class Committed:
    name: str
    seq: int
    level: str
    stats: dict[str, int]
    head_problem: str = ""  # why this machine could not remember the new chain head, if it could not


class ChainMoved(BunkerError):
    """The chain moved past the head a run started from: its checkpoint holds older data."""


def chain_head(repo: Repository, cert: Certificate, state_dir: str) -> tuple[ChainBase, tuple[str, str] | None]:
    """The head of this client's chain (what its next snapshot extends), and a warning (code,
    message) when the repository is behind the head the client remembers: snapshots were deleted
    or the repository was rolled back (the chain keeps pointing at the remembered head), or the
    remembered head was written with a damaged put key. A head the repository knows and this
    machine does not (its state directory was deleted or restored from an old copy) is
    remembered from now on, where the disk takes it. Behind a node, a newer head the node saw at
    the repository of record (backup/node_head.py) is taken, with a note saying so."""
    with chain_lock(state_dir):
        mine = load_head(state_dir)
        if mine is not None and repo.backend.capabilities().partial:
            # the repository is unreachable and its spool holds only this client's offline
            # snapshots: the remembered head is the chain's head
            return ChainBase(mine.seq, mine.name), None
        repo_head = repo.client_head(cert.name)
        rseq = repo_head.snap.env.seq if repo_head else 0
        # behind a node, the listing holds only the node's copies: the node may know of a newer
        # snapshot at the repository of record (a client that lost its state, or moved here)
        seen = None
        if _node_name(repo):
            from bunker.backup.node_head import node_head  # (witness statements: only behind a node)

            seen = node_head(repo, cert)
        if seen is not None:
            heads = [(mine.seq, mine.name)] if mine is not None else []
            heads += [(rseq, repo_head.name)] if repo_head is not None else []
            local = max(heads, key=lambda h: h[0], default=(0, ""))
            # the head this client would take otherwise is the top's, or older: the top's then; or
            # it links (on the node) to another snapshot at the top's place: a fork the node keeps
            # back, and what builds on it would never reach the top either
            fork = "" if local[0] < seen.seq else _forked_from(repo, local, seen)
            # (remembered already: an earlier call of this run took it from the node)
            if local[0] < seen.seq or fork or (local == (seen.seq, seen.name) and rseq < seen.seq):
                with contextlib.suppress(OSError):  # a full disk here: the next run asks the node again
                    save_head(state_dir, ChainHead(seen.seq, seen.name, cert.name))
                return ChainBase(seen.seq, seen.name), _from_node(seen, cert, rseq, fork)
        if mine is not None and mine.seq > rseq and _with_other_secret(repo, mine.name):
            return ChainBase(mine.seq, mine.name), (
                "damaged-key-snapshot",
                f"this client's last snapshot #{mine.seq} ({mine.name}) was written with another secret: its put key "
                "was damaged then (an older bunker did not check), so nobody can restore it; this run stores again "
                "what it held, and `bunker prune` with a prune-capable key retires it",
            )
        node = _node_name(repo)
        if mine is not None and mine.seq > rseq and node:
            # a client that moved from another node: that node still holds its newest snapshots
            return ChainBase(mine.seq, mine.name), (
                "chain-rollback",
                f"node {node!r} holds this client's snapshots up to #{rseq}, but this client wrote #{mine.seq} "
                f"({mine.name}). If this client backed up through another node before, that is expected: that "
                "node delivers them to the repository of record, and `bunker check` there names them as in transit "
                "(docs/hierarchy.md). Otherwise snapshots were deleted or the node was rolled back: run `bunker "
                "check` at the repository of record. The new snapshot continues the remembered chain",
            )
        if mine is not None and mine.seq > rseq:
            return ChainBase(mine.seq, mine.name), (
                "chain-rollback",
                f"the repository's newest snapshot of this client is #{rseq}, but this client wrote #{mine.seq} "
                f"({mine.name}): snapshots were deleted or the repository was rolled back. Run `bunker check` and "
                "compare with a mirror; the new snapshot continues the remembered chain",
            )
        if repo_head is None:
            return ChainBase(0, ""), None
        if mine is None or mine.seq < rseq:
            # a full or read-only disk here: the repository still knows the head, and the run warns
            with contextlib.suppress(OSError):
                save_head(state_dir, ChainHead(rseq, repo_head.name, cert.name))
        return ChainBase(rseq, repo_head.name), None


MAX_FORK_WALK = 1000  # snapshots a head may be ahead of the top's on a node (undelivered)


def _forked_from(repo: Repository, local: tuple[int, str], seen: NodeHead) -> str:
    """The snapshot at ``seen``'s place in the chain that ends at ``local`` (seq, name), walked
    back through the snapshots the node holds, when it is not ``seen``'s: a fork. "" when the
    chain passes through ``seen``, or a link is not on the node (in transit: nothing known)."""
    seq, name = local
    for _ in range(MAX_FORK_WALK):
        if seq <= seen.seq:
            return name if seq == seen.seq and name != seen.name else ""
        try:
            snap = repo.parsed_snapshot(name)
        except ObjectMissing:
            return ""
        if snap is None or snap.env.seq != seq:
            return ""
        seq, name = seq - 1, snap.env.prev
    return ""


def _from_node(seen: NodeHead, cert: Certificate, rseq: int, fork: str) -> tuple[str, str]:
    """The event for a chain head taken from the node's witness statement (``fork``: the
    snapshot at that place in the chain this client would have continued, which the repository
    of record holds otherwise)."""
    how = f"it saw the repository of record hold snapshot #{seen.seq} ({seen.how})"
    if fork:
        return (
            "chain-fork-avoided",
            f"the chain this client would continue holds {fork} as client {cert.client!r}'s snapshot #{seen.seq}, but "
            f"node {seen.node!r} says {how}: that snapshot and those after it are a fork, which the node keeps "
            "back and never sends (a run of this client numbered them without knowing the newest snapshot). The "
            "new snapshot continues the chain from the repository of record's, and takes along what the fork held",
        )
    return (
        CHAIN_HEAD_FROM_NODE,
        f"node {seen.node!r} holds none of client {cert.client!r}'s snapshots after #{rseq} (the client moved here, or "
        f"this machine lost its state directory), but {how}: the new snapshot continues the chain from there, and "
        "what the node does not hold is stored again",
    )


def _node_name(repo: Repository) -> str:
    """The name of the node serving ``repo`` ("" when no node does), also behind the wrapper that
    spools writes while it cannot be reached (node/spool.py)."""
    for backend in (repo.backend, getattr(repo.backend, "upstream", None)):
        node = getattr(backend, "server_node", "")
        if isinstance(node, str) and node:
            return node
    return ""


def _with_other_secret(repo: Repository, name: str) -> bool:
    """Whether the snapshot ``name`` is listed and was written with a damaged put key."""
    try:
        snap = repo.parsed_snapshot(name)
    except ObjectMissing:
        return False
    return snap is not None and snapshot_with_other_secret(repo, snap, certificate_domains(repo))


def next_number(head: ChainBase) -> tuple[int, str]:
    """A new snapshot follows the head."""
    return head.seq + 1, head.prev


class ChainWriter:
    """Links snapshots into ``cert``'s chain for session ``session`` (the claimant; ``lease``,
    when given, is its lease: it is kept alive while waiting and gives the storage's time).
    Use it as a context manager: the chain lock is held inside."""

    def __init__(
        self,
        repo: Repository,
        put: PutKey,
        cert: Certificate,
        state_dir: str,
        session: str,
        log: RunLog,
        lease: Lease | None = None,
    ) -> None:
        self.repo, self.put, self.cert, self.state_dir, self.log, self.lease = repo, put, cert, state_dir, log, lease
        self.claims = Claims(repo, put.client_key, cert, session)
        self._warned = False
        self._waited: set[str] = set()

    def __enter__(self) -> ChainWriter:
        self._lock = chain_lock(self.state_dir)
        self._lock.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.__exit__(kind, exc, tb)

    def head(self) -> ChainBase:
        """The head the next snapshot extends (a rollback is reported in the log, once)."""
        head, warning = chain_head(self.repo, self.cert, self.state_dir)
        if warning and not self._warned:
            self._warned = True
            self.log.add("note" if warning[0] == CHAIN_HEAD_FROM_NODE else "warn", *warning)
        return head

    def repo_head(self) -> ChainBase:
        """The newest trusted snapshot of this chain in the repository (what this machine
        remembers left aside)."""
        rec = self.repo.client_head(self.cert.name)
        return ChainBase(rec.snap.env.seq, rec.name) if rec is not None else ChainBase(0, "")

    def delivered(self, spooled: str, seq: int, name: str) -> None:
        """The spooled snapshot ``spooled`` is in the repository as #``seq`` ``name`` (linked by
        another delivery, or by one killed after it stored the snapshot and before it remembered
        it): remember that as the head where this machine's memory still names the spooled copy
        or an older snapshot. Without this, the spooled copy's name stays the remembered head
        after the copy is gone, and `bunker check` reports the chain as rolled back."""
        mine = load_head(self.state_dir)
        if mine is None or mine.name == spooled or mine.seq < seq:
            with contextlib.suppress(OSError):  # a full disk here: the next run learns it from the repository
                save_head(self.state_dir, ChainHead(seq, name, self.cert.name))

    def append(
        self,
        make: Callable[[int, str], tuple[Envelope, bytes]],
        choose: Choose = next_number,
        not_before: ChainBase | None = None,
        remembered: bool = True,
    ) -> Committed:
        """Link one snapshot: ``make(seq, prev)`` returns its envelope and signed bytes;
        ``choose`` picks (seq, prev) from the head (``remembered``: the head this machine
        remembers when the repository is behind it, else the repository's alone).
        ``not_before``: the head the snapshot's run started from, for a checkpoint (ChainMoved
        when the chain has moved past it)."""
        current = self.head if remembered else self.repo_head
        deadline = time.monotonic() + MAX_WAIT
        wait = 0.05
        while True:
            head = current()
            if not_before is not None and head.seq > not_before.seq:
                raise ChainMoved(
                    f"its run started from snapshot #{not_before.seq}, and the chain has moved on to #{head.seq} "
                    "since: it holds older data",
                    "nothing to do: its data stays deduplicated until `bunker prune` finds it unused",
                )
            seq, prev = choose(head)
            claimed = self._claim(seq, prev)
            if isinstance(claimed, Holder):
                if time.monotonic() > deadline:
                    raise BunkerError(
                        f"snapshot #{seq} of client {self.cert.client!r} has been claimed by another run (session "
                        f"{claimed.session}, {claimed.name}) for over {MAX_WAIT / 60:.0f} minutes",
                        "that run is stuck: stop it, then run the command again (its claim ends with it)",
                        exit_code=ExitCode.FATAL,
                    )
                self._note_wait(seq, claimed)
                if self.lease is not None:
                    self.lease.refresh_if_due()
                time.sleep(wait)
                wait = min(wait * 2, 2.0)
                continue
            if claimed and choose(current()) != (seq, prev):
                self.claims.release(seq, claimed)  # the chain moved while we claimed: the next number
                continue
            env, data = make(seq, prev)
            name = name_for("snapshots", data)
            self.repo.backend.put(name, data)
            head_problem = ""
            try:
                spool = self.repo.backend.capabilities().partial and env.session
                spooled = (env.session, env.counter) if spool else None
                save_head(self.state_dir, ChainHead(env.seq, name, env.cert, spooled))
            except OSError as exc:
                # the snapshot is stored: only this machine's witness of it is missing (a full disk)
                head_problem = (
                    f"this machine could not remember snapshot #{env.seq} as its chain head in {self.state_dir} "
                    f"({exc.strerror or exc}): the snapshot is stored, but deleting it from the repository would go "
                    "unnoticed here until the next run; free space on that disk"
                )
            if claimed and wait_until_listed(self.repo, [name]):
                self.claims.release(seq, claimed)  # else it stays and expires: its holder's run ended
            return Committed(name, env.seq, env.level, env.stats, head_problem)

    def _claim(self, seq: int, prev: str) -> str | Holder:
        """The claim of #``seq`` ("" when only the spool is reachable: this machine's lock is
        the whole claim there), or the live run holding it."""
        if self.repo.backend.capabilities().partial:
            return ""
        return self.claims.take(seq, prev, self._dead)

    def _dead(self, holder: Holder) -> bool:
        """Whether the run holding a claim has ended: this machine knows its process, or its
        lease says (gone or expired, by the storage's time)."""
        if not holder.session:
            return True
        here = read_running(self.state_dir).state_of(holder.session)
        if here is not None:
            return not here
        now = self.lease.storage_time() if self.lease is not None else time.time()
        for s in sessions(self.repo):
            if s.session == holder.session:
                return not s.alive(now)
        return True

    def _note_wait(self, seq: int, holder: Holder) -> None:
        if holder.name in self._waited:
            return
        self._waited.add(holder.name)
        self.log.add(
            "note",
            "chain-wait",
            f"another run of this client (session {holder.session}) is linking snapshot #{seq}: this run waited for "
            "it and took the next number",
        )
