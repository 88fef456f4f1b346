"""sync and compare: mirrors of a repository, without any key (docs/hierarchy.md, "Mirrors")."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import click

from bunker.cli.main import cli, handles_errors
from bunker.cli.output import Output, human_bytes
from bunker.cli.progress import line_interval
from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.node.spool import parse_age
from bunker.repo.gc import DEFAULT_GRACE
from bunker.repo.mirror_compare import compare as compare_copies
from bunker.repo.mirror_prune import MirrorPruner
from bunker.repo.mirror_sync import DEFAULT_JOBS, EXAMPLES, Syncer, SyncProgress
from bunker.storage import open_backend
from bunker.storage.backend import Backend, ObjectInfo
from bunker.storage.url import local_path


def _options(f: Any) -> Any:
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)
    f = click.option(
        "--remote-path",
        metavar="CMD",
        help="The bunker command on the server of an ssh:// repository [BUNKER_REMOTE_PATH; default: bunker].",
    )(f)
    return f


def _open(url: str, what: str, *, create: bool = False) -> Backend:
    """The backend of argument ``what`` (SRC, DST, A, B); errors name the argument, not --repo."""
    local_path(url, what=what)  # a URL typo is refused (exit 2) before anything is made for it
    try:
        return open_backend(url, create=create)
    except BunkerError as exc:
        if exc.exit_code != ExitCode.NO_REPOSITORY:
            raise
        raise BunkerError(
            f"{what} {url}: {exc.message}; nothing was copied or compared",
            f"check the {what} argument (a repository path or URL, as --repo takes it)",
            exit_code=ExitCode.NO_REPOSITORY,
        ) from None


class _NotYet(Backend):
    """A mirror directory that does not exist yet, seen by --dry-run (which creates nothing):
    it holds no object."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _put(self, name: str, data: bytes | memoryview, if_absent: bool) -> bool:
        raise AssertionError("a dry run writes nothing")

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        raise ObjectMissing(name)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter(())

    def _delete(self, name: str) -> None:
        raise AssertionError("a dry run deletes nothing")

    def _stat(self, name: str) -> ObjectInfo | None:
        return None


def _open_dst(url: str, dry_run: bool) -> Backend:
    path = local_path(url, what="DST")
    if dry_run and path is not None and not os.path.exists(path):
        return _NotYet(path)
    return _open(url, "DST", create=not dry_run)


def _remote_path(kwargs: dict[str, Any]) -> None:
    remote_path = kwargs.pop("remote_path", None)
    if remote_path:
        os.environ["BUNKER_REMOTE_PATH"] = remote_path


