"""migrate: move a format-1 repository to format 2 (needs the master key)."""

from __future__ import annotations

from typing import Any

import click

from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.errors import BunkerError, ExitCode
from bunker.repo import migrate as migration
from bunker.repo.repository import Repository
from bunker.storage import open_backend


def _short(name: str) -> str:
    return name.split("/", 1)[1][:12]


@cli.command()
@common
@click.option(
    "--pick",
    multiple=True,
    metavar="CLIENT=SNAPSHOT",
    help="Where a client's chain is forked, the branch to keep trusting (its head's id prefix; repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be recorded, write nothing.")
@handles_errors
def migrate(**kwargs: Any) -> None:
    """Migrate a format-1 repository to format 2: record each client's chain, turn revocations by
    number into revocations by snapshot (needs the master key). Data is not rewritten."""
    picks: dict[str, str] = {}
    for item in kwargs.pop("pick"):
        client, sep, snap = item.partition("=")
        if not sep or not client or not snap:
            raise BunkerError(
                f"--pick {item!r} is not CLIENT=SNAPSHOT", "e.g. --pick web1=3fa9c2", exit_code=ExitCode.USAGE
            )
        picks[client] = snap
    dry_run = kwargs.pop("dry_run")
    opts, out = make_options(kwargs)
    repo = Repository.open(open_backend(opts.repo_url), context.explicit_repo_id(opts), legacy=True)
    plan = migration.plan(repo, picks)
    doc: dict[str, Any] = {
        "repository": repo.backend.url,
        "id": repo.repo_id,
        "dry_run": dry_run,
        "clients": [
            {
                "client": c.client,
                "certificate": c.cert,
                "heads": c.heads,
                "fork_branches": c.branches,
                "untrusted": c.untrusted,
                "revoked_after": c.revocation.last if c.revocation is not None else None,
            }
            for c in plan.clients
        ],
    }
    for c in plan.clients:
        heads = ", ".join(_short(h) for h in c.heads) or "none"
        out.line(f"client {c.client!r}: trusted chain ending at {heads}")
        if c.branches and not c.heads:
            out.line(
                f"  forked: branches end at {', '.join(_short(h) for h in c.branches)}; choose one with "
                f"--pick {c.client}=ID"
            )
        if c.untrusted:
            out.line(f"  stays untrusted: {', '.join(_short(n) for n in c.untrusted)}")
        if c.revocation is not None:
            last = _short(c.revocation.last) if c.revocation.last else "none"
            out.line(f"  revoked: trusted up to {last} (#{c.revocation.last_seq})")
    if dry_run:
        out.document(doc)
        if plan.unresolved:
            out.line("forked chains need --pick before the migration can be written")
        return
    if plan.unresolved:
        out.document(doc)
    master = context.load_master(opts, repo, "migrating the repository")
    cfg = migration.migrate(repo, master, plan)
    doc["config_version"] = cfg.version
    doc["config"] = repo.config_name
    out.document(doc)
    out.line(
        f"migrated repository {repo.repo_id} to format 2 (config version {cfg.version}); older bunker versions can "
        "no longer write to it: upgrade every client"
    )
