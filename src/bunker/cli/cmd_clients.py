"""key new-client | revoke | merge-configs: what the master key says about clients and configs."""

from __future__ import annotations

import os
from typing import Any

import click

from bunker.cli import context
from bunker.cli.client_names import check_client_name, check_host_name
from bunker.cli.cmd_key import key
from bunker.cli.files import check_writable, write_output
from bunker.cli.main import common, handles_errors, make_options
from bunker.crypto.keyfile import put_key_text
from bunker.errors import BunkerError, ExitCode
from bunker.repo.authority import issue_client, revoke_client, write_config
from bunker.repo.certs import Certificate
from bunker.repo.config_chain import ConfigFloor, floor_problem
from bunker.repo.repository import Repository
from bunker.repo.trust import chain_of
from bunker.storage import open_backend


@key.command("new-client")
@common
@click.argument("name")
@click.option("--out", "dest", required=True, type=click.Path(dir_okay=False), help="Write the put key to FILE.")
@click.option("--prune", "can_prune", is_flag=True, help="Allow this client to prune (forget snapshots).")
@click.option(
    "--domain",
    default="default",
    show_default=True,
    help="Dedup domain; give clients that must not confirm each other's content different domains.",
)
@click.option(
    "--host",
    help="Bind the client to this host name (sealed in its certificate: only this client's snapshots answer "
    "`--host HOST`).",
)
@handles_errors
def new_client(**kwargs: Any) -> None:
    """Make a put key for another machine (needs the master key)."""
    name, dest, can_prune, domain, host = (
        check_client_name(kwargs.pop("name")),
        kwargs.pop("dest"),
        kwargs.pop("can_prune"),
        kwargs.pop("domain"),
        kwargs.pop("host"),
    )
    if host is not None:
        check_host_name(host)
    opts, out = make_options(kwargs)
    check_writable(dest, "the put key")  # before a certificate is issued for a key that could not be kept
    repo = context.open_repository(opts)
    context.refuse_on_node(repo, "`bunker key new-client`")
    master = context.load_master(opts, repo, "making a put key")
    caps = ("backup", "prune") if can_prune else ("backup",)
    put = issue_client(repo, master, name, caps, domain, host or "")
    write_output(dest, put_key_text(put, name), "the put key")
    out.document(
        {
            "client": name,
            "put_key": os.path.abspath(dest),
            "capabilities": list(caps),
            "domain": domain,
            "host": host,
        }
    )
    out.line(
        f"put key for client {name!r}{f' (bound to host {host!r})' if host else ''} written to {dest}; copy it to "
        "that machine and back up with `bunker backup --repo URL --put-key FILE PATH...`"
    )


def _heads(repo: Repository, cert: Certificate) -> list[tuple[str, int]]:
    """(name, seq) of the trusted snapshots of ``cert`` that no other one of it follows."""
    mine = {r.name: r.snap.env for r in repo.snapshots() if r.trusted and r.snap.env.cert == cert.name}
    named = {e.prev for e in mine.values()}
    return sorted(((n, e.seq) for n, e in mine.items() if n not in named), key=lambda x: -x[1])


def _last_trusted(repo: Repository, cert: Certificate, last: str | None, last_seq: int | None) -> tuple[str, int]:
    """The snapshot (name, seq) a revocation keeps trusted."""
    mine = {r.name: r.snap.env for r in repo.snapshots() if r.trusted and r.snap.env.cert == cert.name}
    if last is not None:
        want = last.removeprefix("snapshots/")
        found = [n for n in mine if n.split("/", 1)[1].startswith(want)]
        if len(found) != 1:
            raise BunkerError(
                f"--last {last}: {'no' if not found else 'more than one'} trusted snapshot of {cert.client!r} matches",
                "give more hex digits of one of its snapshots (`bunker snapshots --client NAME`)",
                exit_code=ExitCode.USAGE,
            )
        return found[0], mine[found[0]].seq
    if last_seq == 0:
        return "", 0
    heads = _heads(repo, cert)
    if not heads:
        return "", 0
    if len(heads) > 1 and last_seq is None:
        listing = ", ".join(f"{n.split('/', 1)[1][:12]} (#{s})" for n, s in heads)
        raise BunkerError(
            f"the chain of {cert.client!r} has several heads ({listing}): it was forked",
            "say which one to keep trusting with --last SNAPSHOT (or --last-seq 0 to trust none)",
            exit_code=ExitCode.USAGE,
        )
    head = heads[0][0]
    if last_seq is None:
        return head, mine[head].seq
    on_chain = [n for n in chain_of(mine, head, cert.name) if mine[n].seq == last_seq]
    if not on_chain:
        raise BunkerError(
            f"{cert.client!r} has no trusted snapshot #{last_seq} on its chain",
            "list its snapshots with `bunker snapshots --client NAME`, and name one with --last",
            exit_code=ExitCode.USAGE,
        )
    return on_chain[0], last_seq


