"""bunker node init | card | seed | export-seed | serve | upstream | forward: a node (docs/hierarchy.md)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from bunker.cli import context
from bunker.cli.files import write_output
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.cli.output import Output, human_bytes
from bunker.errors import ExitCode


def _out(kwargs: dict[str, Any]) -> Output:
    return Output(bool(kwargs.pop("as_json", False)))


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


@cli.group()
def node() -> None:
    """Run a node: a server close to its clients that carries their backups upstream."""


@node.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", help="The node's name (public: in its certificate); default: the directory's name.")
@click.option("--store", type=click.Path(file_okay=False), help="Where it keeps objects [default: DIR/store].")
@click.option("--max-size", help="Bound of the store, e.g. 500G: beyond it the node evicts recorded data.")
@click.option("--seed", "seed_file", type=click.Path(dir_okay=False, exists=True), help="A seed file made at the top.")
@click.option(
    "--abandon-after",
    metavar="AGE",
    help="How long a dead backup's last checkpoint waits for its client's next run here before the node gives "
    "it up to the repository of record, whose prune adopts it (default 14d; e.g. 30d).",
)
@json_option
@handles_errors
def init_cmd(
    directory: str,
    name: str | None,
    store: str | None,
    max_size: str | None,
    seed_file: str | None,
    abandon_after: str | None,
    **kwargs: Any,
) -> None:
    """Make a node directory with a new node key."""
    from bunker.node.node_dir import DEFAULT_ABANDON_AFTER, NodeDir, parse_size
    from bunker.node.spool import parse_age

    out = _out(kwargs)
    bound = parse_size(max_size) if max_size else None
    after = int(parse_age(abandon_after)) if abandon_after is not None else DEFAULT_ABANDON_AFTER
    nd = NodeDir.init(directory, name or os.path.basename(os.path.abspath(directory)), store, bound, after)
    doc: dict[str, Any] = {"node": nd.name, "id": nd.config.node_id, "directory": nd.root, "store": nd.config.store}
    out.line(f"made node {nd.name} ({nd.config.node_id[:16]}) in {nd.root}")
    if seed_file:
        doc["seeded"] = _seed(nd, seed_file, out)
    out.document(doc)
    out.line(
        f"next: `bunker node card {nd.root} > {nd.name}.card`, then at the top "
        f"`bunker key new-node {nd.name}.card --caps relay`"
    )


def _seed(nd: Any, seed_file: str, out: Output) -> dict[str, Any]:
    from bunker.node.seeding import import_seed

    with open(seed_file, "rb") as f:
        seeded = import_seed(nd, f.read(), seed_file)
    what = "now relays" if seeded.created else "updated"
    out.line(
        f"node {nd.name} {what} repository {seeded.repo_id} ({seeded.added} records added, "
        f"{seeded.present} already there)"
    )
    return {"repository": seeded.repo_id, "added": seeded.added, "present": seeded.present, "created": seeded.created}


@node.command("card")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", "dest", type=click.Path(dir_okay=False), help="Write the card to FILE instead of stdout.")
@handles_errors
def card_cmd(directory: str, dest: str | None) -> None:
    """Print the node's public card (for `bunker key new-node` and for pairing a link)."""
    from bunker.node.node_dir import NodeDir

    text = NodeDir(directory).card()
    if dest:
        write_output(dest, text, "the node card")
    else:
        click.echo(text, nl=False)


@node.command("seed")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("seed_file", type=click.Path(dir_okay=False, exists=True))
@json_option
@handles_errors
def seed_cmd(directory: str, seed_file: str, **kwargs: Any) -> None:
    """Add a repository to the node from a seed file (or what is new in it)."""
    from bunker.node.node_dir import NodeDir

    out = _out(kwargs)
    out.document(_seed(NodeDir(directory), seed_file, out))


@node.command("export-seed")
@common
@click.argument("dest", type=click.Path(dir_okay=False))
@handles_errors
def export_seed_cmd(dest: str, **kwargs: Any) -> None:
    """Write a seed file of the repository: its configs and certificates (nothing secret)."""
    from bunker.node.seeding import export_seed

    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    data = export_seed(repo)
    write_output(dest, data, "the seed file")
    out.document({"repository": repo.repo_id, "seed": os.path.abspath(dest), "bytes": len(data)})
    out.line(f"seed of repository {repo.repo_id} written to {dest} ({human_bytes(len(data))})")


