"""init and backup."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from bunker import dirs
from bunker.backup.archiver import Progress
from bunker.backup.chain import witnesses
from bunker.backup.commit import Committed
from bunker.backup.excludes import read_exclude_file
from bunker.backup.policy_applied import apply_policy
from bunker.backup.run import BackupRequest, run_backup
from bunker.backup.status import leave_status
from bunker.cli import context
from bunker.cli.client_names import check_client_name, check_host_name
from bunker.cli.main import EXIT_FOR_LEVEL, cli, common, default_client_name, handles_errors, make_options
from bunker.cli.output import human_bytes
from bunker.cli.progress import PROGRESS_MODES, ProgressDisplay
from bunker.crypto.keyfile import DEFAULT_KDF_MEMORY_MIB, KDF_MEMORY_MIB, PutKey
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing, StorageError
from bunker.interrupt import ignore as ignore_signals
from bunker.interrupt import signal_name
from bunker.node.record_age import unrecorded_events
from bunker.node.spool import Spool, offline_repository, parse_age, spooling_repository
from bunker.repo.repository import Repository
from bunker.runlog import LEVELS
from bunker.storage import open_backend
from bunker.storage.full import RepositoryFull
from bunker.storage.spooling import SpoolingBackend


@cli.command()
@common
@click.option(
    "--client", "client_name", help="Name of this machine's client (public; default: a random pseudonym)."
)
@click.option("--host", help="Host this machine's client is bound to (sealed; default: this machine's name).")
@click.option(
    "--kdf-memory",
    "kdf_memory",
    type=click.IntRange(*KDF_MEMORY_MIB),
    default=DEFAULT_KDF_MEMORY_MIB,
    show_default=True,
    help="MiB of memory Argon2id takes to open the master key, and so each guess at its passphrase. "
    "Below the default only for throwaway repositories (tests).",
)
@handles_errors
def init(**kwargs: Any) -> None:
    """Create a repository, its master key and this machine's put key."""
    client_name = check_client_name(kwargs.pop("client_name") or default_client_name())
    host = kwargs.pop("host")
    kdf_mib = kwargs.pop("kdf_memory")
    opts, out = make_options(kwargs)
    created = context.init_repository(
        opts.repo_url, client_name, check_host_name(host) if host else "", kdf_memory_kib=kdf_mib << 10
    )
    out.document(
        {
            "repository": opts.repo_url,
            "id": created.repo.repo_id,
            "master_key": created.master_path,
            "put_key": created.put_path,
            "client": client_name,
            "kdf_memory_mib": kdf_mib,
        }
    )
    out.line(f"created repository {opts.repo_url}")
    out.line(f"  id:        {created.repo.repo_id}")
    out.line(f"  put key:   {created.put_path} (this machine backs up with it, no password)")
    out.line("")
    out.line(context.master_warning(created.master_path))
    if kdf_mib < DEFAULT_KDF_MEMORY_MIB:
        out.info(
            f"warn: the master key's passphrase is protected by Argon2id with {kdf_mib} MiB instead of "
            f"{DEFAULT_KDF_MEMORY_MIB}: whoever steals the key file needs that much less memory for each guess "
            "at the passphrase. For a repository that keeps real backups, run `bunker key passwd --kdf-memory "
            f"{DEFAULT_KDF_MEMORY_MIB}`"
        )


def _open_or_create_default(opts: context.Options, out: Any) -> Repository:
    """Open the repository; on a first run with nothing configured, create the default one."""
    explicit_key = (
        opts.put_key or opts.master_key or os.environ.get("BUNKER_PUT_KEY") or os.environ.get("BUNKER_MASTER_KEY")
    )
    if opts.repo_is_default and not explicit_key and not _default_repository_exists(opts.repo_url):
        _refuse_if_keys_elsewhere(opts.repo_url)
        created = context.init_repository(opts.repo_url, default_client_name())
        out.info(f"created the local repository {opts.repo_url} (id {created.repo.repo_id[:16]}…)")
        out.info(context.master_warning(created.master_path))
        return created.repo
    return context.open_repository(opts)


