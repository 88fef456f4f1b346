"""forward: deliver backups stored in the local spool while the repository was unreachable."""

from __future__ import annotations

import sys
from typing import Any

import click

from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.cli.output import human_bytes
from bunker.errors import ExitCode, StorageError
from bunker.node.forward import ForwardReport, forward, forward_problems, forward_summary
from bunker.node.spool import Spool


@cli.command(name="forward")
@common
@handles_errors
def forward_cmd(**kwargs: Any) -> None:
    """Send backups stored locally while the repository was unreachable (every backup also tries)."""
    opts, out = make_options(kwargs)
    spool = Spool(opts.repo_url)
    pending = spool.pending()
    if not pending:
        spool.clear_leftovers()
        out.document({"repository": opts.repo_url, **ForwardReport().to_json(), "problems": []})
        out.line(f"nothing waits in the local spool for {opts.repo_url}")
        return
    size = sum(i.size for i in pending)
    try:
        repo = context.open_repository(opts)
    except StorageError as exc:
        waiting = f"{len(pending)} objects ({human_bytes(size)}) wait in the local spool {spool.root}"
        exc.message = f"{exc.message}; {waiting}"
        exc.hint = (
            "nothing is lost: they stay there until the repository is reachable; run `bunker forward` again then "
            "(every backup also tries first)" + (f". {exc.hint}" if exc.hint else "")
        )
        raise
    put = context.load_put(opts, repo)
    report = forward(spool, repo, put)
    problems = forward_problems(report, spool.root)
    out.document({"repository": repo.backend.url, **report.to_json(), "problems": [p[2] for p in problems]})
    out.line(forward_summary(report, repo.backend.url))
    for level, _code, message in problems:
        click.echo(f"{level}: {message}", err=True)
    sys.exit(ExitCode.ERR if any(p[0] == "err" for p in problems) else ExitCode.OK)