@node.command("serve")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--stdio", is_flag=True, help="Serve one client on stdin/stdout (ssh, inetd, systemd Accept=yes).")
@click.option("--socket", "socket_path", metavar="PATH", help="Listen on a unix socket, a thread per client.")
@click.option("--socket-mode", default="600", show_default=True, help="Permissions of the --socket file (octal).")
@handles_errors
def serve_cmd(directory: str, stdio: bool, socket_path: str | None, socket_mode: str) -> None:
    """Serve the node's stores to clients (append-only; forget and prune run at the top)."""
    from bunker.cli.cmd_serve import check_one_front_end, run_front_end
    from bunker.node.node_dir import NodeDir
    from bunker.node.node_serve import node_serve_config

    check_one_front_end("bunker node serve", stdio, socket_path)
    nd = NodeDir(directory)
    run_front_end(node_serve_config(nd), stdio, socket_path, socket_mode, f"node {nd.name} serving")


@node.command("run")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--socket", "socket_path", metavar="PATH", help="Also serve clients on this unix socket.")
@click.option("--socket-mode", default="600", show_default=True, help="Permissions of the --socket file (octal).")
@click.option(
    "--interval",
    type=click.FloatRange(min=1),
    default=60,
    show_default=True,
    metavar="SECONDS",
    help="How often it imports and forwards (at once, too, when a new snapshot arrives).",
)
@handles_errors
def run_cmd(directory: str, socket_path: str | None, socket_mode: str, interval: float) -> None:
    """Run the node as a service: serve clients (--socket), import and forward continuously,
    retry an upstream that is away with a growing wait. Logs go to stderr; SIGTERM stops it."""
    from bunker.cli.cmd_serve import _mode
    from bunker.node.daemon import run_node

    sys.exit(run_node(directory, socket_path, _mode(socket_mode), interval))


@node.group("upstream")
def upstream() -> None:
    """Where the node sends what it holds."""


@upstream.command("add")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name")
@click.option("--direct", "direct_url", metavar="URL", help="The repository of record itself (any backend).")
@click.option("--link", "link_url", metavar="URL", help="A mailbox shared with another node (folder, sftp, S3).")
@click.option("--card", "card_file", type=click.Path(dir_okay=False, exists=True), help="The far node's card (--link).")
@click.option(
    "--piece-size", help="Largest piece written to the mailbox (--link), e.g. 4G for a FAT32 disk [default: 256M]."
)
@json_option
@handles_errors
def upstream_add(
    directory: str,
    name: str,
    direct_url: str | None,
    link_url: str | None,
    card_file: str | None,
    piece_size: str | None,
    **kwargs: Any,
) -> None:
    """Add an upstream: --direct URL, or --link URL --card FILE."""
    from bunker.node.node_dir import parse_size
    from bunker.node.upstreams import add_upstream

    out = _out(kwargs)
    size = parse_size(piece_size) if piece_size else None
    up = add_upstream(directory, name, direct_url, link_url, card_file, size)
    out.document(
        {"upstream": up.name, "kind": up.kind, "url": up.url, "repository": up.repo or None, "peer": up.peer or None}
    )
    far = f"node {up.peer_name} ({up.peer[:16]})" if up.kind == "link" else f"repository {up.repo[:16]}"
    out.line(f"upstream {up.name}: {up.kind} {up.url} -> {far}")


@upstream.command("list")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@handles_errors
def upstream_list(directory: str, **kwargs: Any) -> None:
    """List the node's upstreams."""
    from dataclasses import asdict

    from bunker.node.node_dir import NodeDir

    out = _out(kwargs)
    nd = NodeDir(directory)
    out.document({"upstreams": [{k: v for k, v in asdict(u).items() if k != "card"} for u in nd.config.upstreams]})
    for u in nd.config.upstreams:
        out.line(f"{u.name:<16} {u.kind:<7} {u.url}")
    if not nd.config.upstreams:
        out.line(
            "no upstream yet: add one with `bunker node upstream add DIR NAME --direct URL | --link URL --card FILE`"
        )