def _open_with_spool(opts: context.Options, out: Any) -> tuple[Repository, PutKey, list[tuple[str, str, str]]]:
    """Open the repository for a backup, with the local spool as the fallback: unreachable at
    the start, the backup goes to the spool; reachable, what earlier runs spooled is forwarded
    first, and the run falls back to the spool if the repository stops answering."""
    spool = Spool(opts.repo_url)
    try:
        repo = _open_or_create_default(opts, out)
    except StorageError as exc:
        repo = offline_repository(spool, context.explicit_repo_id(opts), exc)
        return repo, context.load_put(opts, repo), []
    try:
        put = context.load_put(opts, repo)
    except BunkerError as exc:
        _report_could_not_run(repo, exc, out)
        raise
    events: list[tuple[str, str, str]] = []
    try:
        if spool.pending():
            from bunker.node.forward import forward, forward_problems, forward_summary  # (only with a spool to deliver)

            report = forward(spool, repo, put)
            out.info(forward_summary(report, repo.backend.url))
            events = forward_problems(report, spool.root)
        unseeded = spool.seed(repo, put)
        if unseeded:
            events.append(("warn", "spool-unwritable", unseeded))
        events += unrecorded_events(repo, put)  # into a node: has the top recorded what it holds?
    except StorageError as exc:
        return offline_repository(spool, repo.repo_id, exc), put, events
    except (CorruptObject, ObjectMissing) as exc:
        # what waits in the spool stays there; it never keeps this backup from being taken
        events.append(
            (
                "err",
                "forward-failed",
                f"forwarding the local spool {spool.root} stopped: {exc.message}. Nothing in the spool is lost and "
                f"this backup is taken anyway; {exc.hint or 'run `bunker forward` to try again'}",
            )
        )
    return spooling_repository(repo, spool), put, events


def _report_could_not_run(repo: Repository, exc: BunkerError, out: Any) -> None:
    """This run cannot sign its own status record (its put key is unusable): through a node, ask
    the node to sign one for it (node/reports.py), so the top sees a failed run, not silence.
    The certificate is the one this machine's chain head remembers; a machine that never backed
    up here, or backs up as several clients, cannot say whose run failed."""
    report = getattr(repo.backend, "report_failure", None)
    certs = sorted({h.cert for h in witnesses(repo.repo_id) if h.cert})
    if report is None or len(certs) != 1:
        return
    message = f"{exc.message} (next step: {exc.hint})"[:4000]
    try:
        name = report(certs[0], "put-key-unusable", int(exc.exit_code), message, time.time())
    except BunkerError:
        return  # the node cannot take it: the run's own error is what matters now
    if name:
        out.info(f"the node signed a status record of this failed run ({name}): the repository's owner sees it")


def _refuse_if_keys_elsewhere(url: str) -> None:
    """A machine that holds a key already backs up into that key's repository: when the default
    repository is gone, a new one made silently would start a second history nobody watches."""
    keys = dirs.key_files()
    if not keys:
        return
    ids = sorted({os.path.basename(k).rsplit(".", 1)[0] for k in keys})
    raise BunkerError(
        f"your repository at {url} is gone: this machine holds keys of "
        + ("repository " if len(ids) == 1 else "repositories ")
        + ", ".join(ids)
        + f" (in {os.path.dirname(keys[0])}), but there is no repository at {url}; no backup was taken, and no "
        "new repository was made",
        "if the repository lives elsewhere, pass --repo URL (or set BUNKER_REPO); if it was deleted, restore it from "
        "a mirror or copy (docs/recovery.md); to start over with a new repository and new keys, run `bunker init`",
        exit_code=ExitCode.NO_REPOSITORY,
    )


def _default_repository_exists(url: str) -> bool:
    """Whether the default location holds a repository (one it cannot read counts: opening it
    then says what is wrong)."""
    if not os.path.isdir(url):
        return False
    try:
        return any(True for _ in open_backend(url).list("config/"))
    except StorageError:
        return True


