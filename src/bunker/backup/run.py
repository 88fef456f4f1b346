"""One backup run end to end with the put key only: lease, index view, archive, commit.

This is the backup code path: it never loads the master key (docs/security.md section 3).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from bunker import dirs, interrupt
from bunker.backup.archiver import Archiver, ArchiveResult, Progress
from bunker.backup.chain import note_running
from bunker.backup.checkpoint import Checkpointer, adopt_dead_checkpoints, clear_running, mark_running
from bunker.backup.client_dirs import client_cache, client_tag
from bunker.backup.commit import Committed, chain_head, commit_snapshot
from bunker.backup.excludes import Excludes
from bunker.backup.files_cache import FilesCache
from bunker.backup.interrupted import Stopper, interval_text, keep_interrupted
from bunker.backup.stream import stream_entry
from bunker.backup.unindexed import (
    clear_unfinished,
    index_stopped_runs_packs,
    mark_unfinished,
    unfinished,
    with_figures,
)
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, ExitCode
from bunker.repo.condemnations import condemned_packs
from bunker.repo.index_cache import IndexCache
from bunker.repo.leases import Lease
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.runlog import RunLog
from bunker.storage.full import RepositoryFull
from bunker.storage.spooling import SpoolingBackend, oldest_pending


@dataclass
class BackupRequest:
    paths: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    exclude_caches: bool = False  # directories with a CACHEDIR.TAG: kept empty
    if_present: list[str] = field(default_factory=list)  # directories holding one of these names: kept empty
    atime: bool = False
    tags: list[str] = field(default_factory=list)
    stdin_name: str | None = None
    stdin: BinaryIO | None = None
    tar: str | None = None  # --tar FILE or "-" (tar_import.py)
    host: str | None = None  # None: the host the put key's certificate binds, else this machine's name
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (level, code, message) found before the run
    checkpoint_seconds: float = 10.0  # persist progress this often (0: never)
    spool_warn_age: float = 3 * 86400.0  # a spooled backup this old (seconds) raises the run to warn
    master_on_client: bool = False
    cache: bool = True


@dataclass
class BackupOutcome:
    committed: Committed
    log: RunLog
    result: ArchiveResult | None  # None: interrupted, ``committed`` is the incomplete snapshot it kept
    interrupted: int | None = None  # the signal that stopped the run
    late_signal: int | None = None  # a signal that came while the snapshot was written (it is complete)


def run_backup(
    repo: Repository,
    put: PutKey,
    req: BackupRequest,
    progress: Progress | None = None,
    tick: Callable[[], None] | None = None,
) -> BackupOutcome:
    """Take one backup; raises BunkerError only when no snapshot could be written (fatal)."""
    if not req.paths and req.stdin_name is None and req.tar is None:
        raise BunkerError(
            "nothing to back up", "name one or more paths, or --stdin-name NAME", exit_code=ExitCode.USAGE
        )
    cert = repo.check_put_key(put)
    if put.host and req.host is not None and req.host != put.host:
        raise BunkerError(
            f"this put key's certificate is bound to host {put.host!r}; a backup with it cannot claim host "
            f"{req.host!r}",
            "leave out --host (the bound host is recorded), or back up with a put key made for that host "
            "(`bunker key new-client NAME --host HOST`)",
            exit_code=ExitCode.USAGE,
        )
    host = req.host or put.host or os.uname().nodename  # (what gethostname() returns)
    log = RunLog()
    for level, code, message in req.events:
        log.add(level, code, message)
    if not getattr(repo.backend, "server_node", ""):  # a node's copies come with its seed
        repo.write_documents()
    if req.master_on_client:
        log.add(
            "note",
            "master-key-on-client",
            f"the master key is still on this machine ({dirs.master_key_path(repo.repo_id)}): move it off with "
            "`bunker key export --master FILE --remove`",
        )
    tag = client_tag(put)
    cache_dir = client_cache(repo, put) if req.cache else None
    state_dir = dirs.state_dir(repo.repo_id, tag)
    start_head, _ = chain_head(repo, cert, state_dir)  # a rollback is reported when the snapshot is linked
    lease = Lease(repo, put.client_key, cert.client, cert.name, "backup", start_head)
    # the killed sessions this run could not find: this machine's list of them is replaced only
    # once the run has looked (a run that fails before leaves the list as it was, or the claims
    # and leases of the sessions on it would pass for another machine's live runs)
    unseen: set[str] | None = None
    committed_names: list[str] = []  # the lease goes once these are listed
    keep_lease = False
    # a path backup stops in order on SIGINT/SIGTERM (backup/interrupted.py); standard input and
    # tar streams keep no checkpoints and stop at once
    stoppable = req.tar is None and req.stdin_name is None
    try:
        # this machine knows the session runs before its lease exists: a power cut right after
        # the lease is written leaves a session the next run here finds dead, not a stranger's
        # lease it must wait out
        _state(log, lambda: note_running(state_dir, lease.session))
        lease.write()  # in the try: a signal right after it still releases the lease
        with interrupt.deferred():  # a snapshot is written whole
            # a run of this machine that was killed: its last checkpoint becomes an incomplete snapshot
            _, not_found = adopt_dead_checkpoints(
                repo, put, cert, state_dir, log, lease.session, lease.storage_time(), start_head, lease
            )
        unseen = not_found
        _state(log, lambda: mark_running(state_dir, lease.session, not_found))
        # after the lease: a pack condemned from now on waits for this session (docs/format.md section 15)
        # a session deduplicates only against packs it can see listed (a spool lists only its own)
        listed = None if repo.backend.capabilities().partial else [i.name[6:] for i in repo.backend.list("packs/")]
        index = IndexCache(repo, put.secrets, cache_dir, absent_packs=condemned_packs(repo), listed_packs=listed).load()
        for problem in index.problems[:20]:
            log.add("warn", "index-damaged", f"index object skipped ({problem}); run `bunker check`")
        if index.cache_problem:
            log.add("warn", "cache-unwritable", index.cache_problem)
        if listed is not None and unfinished(state_dir):
            # an earlier run stopped (a full disk, a kill) with packs no index names: use them
            index_stopped_runs_packs(repo, put, cert, index, listed, log)
        mark_unfinished(state_dir, lease.session)
        writer = SessionWriter(repo, put, cert.name, index)
        fcache = FilesCache(os.path.join(cache_dir, "files.sqlite") if cache_dir else None)
        files_cache_warned = _files_cache_event(log, fcache, False)
        started = time.time()

        def body_extra() -> dict[str, Any]:
            return _body_extra(req, host, started)

        skip = [dirs.cache_dir(), os.path.join(dirs.data_dir(), "spool")]
        if "://" not in repo.backend.url:
            skip.append(repo.backend.url)
        archiver = Archiver(
            writer,
            fcache,
            log,
            excludes=Excludes(req.excludes, skip, exclude_caches=req.exclude_caches, if_present=req.if_present),
            one_file_system=req.one_file_system,
            atime=req.atime,
            progress=progress,
            tick=lambda: _tick(lease, tick),
        )
        checkpointer = None
        if stoppable and req.checkpoint_seconds > 0:
            checkpointer = archiver.checkpoint = Checkpointer(
                repo,
                put,
                writer,
                lease,
                log,
                archiver.partial_root,
                archiver.save_partial_cache,
                body_extra,
                lambda: archiver.progress.current,
                lambda: {"files": archiver.progress.files, "bytes": archiver.progress.nbytes},
                req.checkpoint_seconds,
                tree_stats=archiver.chunks.partial_stats,
            )
        if stoppable:
            archiver.stop = Stopper(archiver, checkpointer, writer, log)
        result: ArchiveResult | None = None
        committed: Committed | None = None
        interrupted: int | None = None
        try:
            with interrupt.deferred() if stoppable else contextlib.nullcontext():
                try:
                    try:
                        result = _archive(archiver, req)
                    except interrupt.Interrupted as exc:
                        if exc.forced or not stoppable:
                            raise
                        interrupted = exc.signum  # the Stopper wrote the last checkpoint
                    # a snapshot is written whole, whatever the input: a signal meanwhile is acted on after it
                    with interrupt.deferred():
                        if result is not None:
                            # packs and index first: whether they went to the spool belongs in the snapshot's log
                            writer.flush()
                            spooled = _spool_event(repo, req, log)
                            files_cache_warned = _files_cache_event(log, fcache, files_cache_warned)
                            committed = commit_snapshot(
                                repo,
                                put,
                                cert,
                                writer,
                                root=result.root,
                                chunk_ids=result.chunk_ids,
                                stats=result.stats,
                                log=log,
                                body_extra=body_extra(),
                                state_dir=state_dir,
                                session=lease.session,
                                master_on_client=req.master_on_client,
                                lease=lease,
                                cache_dir=cache_dir,
                            )
                            if not spooled:  # the repository stopped answering while the snapshot was written
                                _spool_event(repo, req, log)
                        else:
                            assert interrupted is not None
                            # the last checkpoint becomes this run's incomplete snapshot
                            committed = keep_interrupted(repo, put, cert, lease, state_dir, log)
                            if committed is None:
                                raise _nothing_kept(interrupted, checkpointer is not None)
                        committed_names.append(committed.name)
                        if not (isinstance(repo.backend, SpoolingBackend) and repo.backend.offline):
                            # its packs are indexed (offline: in the spool, delivered later)
                            clear_unfinished(state_dir)
                        if committed.head_problem:
                            log.add("warn", "state-unwritable", committed.head_problem)
                        fcache.flush()
                        _files_cache_event(log, fcache, files_cache_warned)
                        # a signal after the last tick came while the snapshot was written: it is complete
                        late = interrupt.take()
                except RepositoryFull as exc:
                    raise with_figures(exc, writer, archiver.progress, req.paths) from None
        finally:
            writer.close()
            fcache.close()
    except interrupt.Interrupted as exc:
        if exc.message:
            raise
        if exc.forced and lease.checkpoint is not None and not committed_names:
            keep_lease = True  # its last checkpoint: the next run makes it an incomplete snapshot
            unseen = {*(unseen or ()), lease.session}
        raise _stopped(exc, req, lease, keep_lease) from None
    finally:
        released = keep_lease
        try:
            if not keep_lease:
                with interrupt.deferred(absorb=True):  # the run is over either way
                    lease.release(committed_names)
                released = True
        finally:
            # a lease the storage failed to release: its session is known dead here (clear_running)
            failed = () if released else (lease.session,)
            _state(log, lambda: clear_running(state_dir, unseen, failed=failed))
    assert committed is not None
    return BackupOutcome(committed, log, result, interrupted, None if interrupted else late)


def _nothing_kept(signum: int, checkpoints: bool) -> interrupt.Interrupted:
    """The interrupt of a path backup that had no checkpoint to keep."""
    why = "it had finished nothing yet" if checkpoints else "checkpoints are off (--checkpoint-interval 0)"
    return interrupt.Interrupted(
        signum,
        message=f"no snapshot was written: {why}. What it stored is indexed: the next backup reads the files again "
        "but stores only what is new",
        hint="run the same backup again",
    )


def _stopped(exc: interrupt.Interrupted, req: BackupRequest, lease: Lease, kept: bool) -> interrupt.Interrupted:
    """What a run stopped outside the orderly path means (while starting, standard input or a
    tar stream, or a second signal)."""
    every = interval_text(req.checkpoint_seconds)
    if kept:
        assert lease.checkpoint is not None
        when = time.strftime("%H:%M:%S", time.localtime(float(lease.checkpoint["time"])))
        message = (
            f"stopped again before its last state was written: its lease keeps the checkpoint of {when} "
            f"(checkpoints every {every}), no snapshot now"
        )
        hint = "run the same backup again: it first turns that checkpoint into an incomplete snapshot"
    elif exc.forced:
        message = "stopped again before its last state was written: no snapshot was written"
        hint = "run the same backup again"
    elif req.stdin_name is not None or req.tar is not None:
        what = "standard input" if req.stdin_name is not None else "a tar archive"
        message = f"no snapshot was written: a backup of {what} keeps no checkpoints (its input can only be read once)"
        hint = "run it again with the whole input"
    else:
        message = "the backup stopped while starting, before it stored anything; no snapshot was written"
        hint = "run the same backup again"
    return interrupt.Interrupted(exc.signum, forced=exc.forced, message=message, hint=hint)


def _state(log: RunLog, write: Callable[[], None]) -> None:
    """Write this machine's state about the run (which session runs, which were killed). Without
    room it costs only the quick adoption of a killed run's checkpoint (prune adopts it later)."""
    try:
        write()
    except OSError as exc:
        if any(e.code == "state-unwritable" for e in log.events):
            return
        log.add(
            "warn",
            "state-unwritable",
            f"this machine's state directory ({dirs.data_dir()}) cannot be written ({exc.strerror or exc}): if this "
            "run is killed, its checkpoint becomes a snapshot only when `bunker prune` adopts it; free space on "
            "that disk",
        )


