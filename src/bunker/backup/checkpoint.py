"""Checkpoints (docs/format.md section 17, docs/reliability.md): a running backup persists what it finished every ~10 s,
so a killed run costs about that much work and what it stored stays restorable.

A checkpoint flushes the open packs and the index, saves the files-cache records of the
directories in progress, writes the pack set and chunk set of the partial tree (backup/partial.py)
and a lease refresh whose ``checkpoint`` field carries them with the sealed body (root tree, log so
far, where the run was). Checkpoints never enter the client's chain. The client's next run turns
a dead session's last checkpoint into an *incomplete* snapshot: the session is dead when its
lease expired, or at once when this machine's record of it names a process that no longer runs.
A client that never returns: ``bunker prune`` adopts the checkpoint once the session has been
dead for its grace period (backup/adoption.py), into the pruner's own chain.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import blake3

from bunker.backup.chain import clear_running as clear_running
from bunker.backup.chain import killed_sessions
from bunker.backup.chain import mark_running as mark_running
from bunker.backup.link import ChainMoved, ChainWriter, Committed
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, ObjectMissing
from bunker.repo import refs
from bunker.repo.certs import Certificate
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.leases import Lease, Session, sessions, wait_until_listed
from bunker.repo.records import ChainBase
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.snapshot import (
    LEVELS,
    MAX_COUNTER,
    Adoption,
    BodyBinding,
    Envelope,
    is_path_set_id,
    make_snapshot,
    path_set_id,
    seal_body,
)
from bunker.runlog import RunLog

DEFAULT_INTERVAL = 10.0
MAX_LOG_EVENTS = 1000  # events carried in a checkpoint's body (the rest are counted)


class Checkpointer:
    """Writes a checkpoint when one is due; the archiver calls it from its main thread."""

    def __init__(
        self,
        repo: Repository,
        put: PutKey,
        writer: SessionWriter,
        lease: Lease,
        log: RunLog,
        partial: Callable[[], tuple[bytes | None, ChunkIdSet]],
        save_cache: Callable[[], None],
        body_extra: Callable[[], dict[str, Any]],
        where: Callable[[], bytes],
        counts: Callable[[], dict[str, int]],
        interval: float = DEFAULT_INTERVAL,
        tree_stats: Callable[[bytes], dict[str, int]] | None = None,
    ) -> None:
        self.repo, self.put, self.writer, self.lease, self.log = repo, put, writer, lease, log
        self.partial, self.save_cache, self.body_extra, self.where = partial, save_cache, body_extra, where
        self.counts = counts
        self.tree_stats = tree_stats  # the partial tree's entries and entry_bytes (FORMAT.md section 13)
        self.interval = interval
        self.last = time.monotonic()
        self.written = 0
        self._refs: set[str] = set()  # reference objects this session already stored

    def __call__(self) -> None:
        if self.interval <= 0 or time.monotonic() - self.last < self.interval:
            return
        t0 = time.monotonic()
        self.write()
        # a huge backup's checkpoint costs more: never spend more than a fifth of the time on them
        self.last = time.monotonic() + max(0.0, 4 * (time.monotonic() - t0) - self.interval)

    def write(self) -> None:
        root, chunk_ids = self.partial()
        if root is None:
            return
        # Every chunk the partial tree names is stored or being stored by another thread (a chunk
        # another thread reserved, or a full pack it is about to hand to the uploader): flush
        # until all are in uploaded packs, or leave this checkpoint to the next tick.
        locs = self.writer.index.locations
        ids = chunk_ids.sorted_ids()
        deadline = time.monotonic() + 30
        while True:
            self.writer.flush()
            packs, missing = locs.locate_many(ids)
            if not missing:
                # a pack another thread handed over after the flush took its list of uploads may
                # have landed since: its chunks are located but in no index object yet, and a
                # checkpoint adopted after a kill must name only indexed chunks
                self.writer.write_index()
                break
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        self.save_cache()
        packset = refs.build_packset(packs)
        chunkset = refs.build_chunkset(chunk_ids, self.put.secrets)
        for objs in (packset, chunkset):
            for name, data in objs.items():
                if name != "top" and name not in self._refs:
                    self.repo.put_object("refs", data)
                    self._refs.add(name)
        events = self.log.events[:MAX_LOG_EVENTS]
        extra = self.body_extra()
        body = {
            "root": root,
            "log": [e.to_dict() for e in events],
            **extra,
            "stopped_at": self.where(),
            "log_dropped": max(0, len(self.log.events) - len(events)),
        }
        # sealed to the lease object about to carry it (later refreshes carry it on unchanged)
        counter = self.lease.counter
        binding = BodyBinding(
            self.repo.repo_id, self.lease.cert_name, self.put.secrets.domain_id, self.lease.session, counter
        )
        sealed, body_ct = seal_body(body, self.put.data_public, binding)
        self.lease.write(
            {
                "counter": counter,
                "packset": refs.top_name(packset),
                "chunkset": refs.top_name(chunkset),
                "level": self.log.level,
                "stats": {
                    **self.counts(),
                    **(self.tree_stats(root) if self.tree_stats else {}),
                    "chunks": len(chunk_ids),
                    "packs": len(packs),
                },
                "sealed_key": sealed,
                "body": body_ct,
                "time": time.time(),
                # the run's path-set id: the incomplete snapshot made from this checkpoint (by this
                # client's next run or by an adopting prune, which cannot open the body) carries it
                "path_set": path_set_id(self.put.secrets, extra["paths"]),
            }
        )
        self.written += 1


# ---------------------------------------------------------------------- adopting a dead session


def used_sessions(repo: Repository) -> set[str]:
    """Sessions a trusted snapshot already holds (its run's final snapshot, or a checkpoint made
    a snapshot): read from signed envelopes, so no local state is needed to refuse them again."""
    return {r.snap.env.session for r in repo.snapshots() if r.trusted and r.snap.env.session}


def stale_checkpoint(base: ChainBase | None, head: ChainBase) -> str:
    """Why a dead session's checkpoint may not become a snapshot after ``head`` ("" if it may):
    it must come from a format-2 lease that started from ``head`` or a newer head; a run that
    started before a newer snapshot was written holds older data (or is a replay)."""
    if base is None:
        return "it was written before the repository's migration to format 2"
    if base.seq < head.seq:
        return (
            f"its run started from snapshot #{base.seq}, and the chain has moved on to #{head.seq} since: it holds "
            "older data (or is an old lease put back)"
        )
    return ""


def adopt_dead_checkpoints(
    repo: Repository,
    put: PutKey,
    cert: Certificate,
    state_dir: str,
    log: RunLog,
    own_session: str,
    now: float,
    start_head: ChainBase,
    lease: Lease,
) -> tuple[list[Committed], set[str]]:
    """Turn this client's dead sessions' last checkpoints into incomplete snapshots (in the
    order the sessions started), extend the chain, and remove their leases. A checkpoint of a
    session a trusted snapshot already holds, or of a run that started from an older head than
    ``start_head`` (the head this run started from), or than the head when it is linked, is
    refused and its lease removed. ``lease`` is this run's (``own_session``'s). Returns
    what was committed and the killed sessions this run could not find (to be adopted later)."""
    killed = killed_sessions(state_dir)
    out = []
    found: set[str] = set()
    used: set[str] | None = None
    for s in sorted(sessions(repo), key=lambda s: s.started):
        if s.session == own_session or s.cert != cert.name:
            continue
        found.add(s.session)
        if s.alive(now) and s.session not in killed:
            continue
        if s.checkpoint is None:  # died before its first checkpoint: its lease protects nothing now
            _remove_lease(repo, s.names)
            continue
        if used is None:
            used = used_sessions(repo)
        why = "a snapshot already holds that run" if s.session in used else stale_checkpoint(s.base, start_head)
        if why:
            _refused(log, s.names[-1], why)
            _remove_lease(repo, s.names)
            continue
        try:
            # sessions() hands out a checkpoint only from a lease whose signature it verified
            committed = _commit_checkpoint(repo, put, cert, s, state_dir, log, lease)
        except ChainMoved as exc:
            _refused(log, s.names[-1], exc.message)
            _remove_lease(repo, s.names)
            continue
        except (BunkerError, KeyError, TypeError, ValueError) as exc:
            log.add(
                "warn",
                "checkpoint-unusable",
                f"the last checkpoint of an interrupted run ({s.names[-1]}) could not be turned into a snapshot: "
                f"{exc}; its data is deduplicated by this run and `bunker prune` removes the rest",
            )
            committed = None
        if committed is not None:
            out.append(committed)
            used.add(s.session)
            # the lease goes once the snapshot is listed: a prune sees one or the other
            if not wait_until_listed(repo, [committed.name]):
                continue
        _remove_lease(repo, s.names)
    # a killed session whose lease is not listed here is either gone already or in a storage
    # this run cannot see (the repository while offline, or the spool while online): keep it
    # for a later run only while offline
    missing = killed - found if repo.backend.capabilities().partial else set()
    return out, missing


def _remove_lease(repo: Repository, names: Iterable[str]) -> None:
    """Delete a session's lease objects, newest first: it carries the checkpoint, so an
    interrupted removal leaves at most checkpoint-less objects."""
    for n in sorted(names, key=lambda n: int(n.rpartition(".")[2]), reverse=True):
        with contextlib.suppress(BunkerError, OSError):
            repo.backend.delete(n)


def _refused(log: RunLog, lease_name: str, why: str) -> None:
    log.add(
        "note",
        "checkpoint-refused",
        f"the checkpoint in {lease_name} was not turned into a snapshot: {why}. Its lease is removed; its data stays "
        "deduplicated until `bunker prune` finds it unused",
    )


def _commit_checkpoint(
    repo: Repository, put: PutKey, cert: Certificate, s: Session, state_dir: str, log: RunLog, lease: Lease
) -> Committed | None:
    assert s.checkpoint is not None
    cp = s.checkpoint
    committed = checkpoint_snapshot(repo, put, cert, s.session, cp, state_dir, log, lease=lease, base=s.base)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(cp["time"])))
    log.add(
        "note",
        "incomplete-snapshot",
        f"a run of this machine was interrupted (killed or powered off); what it had stored by its last checkpoint "
        f"({when}) is now incomplete snapshot #{committed.seq} {committed.name.split('/', 1)[1][:12]}, which "
        "restores what it covers",
    )
    return committed


def checkpoint_snapshot(
    repo: Repository,
    put: PutKey,
    cert: Certificate,
    session: str,
    cp: dict[str, Any],
    state_dir: str,
    log: RunLog,
    adopted: Adoption | None = None,
    *,
    lease: Lease,
    base: ChainBase | None = None,
) -> Committed:
    """Write the incomplete snapshot of checkpoint ``cp`` of ``session`` as the next link of
    ``cert``'s chain (the chain head kept in ``state_dir``), linked by the run holding
    ``lease``; ``adopted``: the run was another client's (prune). ``base``: the head the dead
    run started from (ChainMoved when the chain has moved past it by the time it is linked)."""
    # the reference objects must still be there (a prune never removes what a lease names)
    for top in (cp["packset"], cp["chunkset"]):
        if repo.backend.stat(top) is None:
            raise ObjectMissing(top)
    body_ct = bytes(cp["body"])
    level = str(cp.get("level", "ok"))
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    counter = cp["counter"]
    if type(counter) is not int or not 1 <= counter <= MAX_COUNTER:
        raise ValueError("the checkpoint names no valid counter")
    path_set = cp.get("path_set", "")  # absent in checkpoints written before path-set ids
    if path_set != "" and not is_path_set_id(path_set):
        raise ValueError("the checkpoint names no valid path-set id")
    stats = {k: int(v) for k, v in dict(cp.get("stats", {})).items()}

    def make(seq: int, prev: str) -> tuple[Envelope, bytes]:
        env = Envelope(
            repo_id=repo.repo_id,
            client=cert.client,
            cert=cert.name,
            seq=seq,
            prev=prev,
            time=float(cp["time"]),
            level=level,
            complete=False,
            stats=stats,
            packset=str(cp["packset"]),
            chunkset=str(cp["chunkset"]),
            domain=put.secrets.domain_id,
            body_hash=blake3.blake3(body_ct).digest(),
            sealed_key=bytes(cp["sealed_key"]),
            adopted=adopted,
            session=session,
            counter=counter,
            path_set=path_set,
        )
        return env, make_snapshot(env, body_ct, put.client_key)

    with ChainWriter(repo, put, cert, state_dir, lease.session, log, lease) as chain:
        return chain.append(make, not_before=base)