@key.command()
@common
@click.argument("client")
@click.option("--last", help="Trust the client's snapshots up to this one (an id prefix; default: its newest one now).")
@click.option(
    "--last-seq",
    type=click.IntRange(min=0),
    help="Trust the client's snapshots up to this sequence number on its chain (0: none).",
)
@handles_errors
def revoke(**kwargs: Any) -> None:
    """Revoke a client (a stolen or retired machine): only its snapshots up to the one named stay
    trusted, and nobody deduplicates against its packs any more (needs the master key)."""
    name, last, last_seq = kwargs.pop("client"), kwargs.pop("last"), kwargs.pop("last_seq")
    if last is not None and last_seq is not None:
        raise BunkerError("give --last or --last-seq, not both", "", exit_code=ExitCode.USAGE)
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    context.refuse_on_node(repo, "`bunker key revoke`")
    # an exact client name wins over certificate ids that merely start with the same letters
    certs = [c for c in repo.certificates() if c.client == name] or [
        c for c in repo.certificates() if c.name.split("/", 1)[1].startswith(name)
    ]
    if len(certs) != 1:
        known = ", ".join(sorted({c.client for c in repo.certificates()})) or "none"
        raise BunkerError(
            f"{'no' if not certs else 'more than one'} client certificate matches {name!r}",
            f"name the client exactly, or give the start of its certificate id (`bunker key info`); clients: {known}",
            exit_code=ExitCode.USAGE,
        )
    cert = certs[0]
    last_name, seq = _last_trusted(repo, cert, last, last_seq)
    master = context.load_master(opts, repo, "revoking a client")
    cfg = revoke_client(repo, master, cert, last_name, seq)
    out.document(
        {
            "client": cert.client,
            "certificate": cert.name,
            "last_trusted": last_name,
            "last_trusted_seq": seq,
            "config_version": cfg.version,
        }
    )
    kept = f"#{seq} ({last_name.split('/', 1)[1][:12]}) and the snapshots it links back to" if last_name else "none"
    out.line(
        f"revoked client {cert.client!r} ({cert.name}) in config version {cfg.version}: trusted snapshots: {kept}; "
        "no client deduplicates against its packs any more. Run `bunker check --read-data` to have every blob it "
        "wrote compared with its id"
    )


@key.command("merge-configs")
@common
@handles_errors
def merge_configs(**kwargs: Any) -> None:
    """Write a config version that joins a forked config history, or that goes above a version
    this machine saw and the repository lost (needs the master key)."""
    opts, out = make_options(kwargs)
    repo = Repository.open(open_backend(opts.repo_url), context.explicit_repo_id(opts), floor=False)
    context.refuse_on_node(repo, "`bunker key merge-configs`")
    seen = ConfigFloor(repo.repo_id).load()
    lost = seen is not None and floor_problem(repo.chain, seen) is not None
    if not repo.chain.forked and not lost:
        out.document({"merged": [], "config_version": repo.config.version})
        out.line(f"the config history is not forked (version {repo.config.version}); nothing to merge")
        return
    branches = [h for h in repo.chain.fork if h in repo.configs]
    master = context.load_master(opts, repo, "merging config versions")
    changes: dict[str, object] = {}
    if lost and seen is not None:
        # the version this machine saw is gone: go above it and name it, so every machine that saw
        # it accepts the new one
        changes = {
            "version": max(seen.version, *(c.version for c in repo.configs.values())) + 1,
            "merges": tuple(sorted({*branches, seen.name})),
        }
    cfg = write_config(repo, master, **changes)
    out.document({"merged": branches, "config_version": cfg.version, "lost": seen.name if lost and seen else None})
    out.line(
        f"config version {cfg.version} joins {len(branches) + 1} branches; it keeps every branch's revocations. "
        "Writing works again"
    )
    if lost and seen is not None:
        out.line(
            f"version {seen.version} ({seen.name}), which this machine saw, is not in the repository: the "
            "revocations it held are not known here. Revoke again every client it revoked (`bunker key revoke`), "
            "or copy it back from a mirror"
        )