def _files_cache_event(log: RunLog, fcache: FilesCache, warned: bool) -> bool:
    """Log once that the files cache cannot be written (the run is slower, the next one too)."""
    if fcache.problem and not warned:
        log.add("warn", "cache-unwritable", fcache.problem)
        return True
    return warned


def _archive(archiver: Archiver, req: BackupRequest) -> ArchiveResult:
    """Read and store the source: a tar stream, standard input or paths."""
    if req.tar is not None:
        from bunker.tar.reader import tar_entries  # (only a --tar backup needs the tar machinery)

        return tar_entries(archiver, req.tar, req.stdin)
    if req.stdin_name is not None:
        return stream_entry(archiver, req.stdin_name, req.stdin or sys.stdin.buffer)
    return archiver.run(req.paths)


def _body_extra(req: BackupRequest, host: str, started: float) -> dict[str, Any]:
    """The sealed body's fields besides root and log."""
    if req.tar:
        paths = ["tar:" + (req.tar if req.tar == "-" else os.path.abspath(req.tar))]
    elif req.stdin_name is not None:
        paths = [req.stdin_name]
    else:
        paths = [os.path.abspath(p) for p in req.paths]
    return {
        "host": host,
        "user": _user(),
        "paths": paths,
        "tags": sorted(set(req.tags)),
        "started": started,
        "finished": time.time(),
        "argv": list(sys.argv[1:])[:64],
    }


