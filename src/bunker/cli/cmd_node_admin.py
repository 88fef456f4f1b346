"""bunker node rotate-key: changing a node's key (docs/hierarchy.md)."""

from __future__ import annotations

from typing import Any

import click

from bunker.cli.cmd_node import _out, json_option, node
from bunker.cli.files import write_output
from bunker.cli.main import handles_errors


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
