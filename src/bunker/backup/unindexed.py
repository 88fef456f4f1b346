"""Packs a stopped run stored but never indexed, and what a full repository costs the next run.

A run writes its index objects only at checkpoints and at its end: packs uploaded since are
named by no index object when the run stops (a full repository, a kill, a crash). Without help
the next run would store that data again, and on a disk that filled up it fills up again, on
every rerun. So a run marks itself as running in the client's state directory (``unindexed.json``)
until it has committed; the next run that finds the mark indexes the unindexed packs signed by
this client (their trailers say what they hold: repo/index_cache.py) before it deduplicates,
and writes an index object for them.

A run stopped by a full repository says how much it stored (kept) and how much room the next run
needs: what it had read but not stored yet, and at most what it had not read yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable

from bunker.backup.archiver import Progress
from bunker.crypto.keyfile import PutKey
from bunker.private_files import write_private_file
from bunker.repo.certs import Certificate
from bunker.repo.index import make_index
from bunker.repo.index_cache import IndexCache
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.runlog import RunLog
from bunker.storage.full import RepositoryFull

MARK = "unindexed.json"
WALK_SECONDS = 10.0  # how long a stopped run may spend sizing what it had not read yet


def mark_unfinished(state_dir: str, session: str) -> None:
    """This run may leave packs no index names until it has committed (best effort: a state
    directory without room costs only the re-upload this mark avoids)."""
    with contextlib.suppress(OSError):
        write_private_file(os.path.join(state_dir, MARK), json.dumps({"session": session}), durable=False)


def clear_unfinished(state_dir: str) -> None:
    """The run committed: its packs are indexed."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(state_dir, MARK))


def unfinished(state_dir: str) -> bool:
    """Whether an earlier run of this client here stopped before it committed."""
    return os.path.exists(os.path.join(state_dir, MARK))


def index_stopped_runs_packs(
    repo: Repository, put: PutKey, cert: Certificate, index: IndexCache, listed: Iterable[str], log: RunLog
) -> int:
    """Index the packs this client stored in a run that stopped before indexing them (they are
    listed, signed by this client's certificate and named by no index object), and write an
    index object for them. Returns how many packs were indexed."""
    before = len(index.unindexed)
    packs = index.add_unindexed_packs(only_writer=cert.name, listed=listed)
    found = index.unindexed[before:]
    entries = [e for _, es in found for e in es]
    if not entries:
        return 0
    name = repo.put_object("index", make_index(entries, put.secrets, put.client_key, cert.name))
    index.record_written(name, entries, cert.name)
    size = sum(loc.length for _, loc in entries)
    log.add(
        "note",
        "packs-reindexed",
        f"{packs} pack(s) ({_mb(size)} of data) that an earlier run of this client stored before it stopped were "
        f"named by no index: indexed now ({name}), so that data is not stored again",
    )
    return packs


def with_figures(err: RepositoryFull, writer: SessionWriter, progress: Progress, paths: list[str]) -> RepositoryFull:
    """``err`` (the repository is full) saying what this run stored and the room the next run
    needs: the data it had read but not stored, and at most the part of the source it had not
    read (less where files are unchanged, deduplicate or compress)."""
    kept = f"{_mb(writer.bytes_stored)} in {len(writer.packs_written)} pack(s)"
    pending = max(0, writer.bytes_added - writer.bytes_stored)
    if not paths:  # standard input or a tar stream: its rest cannot be sized
        return err.with_figures(kept, f"{_mb(pending)} plus the rest of the input")
    total, complete = _source_bytes(paths)
    unread = max(0, total - progress.nbytes)
    if complete and unread == 0:
        return err.with_figures(kept, f"about {_mb(pending)} (what it had read but not stored yet)")
    bound = "at most about" if complete else "more than"
    return err.with_figures(
        kept,
        f"{bound} {_mb(pending + unread)} ({_mb(pending)} it had read but not stored yet, and "
        f"{'up to' if complete else 'at least'} {_mb(unread)} of the source it had not read; less where files are "
        "unchanged or deduplicate)",
    )


def _source_bytes(paths: list[str]) -> tuple[int, bool]:
    """The size of the regular files under ``paths`` (without following symlinks), and whether
    the walk finished within WALK_SECONDS."""
    deadline = time.monotonic() + WALK_SECONDS
    size = 0
    stack = [os.path.abspath(p) for p in paths]
    while stack:
        if time.monotonic() > deadline:
            return size, False
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            size += e.stat(follow_symlinks=False).st_size
        except NotADirectoryError:
            with contextlib.suppress(OSError):
                size += os.lstat(top).st_size
        except OSError:
            pass
    return size, True


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