class _Lines:
    """A plain progress line on stderr every 30 s (BUNKER_PROGRESS_INTERVAL), so a log shows that
    a long sync is working."""

    def __init__(self, p: SyncProgress, shown: bool) -> None:
        self.p = p
        self.shown = shown
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread: threading.Thread | None = None

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self.p.lock:
                done, total, nb, tb, phase = (
                    self.p.objects_done,
                    self.p.objects_total,
                    self.p.bytes_done,
                    self.p.bytes_total,
                    self.p.phase,
                )
            el = int(time.monotonic() - self._t0)
            text = (
                f"bunker: sync running for {el // 60}:{el % 60:02d}: {done} of {total} objects, "
                f"{human_bytes(nb)} of {human_bytes(tb)} ({phase})\n"
            )
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(text)
                sys.stderr.flush()

    def __enter__(self) -> _Lines:
        if self.shown:
            self._thread = threading.Thread(target=self._run, args=(line_interval(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option(
    "--prune",
    is_flag=True,
    help="Also delete from DST the packs and snapshots that SRC no longer holds and that a valid signed record "
    "condemns or retires, once the grace period has passed; nothing else is ever deleted.",
)
@click.option(
    "--grace", metavar="AGE", help="With --prune: how long after a record's time it may be followed (default 24h)."
)
@click.option("--dry-run", is_flag=True, help="Show what would be copied (and deleted); write nothing.")
@click.option(
    "--jobs",
    type=click.IntRange(1, 64),
    default=DEFAULT_JOBS,
    show_default=True,
    help="Objects copied at once (each holds one object in memory).",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="A progress line on stderr every 30 s (auto: not with --json).",
)
@_options
@handles_errors
def sync(**kwargs: Any) -> None:
    """Copy every object DST lacks from SRC, without any key, each verified against its name
    (never sessions/). Running it again after an interruption copies only what is still missing."""
    src_url, dst_url, as_json = kwargs.pop("src"), kwargs.pop("dst"), kwargs.pop("as_json")
    out = Output(as_json)
    grace = parse_age(kwargs["grace"]) if kwargs["grace"] is not None else DEFAULT_GRACE
    _remote_path(kwargs)
    src = _open(src_url, "SRC")
    dst = _open_dst(dst_url, kwargs["dry_run"])
    progress = SyncProgress()
    syncer = Syncer(src, dst, jobs=kwargs["jobs"], dry_run=kwargs["dry_run"], progress=progress)
    shown = kwargs["progress"] == "always" or (kwargs["progress"] == "auto" and not as_json)
    with _Lines(progress, shown):
        report = syncer.run()
    pruned = None
    if kwargs["prune"]:
        assert syncer.repo is not None
        pruned = MirrorPruner(
            syncer.repo, src, dst, syncer.src_names, syncer.dst_names, grace=grace, dry_run=kwargs["dry_run"]
        ).run()
        for name in pruned.deleted:
            kept = report.extra.get(name.split("/", 1)[0], [])
            if name in kept:
                kept.remove(name)
    doc: dict[str, object] = report.to_json()
    if pruned is not None:
        doc["prune"] = pruned.to_json()
    doc["kept"] = {p: {"count": len(ns), "examples": ns[:EXAMPLES]} for p, ns in sorted(report.extra.items()) if ns}
    out.document(doc)
    verb = "would copy" if report.dry_run else "copied"
    out.line(
        f"{verb} {report.copied_objects} object(s) ({human_bytes(report.copied_bytes)}) from {src.url} to {dst.url}; "
        f"{report.skipped} already there"
        + (f"; {len(report.repaired)} of another size there replaced" if report.repaired else "")
    )
    if report.vanished:
        out.line(f"{len(report.vanished)} object(s) vanished at the source while copying (a prune there): not copied")
    if pruned is not None:
        dverb = "would delete" if report.dry_run else "deleted"
        size = human_bytes(pruned.deleted_bytes)
        out.line(f"{dverb} {len(pruned.deleted)} object(s) ({size}) that signed records justify")
        for name, why in pruned.waiting:
            out.line(f"  {name}: not deleted yet: {why}")
        for name, why in pruned.ignored_records:
            out.line(f"  warn: {name}: record ignored: {why}")
    for p, names in sorted(report.extra.items()):
        if names:
            out.line(
                f"kept {len(names)} object(s) of {p}/ that only the mirror holds (e.g. {names[0]}): no signed record "
                "says to delete them" + ("" if kwargs["prune"] else " (and --prune was not given)")
            )
    for r in report.refused:
        out.line(f"err: {r.name}: {r.why}")
    if report.refused:
        out.line(f"{len(report.refused)} object(s) refused: the mirror lacks them until the source is repaired")
        sys.exit(ExitCode.INTEGRITY)


@cli.command()
@click.argument("a")
@click.argument("b")
@_options
@handles_errors
def compare(**kwargs: Any) -> None:
    """Compare two copies of a repository without any key: chain heads per client, snapshots and
    other objects in one and not the other. Exit 0 when they hold the same objects (sessions/
    aside), 5 when they differ."""
    a_url, b_url, as_json = kwargs.pop("a"), kwargs.pop("b"), kwargs.pop("as_json")
    out = Output(as_json)
    _remote_path(kwargs)
    report = compare_copies(_open(a_url, "A"), _open(b_url, "B"))
    out.document(report.to_json())
    out.line(f"A: {report.urls['a']}")
    out.line(f"B: {report.urls['b']}")
    for c in report.chains:
        heads = [f"#{h.seq}" if (h := c.heads.get(s)) else "none" for s in ("a", "b")]
        out.line(f"client {c.client!r} ({c.cert[:20]}…): newest in A {heads[0]}, in B {heads[1]}")
    for f in report.findings:
        out.line(f"differs: {f}")
    if report.same:
        out.line("A and B hold the same objects (sessions/ aside)")
        return
    out.line(
        "A and B differ: run `bunker sync` from the copy that holds what the other lacks (after `bunker check "
        "--keyless` there), or find out why one copy lost objects"
    )
    sys.exit(ExitCode.DIFFERENT)