@cli.command()
@common
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--exclude", "-e", multiple=True, help="Exclude a name pattern (*.tmp) or an absolute path pattern.")
@click.option("--exclude-file", multiple=True, type=click.Path(dir_okay=False), help="Read exclude patterns from FILE.")
@click.option("--one-file-system", "-x", is_flag=True, help="Do not cross into other mounted filesystems.")
@click.option(
    "--exclude-caches", is_flag=True, help="Keep directories marked with a CACHEDIR.TAG empty (bford.info/cachedir)."
)
@click.option(
    "--exclude-if-present",
    "if_present",
    multiple=True,
    metavar="NAME",
    help="Keep directories that contain NAME empty (repeatable; e.g. .nobackup).",
)
@click.option("--atime", is_flag=True, help="Also store access times (unchanged directories then rarely dedup).")
@click.option("--tag", multiple=True, help="Tag the snapshot (sealed; repeatable).")
@click.option("--stdin-name", help="Back up standard input as a file with this name.")
@click.option(
    "--tar",
    "tar_source",
    metavar="FILE|-",
    help="Back up the content of a tar/pax archive (plain or compressed; - reads standard input), metadata as stored.",
)
@click.option("--host", help="Host name recorded in the snapshot (default: this machine's).")
@click.option(
    "--progress",
    "progress_mode",
    type=click.Choice(PROGRESS_MODES),
    default="auto",
    show_default=True,
    help="auto: a live line on a terminal, else a line every 30 s on stderr (not with --json); always: also "
    "with --json; never: none.",
)
@click.option("--no-progress", is_flag=True, help="The same as --progress=never.")
@click.option(
    "--checkpoint-interval",
    metavar="AGE",
    help="Persist progress this often (0 = never): a killed run redoes at most about this much, and what it "
    "stored becomes an incomplete snapshot [default: the policy's checkpoint-interval, else 10s].",
)
@click.option(
    "--spool-warn-age",
    metavar="AGE",
    envvar="BUNKER_SPOOL_WARN_AGE",
    help="While the repository is unreachable backups are stored locally (level note); once they have "
    "waited longer than AGE (e.g. 12h, 3d; default 3d) the run ends at warn [BUNKER_SPOOL_WARN_AGE].",
)
@handles_errors
def backup(**kwargs: Any) -> None:
    """Back up PATHS (or standard input) with the put key: no password needed."""
    paths: tuple[str, ...] = kwargs.pop("paths")
    stdin_name = kwargs.pop("stdin_name")
    tar_source = kwargs.pop("tar_source")
    progress_mode = "never" if kwargs.pop("no_progress") else kwargs.pop("progress_mode")
    kwargs.pop("progress_mode", None)
    spool_warn_age = kwargs.pop("spool_warn_age")
    checkpoint_text = kwargs.pop("checkpoint_interval")
    checkpoint_seconds = parse_age(checkpoint_text) if checkpoint_text is not None else None
    excludes = list(kwargs.pop("exclude"))
    for f in kwargs.pop("exclude_file"):
        excludes += read_exclude_file(f)
    tags, one_fs, host = list(kwargs.pop("tag")), kwargs.pop("one_file_system"), kwargs.pop("host")
    atime = kwargs.pop("atime")
    exclude_caches, if_present = kwargs.pop("exclude_caches"), list(kwargs.pop("if_present"))
    opts, out = make_options(kwargs)
    if stdin_name is not None and (paths or "/" in stdin_name or stdin_name in ("", ".", "..")):
        raise BunkerError(
            "--stdin-name takes a plain file name and no PATHS",
            "e.g. `pg_dump db | bunker backup --stdin-name db.sql`",
            exit_code=ExitCode.USAGE,
        )
    if tar_source is not None and (paths or stdin_name is not None or not tar_source):
        raise BunkerError(
            "--tar takes an archive (or - for standard input), and neither PATHS nor --stdin-name",
            "e.g. `bunker backup --tar root.tar` or `fakeroot tar -cf - /srv | bunker backup --tar -`",
            exit_code=ExitCode.USAGE,
        )
    if tar_source not in (None, "-") and (not os.path.exists(tar_source) or os.path.isdir(tar_source)):
        raise BunkerError(
            f"{tar_source} is not a tar archive file", "check the path; no backup was taken", exit_code=ExitCode.USAGE
        )
    if not paths and stdin_name is None and tar_source is None:
        raise BunkerError(
            "nothing to back up",
            "name one or more paths, or use --stdin-name NAME or --tar FILE",
            exit_code=ExitCode.USAGE,
        )
    for p in paths:
        if not os.path.lexists(p):
            raise BunkerError(f"{p} does not exist", "check the path; no backup was taken", exit_code=ExitCode.USAGE)
    repo, put, forward_events = _open_with_spool(opts, out)
    applied = apply_policy(repo, put, checkpoint_seconds)
    req = BackupRequest(
        paths=list(paths),
        excludes=excludes,
        one_file_system=one_fs,
        exclude_caches=exclude_caches,
        if_present=if_present,
        atime=atime,
        tags=tags,
        stdin_name=stdin_name,
        stdin=sys.stdin.buffer if (stdin_name or tar_source == "-") else None,
        tar=tar_source,
        master_on_client=context.master_on_client(repo.repo_id),
        events=forward_events + applied.events,
    )
    if host:
        req.host = host
    req.checkpoint_seconds = applied.checkpoint_seconds
    if spool_warn_age is not None:
        req.spool_warn_age = parse_age(spool_warn_age)
    progress = Progress()
    started = time.time()
    with ProgressDisplay(progress, list(paths), progress_mode, opts.as_json):
        try:
            outcome = run_backup(repo, put, req, progress)
        except BunkerError as exc:
            # a failed run leaves its status record too: the top sees the failure, not silence
            failed = {"level": "fatal", "code": "backup-failed", "message": f"{exc.message} (next step: {exc.hint})"}
            code, version = exc.exit_code, applied.version
            leave_status(repo, put, started=started, level="fatal", exit_code=code, events=[failed], policy=version)
            _raise_full_as_spool(exc, repo)
            raise
    ignore_signals()  # the backup's work is done, whatever comes now: only its report is left
    c, log = outcome.committed, outcome.log
    s = c.stats
    level = max(c.level, log.level, key=LEVELS.index)  # the run's level (see _spool_event)
    spooled = isinstance(repo.backend, SpoolingBackend) and repo.backend.offline
    doc = {
        "snapshot": c.name.split("/", 1)[1],
        "seq": c.seq,
        "level": level,
        "spooled": spooled,
        "stats": s,
        "events": [e.to_json() for e in log.events],
        "repository": repo.backend.url,
        "complete": outcome.interrupted is None,
    }
    if outcome.interrupted is not None:
        doc["interrupted"] = signal_name(outcome.interrupted)
        doc["exit_code"] = 128 + outcome.interrupted
    doc["status"] = leave_status(
        repo,
        put,
        started=started,
        level=level,
        exit_code=EXIT_FOR_LEVEL[level] if outcome.interrupted is None else 128 + outcome.interrupted,
        snapshot=c.name,
        snapshot_seq=c.seq,
        complete=outcome.interrupted is None,
        stats=s,
        events=[e.to_json() for e in log.events],
        policy=applied.version,
    )
    if applied.version:
        doc["policy"] = applied.version
    out.document(doc)
    if not opts.as_json:
        for e in log.events:
            if e.level != "ok":
                where = f" {e.path.decode('utf-8', 'backslashreplace')}:" if e.path else ""
                click.echo(f"{e.level}:{where} {e.message}", err=True)
        if outcome.interrupted is None:
            click.echo(
                f"snapshot {c.name.split('/', 1)[1][:12]} #{c.seq} level {level}: {s['files']} files, "
                f"{human_bytes(s['bytes'])}; {s['files_new']} new, {s['files_changed']} changed; "
                f"added {human_bytes(s['stored_new'])} stored in {s['duration_ms'] / 1000:.1f} s"
            )
    if outcome.interrupted is not None:
        _report_interrupted(outcome.interrupted, c, spooled, repo.backend.url)
        sys.exit(128 + outcome.interrupted)
    if outcome.late_signal is not None:
        out.info(
            f"bunker: {signal_name(outcome.late_signal)} came while the snapshot was being written; the snapshot is "
            "complete"
        )
    sys.exit(EXIT_FOR_LEVEL[level])


