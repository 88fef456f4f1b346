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

from bunker.errors import BunkerError, DeletedUpstream, ExitCode, ObjectMissing, RequestedUpstream
from bunker.repo import refs
from bunker.repo.repository import Repository, SnapshotRecord


def request_evicted_packs(repo: Repository, rec: SnapshotRecord) -> list[RequestedUpstream]:
    """Make the node the repository is reached through hold every pack ``rec`` needs; returns
    the requests it could not answer at once (empty when not reached through a node)."""
    held_upstream = getattr(repo.backend, "upstream_names", None)
    if held_upstream is None:
        return []
    evicted = held_upstream("packs/")
    if not evicted:
        return []
    waiting: list[RequestedUpstream] = []
    for pack in refs.read_set(rec.snap.env.packset, repo.backend.get):
        name = f"packs/{pack}"
        if name not in evicted:
            continue
        try:
            repo.backend.get(name, 0, 1)  # the node requests it, and fetches it at once where it can
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
