"""bunker node rotate-key | quota | abandon-after: changing a node's key, bounding its writers, and
how long dead backups' checkpoints wait for their clients (docs/hierarchy.md)."""

from __future__ import annotations

from typing import Any

import click

from bunker.cli.cmd_node import _out, json_option, node
from bunker.cli.files import write_output
from bunker.cli.main import handles_errors
from bunker.cli.output import human_bytes


@node.command("rotate-key")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", "dest", type=click.Path(dir_okay=False), help="Write the new card to FILE [default: stdout].")
@json_option
@handles_errors
def rotate_key_cmd(directory: str, dest: str | None, **kwargs: Any) -> None:
    """Give the node a new key; its links move to it once the far nodes know the new card."""
    from bunker.node.node_dir import NodeDir
    from bunker.node.rotation import rotate_key

    out = _out(kwargs)
    before = NodeDir(directory)
    rotation = rotate_key(before)
    nd = NodeDir(directory)
    card = nd.card()
    doc: dict[str, Any] = {
        "node": nd.name,
        "previous_id": rotation.previous,
        "id": rotation.current,
        "waiting_links": sorted(rotation.pending),
    }
    if dest:
        write_output(dest, card, "the node card")
        doc["card"] = dest
    elif not out.json:
        click.echo(card, nl=False)
    else:
        doc["card_text"] = card
    out.document(doc)
    where = dest or "the card above"
    out.info(
        f"node {nd.name} has a new key {rotation.current[:16]} (the old one {rotation.previous[:16]} is kept as "
        f"node.key.previous). Next: certify {where} at the top with `bunker key new-node CARD --caps ...` (the "
        "capabilities the node has now); its links go on with the old key until the far nodes hold that "
        "certificate and take the new card, which forward and import do by themselves"
    )


@node.command("quota")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("client")
@click.argument("size")
@json_option
@handles_errors
def quota_cmd(directory: str, client: str, size: str, **kwargs: Any) -> None:
    """Bound what CLIENT (client name or certificate id) may leave undelivered here; SIZE none: no bound."""
    from bunker.node.node_dir import NodeDir, parse_size
    from bunker.node.quota import find_client

    out = _out(kwargs)
    nd = NodeDir(directory)
    key = find_client(nd, client)
    if size.strip().lower() in ("none", "off"):
        nd.config.quotas.pop(key, None)
        bound = None
    else:
        bound = parse_size(size)
        nd.config.quotas[key] = bound
    nd.save()
    out.document({"node": nd.name, "client": key, "quota": bound})
    if bound is None:
        out.line(f"node {nd.name}: no quota for {key} any more")
    else:
        out.line(
            f"node {nd.name}: {key} may leave at most {human_bytes(bound)} undelivered here; beyond it its backups "
            "stay in its own spool until the node forwarded what it holds (new connections apply it)"
        )


@node.command("abandon-after")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("age")
@json_option
@handles_errors
def abandon_after_cmd(directory: str, age: str, **kwargs: Any) -> None:
    """How long a dead backup's last checkpoint waits here for its client (AGE, e.g. 14d) before the
    node gives it up to the repository of record, whose prune adopts it."""
    from bunker.node.node_dir import NodeDir
    from bunker.node.spool import parse_age

    out = _out(kwargs)
    nd = NodeDir(directory)
    nd.config.abandon_after = int(parse_age(age))
    nd.save()
    out.document({"node": nd.name, "abandon_after": nd.config.abandon_after})
    out.line(
        f"node {nd.name}: the last checkpoint of a backup dead for {nd.config.abandon_after / 86400:g} days that its "
        "client did not adopt is given up to the repository of record at the next `bunker node forward`"
    )