@node.command("forward")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name", required=False)
@json_option
@handles_errors
def forward_cmd(directory: str, name: str | None, **kwargs: Any) -> None:
    """Send what the node holds to its upstreams (or only to NAME)."""
    from bunker.node.eviction import evict_all
    from bunker.node.node_dir import NodeDir
    from bunker.node.relay import forward_all
    from bunker.node.requests import describe_retries, retry_all
    from bunker.node.staleness import stale_problems

    out = _out(kwargs)
    nd = NodeDir(directory)
    with nd.moving():  # waits for a daemon's cycle under way
        results = forward_all(nd, name)
        retried = retry_all(nd, force=True)  # restore requests: asked again at once when run by hand
        evictions, full = evict_all(nd)
    problems = [(p.level, p.code, p.message) for p in results.problems] + full + stale_problems(nd)
    out.document(
        {
            "node": nd.name,
            "deliveries": [r.to_json() for r in results.reports],
            "requests": {r: {"fetched": f, "pending": p} for r, (f, p) in retried.items()},
            "abandoned": [a.to_json() for a in results.abandoned],
            "evicted": [e.to_json() for e in evictions],
            "problems": [{"level": lv, "code": c, "message": m} for lv, c, m in problems],
        }
    )
    for line in results.lines() + describe_retries(retried):
        out.line(line)
    _report_evictions(out, evictions)
    sys.exit(_exit(problems))


@node.command("requests")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@handles_errors
def requests_cmd(directory: str, **kwargs: Any) -> None:
    """Restore requests: objects clients read that this node had evicted, asked for upstream."""
    from bunker.cli.cmd_requests import describe_request
    from bunker.node.listing import listings
    from bunker.node.node_dir import NodeDir
    from bunker.node.requests import journal

    out = _out(kwargs)
    nd = NodeDir(directory)
    rows = [
        {"repository": repo_id, "object": name, **r}
        for repo_id in nd.repositories()
        for name, r in sorted(journal(nd, repo_id).items(), key=lambda kv: float(kv[1].get("since", 0.0)))
    ]
    rows += [  # listing requests (node/listing.py)
        {"repository": repo_id, "listing": client, **r}
        for repo_id in nd.repositories()
        for client, r in sorted(listings(nd, repo_id).items())
    ]
    pending = [r for r in rows if r.get("state") == "pending"]
    out.document({"node": nd.name, "requests": rows, "pending": len(pending)})
    for r in rows:
        out.line(describe_request(r))
    if not rows:
        out.line(f"node {nd.name} has no restore requests")


@node.command("list")
@common
@handles_errors
def list_cmd(**kwargs: Any) -> None:
    """List the nodes the repository's master key certified (name, id, capabilities, revoked)."""
    from bunker.repo.node_certs import node_certificates, revoked_nodes

    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    revoked = revoked_nodes(repo)
    certs = node_certificates(repo)
    out.document(
        {
            "nodes": [
                {
                    "node": c.node,
                    "id": c.node_id,
                    "certificate": c.name,
                    "capabilities": list(c.capabilities),
                    "config_version": c.config_version,
                    "revoked": c.name in revoked,
                }
                for c in certs
            ]
        }
    )
    for c in certs:
        state = "REVOKED" if c.name in revoked else ""
        out.line(f"{c.node:<16} {c.node_id[:16]}  {','.join(c.capabilities):<20} {state}".rstrip())
    if not certs:
        out.line("no node is certified for this repository (`bunker key new-node CARD` certifies one)")


