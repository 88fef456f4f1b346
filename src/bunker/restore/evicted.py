"""Before a restore through a node: ask for every pack of the snapshot the node evicted
(docs/hierarchy.md, "Restore requests").

The pack set is readable without keys, so the node could tell which packs a snapshot needs, but
not which snapshot a client is about to restore: the client reads one byte of each evicted pack
of the set. A node with a direct upstream fetches each at once, and the restore then runs as if
nothing had been evicted; one that must ask over a link records every request in one go, so the
next bundle carries them all and one rerun suffices (a restore that discovered packs as it read
directories would need a round trip per level of the tree).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bunker.errors import BunkerError, DeletedUpstream, ExitCode, ObjectMissing, RequestedUpstream
from bunker.repo import refs
from bunker.repo.repository import Repository, SnapshotRecord


def evicted_packs(repo: Repository, rec: SnapshotRecord) -> dict[str, int]:
    """The packs ``rec`` needs that the node the repository is reached through evicted: name ->
    size (empty when not reached through a node)."""
    held_upstream = getattr(repo.backend, "upstream_sizes", None)
    if held_upstream is None:
        return {}
    evicted: dict[str, int] = held_upstream("packs/")
    if not evicted:
        return {}
    names = (f"packs/{pack}" for pack in refs.read_set(rec.snap.env.packset, repo.backend.get))
    return {n: evicted[n] for n in names if n in evicted}


def request_packs(repo: Repository, rec: SnapshotRecord, names: list[str]) -> list[RequestedUpstream]:
    """Make the node hold ``names``: one byte of each is read, which a node that evicted it
    requests (fetching it at once where it can); returns the requests it could not answer."""
    waiting: list[RequestedUpstream] = []
    for name in names:
        try:
            repo.backend.get(name, 0, 1)
        except RequestedUpstream as exc:
            waiting.append(exc)
        except DeletedUpstream as exc:
            raise BunkerError(
                f"snapshot {rec.short_id} cannot be restored: {exc.message}; nothing was restored",
                exc.hint,
                exit_code=ExitCode.INTEGRITY,
            ) from None
        except ObjectMissing:
            continue  # neither here nor requestable: the restore names what it lacks
    return waiting


def request_evicted_packs(repo: Repository, rec: SnapshotRecord) -> list[RequestedUpstream]:
    """Make the node the repository is reached through hold every pack ``rec`` needs; returns
    the requests it could not answer at once (empty when not reached through a node)."""
    return request_packs(repo, rec, sorted(evicted_packs(repo, rec)))


FIRST_POLL = 5.0  # seconds between asking again while waiting, doubling up to MAX_POLL
MAX_POLL = 300.0


def wait_for_evicted_packs(
    repo: Repository, rec: SnapshotRecord, seconds: float, say: Callable[[str], None], names: list[str] | None = None
) -> list[RequestedUpstream]:
    """``request_evicted_packs`` (or ``request_packs`` of ``names``), asked again with backoff for
    up to ``seconds`` while some wait (``say`` reports each wait); returns those still waiting."""
    deadline = time.monotonic() + seconds
    poll = FIRST_POLL
    while True:
        waiting = request_evicted_packs(repo, rec) if names is None else request_packs(repo, rec, names)
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            return waiting
        nap = min(poll, left)
        say(f"waiting for {len(waiting)} requested pack(s) to arrive at the node; asking again in {nap:.0f} s")
        time.sleep(nap)
        poll = min(poll * 2, MAX_POLL)