def _spool_event(repo: Repository, req: BackupRequest, log: RunLog) -> bool:
    """Log that the run went to the local spool: err when the repository refused (it will not
    come back by itself: storage/refused.py), warn when it is a node without room for now, else
    note (warn once spooled data is older than ``req.spool_warn_age``). Returns True if it did."""
    b = repo.backend
    if not (isinstance(b, SpoolingBackend) and b.offline):
        return False
    kept = f"this backup is stored locally in {b.spool.root}"
    if b.refused is not None:
        log.add(
            "err",
            "repository-refused",
            f"the repository at {b.url} refuses writes ({b.refused.message}): {kept}, and the next backup or "
            f"`bunker forward` delivers it once the repository takes writes again. Next step: {b.refused.fix}, "
            "then run `bunker forward`",
        )
        return True
    if b.full is not None:
        log.add(
            "warn",
            "node-full",
            f"the node at {b.url} cannot take this backup now ({b.full.message}): {kept}, and the next backup "
            "or `bunker forward` delivers it once the node has room; a node frees room when its upstream "
            "records what it holds. Next step: on the node, `bunker node status` shows what waits for which "
            "upstream; make that upstream reachable (or carry the link's disk), or raise the node's --max-size "
            "or this client's quota",
        )
        return True
    oldest = oldest_pending(b.spool)
    age = time.time() - oldest if oldest is not None else 0.0
    where = f"the repository at {b.url} cannot be reached ({b.reason}): "
    what = f"{kept} and will be forwarded by the next backup or by `bunker forward`"
    if age >= req.spool_warn_age:
        log.add(
            "warn",
            "spool-old",
            where + what + f"; backups have waited there for {age / 86400:.1f} days: make the repository "
            "reachable (network, credentials, mounted disk) and run `bunker forward`",
        )
    else:
        log.add("note", "spooled", where + what)
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _tick(lease: Lease, tick: Callable[[], None] | None) -> None:
    lease.refresh_if_due()
    if tick is not None:
        tick()