@node.command("status")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
@handles_errors
def status_cmd(directory: str, **kwargs: Any) -> None:
    """What the node holds per repository, and what each upstream still lacks."""
    from bunker.cli.cmd_status import describe_row
    from bunker.node.node_dir import NodeDir
    from bunker.node.node_status import node_status
    out = _out(kwargs)
    nd = NodeDir(directory)
    doc = node_status(nd)
    out.document(doc)
    out.line(f"node {nd.name} ({nd.config.node_id[:16]}) in {nd.root}")
    for r in doc["repositories"]:
        settings = r["settings"]
        bound = human_bytes(settings["max_size"]) if settings["max_size"] else "unbounded"
        given = settings["from_policy"]
        out.line(
            f"repository {r['repository'][:16]}: holds {r['objects']} objects ({human_bytes(r['bytes'])}, "
            f"bound {bound})"
        )
        if given:
            out.line(f"  policy version {settings['policy_version']} sets for this node: {', '.join(given)}")
        for u in r["upstreams"]:
            out.line(
                f"  upstream {u['name']:<12} lacks {u['owed_objects']} objects ({human_bytes(u['owed_bytes'])}), "
                f"{u['recorded']} recorded at the top"
                + (
                    f", the newest {time.strftime('%Y-%m-%d %H:%M', time.localtime(u['last_recorded']))}"
                    if u.get("last_recorded")
                    else ""
                )
            )
        if r["policy"]:
            out.line(f"  policy version {r['policy']['version']} in force here (passed down to the clients)")
        if r["requests"]["pending"]:
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["requests"]["oldest"]))
            n = r["requests"]["pending"]
            out.line(f"  {n} restore request(s) wait for data from upstream, oldest since {since} (`node requests`)")
        if r["witnessed"]:
            n = len(r["witnessed"])
            out.line(f"  witnesses the newest snapshot of {n} client(s) at the top (`bunker node witness`)")
        for c in r["clients"]:
            at_top = f"; at the top up to #{c['top_head']['seq']}" if c["top_head"] else "; none at the top yet"
            out.line(f"  client {describe_row(c)}{at_top}")
    if doc["key_rotation"] and doc["key_rotation"]["waiting_links"]:
        waiting = doc["key_rotation"]["waiting_links"]
        out.line(
            f"key rotation: link{'s' if len(waiting) > 1 else ''} {', '.join(waiting)} still on the previous key, "
            "until the far node takes the new card"
        )
    sys.exit(_exit([(p["level"], p["code"], p["message"]) for p in doc["problems"]]))


@node.group("downstream")
def downstream() -> None:
    """Nodes that send their data to this one."""


@downstream.command("add")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name")
@click.option("--link", "link_url", required=True, metavar="URL", help="The mailbox shared with the far node.")
@click.option(
    "--card", "card_file", required=True, type=click.Path(dir_okay=False, exists=True), help="The far node's card."
)
@json_option
@handles_errors
def downstream_add(directory: str, name: str, link_url: str, card_file: str, **kwargs: Any) -> None:
    """Add a downstream node reached through a mailbox (it adds this node as its --link upstream)."""
    from bunker.node.upstreams import add_downstream

    out = _out(kwargs)
    down = add_downstream(directory, name, link_url, card_file)
    out.document({"downstream": down.name, "url": down.url, "peer": down.peer})
    out.line(f"downstream {down.name}: link {down.url} <- node {down.peer_name} ({down.peer[:16]})")


@node.command("import")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name", required=False)
@json_option
@handles_errors
def import_cmd(directory: str, name: str | None, **kwargs: Any) -> None:
    """Take in the pieces waiting in the node's mailboxes (or only link NAME's)."""
    from bunker.node.eviction import evict_all
    from bunker.node.link_import import import_all
    from bunker.node.node_dir import NodeDir
    from bunker.node.staleness import stale_problems

    out = _out(kwargs)
    nd = NodeDir(directory)
    with nd.moving():  # waits for a daemon's cycle under way
        reports, problems = import_all(nd, name)
        evictions, full = evict_all(nd)
    problems += full + stale_problems(nd)
    out.document(
        {
            "node": nd.name,
            "imports": [r.to_json() for r in reports],
            "evicted": [e.to_json() for e in evictions],
            "problems": [{"level": lv, "code": c, "message": m} for lv, c, m in problems],
        }
    )
    for r in reports:
        out.line(r.summary())
    _report_evictions(out, evictions)
    sys.exit(_exit(problems))


def _report_evictions(out: Output, evictions: list[Any]) -> None:
    for e in evictions:
        out.line(
            f"evicted {len(e.evicted)} packs ({human_bytes(e.evicted_bytes)}) of repository {e.repo_id[:16]}, recorded "
            f"upstream: the store holds {human_bytes(e.used_after)} of {human_bytes(e.bound)}"
        )


def _exit(problems: list[tuple[str, str, str]]) -> int:
    for level, _code, message in problems:
        click.echo(f"{level}: {message}", err=True)
    levels = {p[0] for p in problems}
    return ExitCode.ERR if "err" in levels else ExitCode.WARN if "warn" in levels else ExitCode.OK

