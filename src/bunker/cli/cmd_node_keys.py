"""key new-node | revoke-node: what the master key says about nodes (docs/hierarchy.md)."""

from __future__ import annotations

import os
from typing import Any

import click

from bunker.cli import context
from bunker.cli.cmd_key import key
from bunker.cli.files import check_writable, write_output
from bunker.cli.main import common, handles_errors, make_options
from bunker.errors import BunkerError, ExitCode
from bunker.repo.node_certs import NODE_CAPABILITIES


def _caps(text: str) -> tuple[str, ...]:
    caps = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in caps if c not in NODE_CAPABILITIES]
    if unknown or not caps:
        raise BunkerError(
            f"--caps {text!r} names unknown capabilities" if unknown else "--caps is empty",
            f"use a comma-separated list of {', '.join(NODE_CAPABILITIES)} (e.g. --caps relay,record)",
            exit_code=ExitCode.USAGE,
        )
    return caps


@key.command("new-node")
@common
@click.argument("card_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--caps", default="relay", show_default=True, help="relay, record, mirror (comma-separated).")
@click.option("--seed-out", type=click.Path(dir_okay=False), help="Also write a seed file for the node to FILE.")
@handles_errors
def new_node(card_file: str, caps: str, seed_out: str | None, **kwargs: Any) -> None:
    """Certify a node from its card (needs the master key)."""
    from bunker.node.node_dir import parse_card
    from bunker.node.seeding import export_seed
    from bunker.repo.authority import issue_node

    capabilities = _caps(caps)
    with open(card_file, encoding="utf-8") as f:
        name, public = parse_card(f.read(), card_file)
    if seed_out:
        check_writable(seed_out, "the seed file")
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    context.refuse_on_node(repo, "`bunker key new-node`")
    master = context.load_master(opts, repo, "certifying a node")
    cert = issue_node(repo, master, name, public, capabilities)
    doc: dict[str, Any] = {
        "node": cert.node,
        "id": cert.node_id,
        "certificate": cert.name,
        "capabilities": list(cert.capabilities),
        "config_version": cert.config_version,
    }
    out.line(f"certified node {cert.node} ({cert.node_id[:16]}) with {', '.join(cert.capabilities)}: {cert.name}")
    if seed_out:
        write_output(seed_out, export_seed(repo), "the seed file")
        doc["seed"] = os.path.abspath(seed_out)
        out.line(f"seed file for the node written to {seed_out}: `bunker node seed DIR {seed_out}` on the node")
    out.document(doc)


@key.command("revoke-node")
@common
@click.argument("node")
@handles_errors
def revoke_node_cmd(node: str, **kwargs: Any) -> None:
    """Stop trusting a node (by name, id prefix or certificate): its receipts free nothing and
    its bundles are refused once the new config reaches the other nodes."""
    from bunker.repo.authority import revoke_node
    from bunker.repo.node_certs import node_certificates, revoked_nodes

    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    context.refuse_on_node(repo, "`bunker key revoke-node`")
    revoked = revoked_nodes(repo)
    found = [
        c
        for c in node_certificates(repo)
        if c.name not in revoked and (node in (c.node, c.name) or (len(node) >= 8 and c.node_id.startswith(node)))
    ]
    if not found:
        raise BunkerError(
            f"no trusted node certificate matches {node!r}",
            "`bunker node list --repo URL` shows the certified nodes",
            exit_code=ExitCode.USAGE,
        )
    if len({c.node_id for c in found}) > 1:
        raise BunkerError(
            f"{node!r} matches several nodes: " + ", ".join(f"{c.node} ({c.node_id[:16]})" for c in found),
            "name the node by its id (at least 8 hex digits)",
            exit_code=ExitCode.USAGE,
        )
    master = context.load_master(opts, repo, "revoking a node")
    cfg = None
    for cert in found:
        cfg = revoke_node(repo, master, cert)
    assert cfg is not None
    out.document({"revoked": [c.name for c in found], "config_version": cfg.version})
    out.line(f"revoked node {found[0].node} ({found[0].node_id[:16]}); config version {cfg.version}")
