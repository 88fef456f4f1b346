"""export-tar: a snapshot as a POSIX pax archive."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, Any

import click

from bunker.cli.cmd_restore import _open_for_reading, budget_of, damaged_packs, filter_options, pop_filters
from bunker.cli.files import os_failure
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.errors import BunkerError, ExitCode
from bunker.restore.restorer import Restorer
from bunker.runlog import RunLog
from bunker.tar.writer import TarExporter


@cli.command("export-tar")
@common
@filter_options
@click.argument("snapshot")
@click.argument("paths", nargs=-1)
@click.option(
    "--output", "-o", default="-", show_default=True, help="Archive file to write, or `-` for standard output."
)
@handles_errors
def export_tar(**kwargs: Any) -> None:
    """Write SNAPSHOT (an id prefix or `latest`), or only PATHS of it, as a POSIX pax archive.

    Carries contents, directories, symlinks, hard links, devices, fifos, owners (ids and names),
    modes, ns times, xattrs (SCHILY.xattr), ACLs (SCHILY.acl) and inode flags (SCHILY.fflags).
    Sparse files go in GNU sparse format 1.0. Unix sockets cannot be in a tar: they are listed on
    stderr. Needs the master key."""
    spec, paths, output = kwargs.pop("snapshot"), kwargs.pop("paths"), kwargs.pop("output")
    f = pop_filters(kwargs)
    opts, _ = make_options(kwargs)
    if output == "-" and sys.stdout.isatty():
        raise BunkerError(
            "refusing to write a tar archive to a terminal",
            "redirect standard output to a file or give `-o FILE`",
            exit_code=ExitCode.USAGE,
        )
    _, _, rec, reader, root = _open_for_reading(opts, spec, f, "export-tar")
    restorer = Restorer(reader, b"/nonexistent", RunLog(), budget=budget_of(rec))
    for p in paths:
        restorer.find(root, p)  # an unknown path fails before anything is written
    out: IO[bytes]
    if output == "-":
        out = sys.stdout.buffer
    else:
        try:
            out = open(output, "wb")  # noqa: SIM115 - closed below, removed on failure
        except OSError as exc:
            raise os_failure(exc, "write the archive to", output) from None
    done = False
    try:
        stats = TarExporter(restorer, out).export(root, list(paths))
        out.flush()
        if out is not sys.stdout.buffer:
            out.close()  # its last buffered bytes may not fit either
        done = True
    except OSError as exc:
        if out is sys.stdout.buffer:
            raise BunkerError(
                f"writing the archive to standard output failed: {exc.strerror or exc}",
                "the archive written so far is incomplete: discard it, make room where it goes and run the "
                "command again",
                exit_code=ExitCode.ERR,
            ) from None
        failure = os_failure(exc, "write the archive to", output)
        failure.message += "; the incomplete archive was removed"
        raise failure from None
    finally:
        if out is not sys.stdout.buffer and not done:
            with contextlib.suppress(OSError):
                out.close()
            with contextlib.suppress(OSError):
                os.unlink(output)
    for path, why in stats.left_out:
        click.echo(f"not in the archive: {path} ({why})", err=True)
    for path, what in stats.problems:
        click.echo(f"err: {path}: {what}", err=True)
    damaged = damaged_packs(reader)
    for _, message in damaged:
        click.echo(f"err: {message}", err=True)
    click.echo(
        f"exported snapshot {rec.short_id}: {stats.members} members ({stats.files} files, "
        f"{stats.hardlinks} hard links, {stats.sparse} sparse), {stats.bytes} bytes of file data"
        + (f"; {len(stats.left_out)} items not in the archive" if stats.left_out else ""),
        err=True,
    )
    if stats.problems or damaged:
        sys.exit(ExitCode.ERR)