def _raise_full_as_spool(exc: BunkerError, repo: Repository) -> None:
    """A full spool while the repository is away: this machine's disk, not the repository's (say
    why the backup was going there)."""
    b = repo.backend
    if isinstance(exc, RepositoryFull) and isinstance(b, SpoolingBackend) and b.offline:
        raise RepositoryFull(
            f"the repository at {b.url} cannot be reached ({b.reason}), and the local spool that keeps "
            f"backups meanwhile has no room: {exc.message}",
            exc.hint,
            exit_code=exc.exit_code,
            free_step=exc.free_step,
        ) from None


def _report_interrupted(signum: int, c: Committed, spooled: bool, url: str) -> None:
    """What an interrupted backup kept (stderr, with --json too: the document says it as well)."""
    s = c.stats
    where = "in the local spool (forwarded later)" if spooled else f"in {url}"
    click.echo(
        f"bunker: interrupted by {signal_name(signum)}: what the run had finished is incomplete snapshot "
        f"{c.name.split('/', 1)[1][:12]} #{c.seq} {where} ({s.get('files', 0)} files, "
        f"{human_bytes(s.get('bytes', 0))}), which restores what it covers; its lease is released",
        err=True,
    )
    click.echo(
        "  next step: run the same backup again: it reads again only the files that were being read when it stopped",
        err=True,
    )
