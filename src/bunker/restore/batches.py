"""A restore larger than the store of the node it reads through, in batches (docs/hierarchy.md,
"Restore leases and batches").

The node says how much it can fetch back while it keeps its bound (its *room*, with the lease).
When the packs the snapshot needs and the node evicted add up to more, the restore runs in
rounds instead of asking for them all:

1. everything whose data the node holds now is restored (directories, links, special files and
   such files); a file with data in an evicted pack is left for later, with its packs;
2. the files left are taken in order while their evicted packs fit the room: that batch of
   packs is requested (and waited for, with ``--wait``), those files are restored, and the batch
   is released, so the node evicts it again and has room for the next one;
3. directory metadata and inode flags are applied once the last batch is written.

Each batch's files are written down in this machine's data directory once restored: a restore
stopped between batches (a batch that must come over a link, kill -9) continues where it
stopped when run again, and does not ask the node for what it already restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import fields

from bunker import dirs
from bunker.errors import BunkerError, ExitCode
from bunker.private_files import write_private_file
from bunker.repo import refs
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.restore.evicted import evicted_packs, wait_for_evicted_packs
from bunker.restore.lease import RestoreLease
from bunker.restore.restorer import Restorer, RestoreStats
from bunker.runlog import display_path


class BatchJournal:
    """The files earlier runs of one batched restore (repository, snapshot, target) wrote."""

    def __init__(self, repo_id: str, snapshot: str, target: bytes) -> None:
        key = hashlib.sha256(snapshot.encode() + b"\0" + target).hexdigest()[:32]
        self.path = os.path.join(dirs.data_dir(), "state", repo_id[:32], "restores", f"{key}.json")
        self.done: set[bytes] = set()
        try:
            with open(self.path, encoding="utf-8") as f:
                self.done = {os.fsencode(p) for p in json.load(f)["done"]}
        except (OSError, ValueError, KeyError, TypeError):
            self.done = set()  # none, or unreadable: everything is restored again

    def add(self, paths: list[bytes]) -> None:
        self.done.update(paths)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        write_private_file(self.path, json.dumps({"done": sorted(os.fsdecode(p) for p in self.done)}))

    def finished(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def plan_batch(
    left: list[tuple[bytes, set[str]]], evicted: dict[str, int], room: int
) -> tuple[set[str], list[bytes], list[tuple[bytes, set[str]]]]:
    """The next batch: (its packs, the files it restores, the files left), taking files in order
    while the evicted packs they add fit ``room`` (a file whose packs are all held comes along)."""
    batch: set[str] = set()
    size = 0
    chosen: list[bytes] = []
    rest: list[tuple[bytes, set[str]]] = []
    for rel, packs in left:
        add = {p for p in packs if f"packs/{p}" in evicted and p not in batch}
        extra = sum(evicted[f"packs/{p}"] for p in add)
        if size + extra <= room:
            batch |= add
            size += extra
            chosen.append(rel)
        else:
            rest.append((rel, packs))
    return batch, chosen, rest


def _add(total: RestoreStats, more: RestoreStats) -> None:
    for f in fields(RestoreStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(more, f.name))


def restore_in_batches(
    repo: Repository,
    rec: SnapshotRecord,
    make_restorer: Callable[[], Restorer],
    root: bytes,
    paths: list[str],
    lease: RestoreLease,
    wait_seconds: float,
    say: Callable[[str], None],
) -> RestoreStats:
    """Restore ``paths`` of ``rec`` (all of it without) in batches that fit the node's room."""
    evicted = evicted_packs(repo, rec)
    first = make_restorer()
    journal = BatchJournal(repo.repo_id, rec.name, first.target)
    first.unavailable = {n.split("/", 1)[1] for n in evicted}
    first.done_before = journal.done
    first.hold_final = True
    stats = first.restore(root, paths)
    left, finished, number = first.deferred, [first], 0
    # what is restored needs nothing more: the lease lets go of every pack no file left names
    needed = {f"packs/{p}" for _, packs in left for p in packs}
    lease.renew(released={f"packs/{p}" for p in refs.read_set(rec.snap.env.packset, repo.backend.get)} - needed)
    while left:
        number += 1
        room = lease.renew() or 0
        evicted = evicted_packs(repo, rec)
        batch, chosen, left = plan_batch(left, evicted, room)
        if not chosen:
            # one file alone needs more than the room: its batch takes the store over its bound
            # until it is restored and released (the node's clients spool new backups meanwhile)
            (rel, packs), left = left[0], left[1:]
            batch = {p for p in packs if f"packs/{p}" in evicted}
            chosen = [rel]
            need = sum(evicted[f"packs/{p}"] for p in batch)
            say(
                f"warn: {display_path(b'/' + rel)} needs {need} bytes of data the node evicted, more than the {room} "
                "bytes it can fetch back while it keeps its bound: its store goes over the bound until this file is "
                "restored"
            )
        names = sorted(f"packs/{p}" for p in batch)
        say(f"batch {number}: {len(chosen)} file(s), {len(names)} pack(s) requested from the node's upstream")
        waiting = wait_for_evicted_packs(repo, rec, wait_seconds, say, names=names)
        if waiting:
            raise BunkerError(
                f"batch {number} of the restore of snapshot {rec.short_id} (the node's store cannot hold all it "
                f"needs at once): {len(waiting)} pack(s) were requested ({waiting[0].message}); {stats.files} "
                f"file(s) restored so far, {len(chosen) + len(left)} left",
                "run this restore again once they have arrived: it continues with this batch, and does not ask for "
                "what it restored already (`bunker node requests DIR` on the node lists the requests)",
                exit_code=ExitCode.REQUESTED,
            )
        r = make_restorer()
        r.unavailable = {n.split("/", 1)[1] for n in evicted} - batch
        r.hold_final = True
        _add(stats, r.restore(root, [os.fsdecode(p) for p in chosen]))
        again = {rel for rel, _ in r.deferred}  # evicted again meanwhile (another restore's room)
        journal.add([p for p in chosen if p not in again])
        left = r.deferred + left
        lease.renew(released=names)
        finished.append(r)
    for r in reversed(finished):
        r.finish_tree()
    journal.finished()
    return stats
