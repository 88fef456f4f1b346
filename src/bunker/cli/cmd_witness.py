"""bunker node witness, and the statements `bunker check --witness PATH` reads: what a node saw
the repository of record hold, signed by the node (docs/hierarchy.md, "Witnesses")."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from bunker.cli.cmd_node import _out, json_option, node
from bunker.cli.files import write_output
from bunker.cli.main import handles_errors
from bunker.errors import BunkerError, ExitCode
from bunker.repo.witnesses import Source
from bunker.storage.node_path import is_node_dir


@node.command("witness")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--repo", "repo_id", metavar="ID", help="The repository (needed when the node relays several).")
@click.option("--out", "dest", required=True, type=click.Path(dir_okay=False), help="Write the statement to FILE.")
@json_option
@handles_errors
def witness_cmd(directory: str, repo_id: str | None, dest: str, **kwargs: Any) -> None:
    """Sign what the node saw the repository of record hold (for `bunker check --witness FILE`)."""
    from bunker.node.node_dir import NodeDir
    from bunker.node.witnessed import statement_for, witnessed_heads

    out = _out(kwargs)
    nd = NodeDir(directory)
    rid = repo_id.strip().lower() if repo_id else nd.only_repository()
    data = statement_for(nd, rid)
    heads = witnessed_heads(nd, rid)
    write_output(dest, data, "the witness statement")
    out.document(
        {
            "node": nd.name,
            "id": nd.config.node_id,
            "repository": rid,
            "statement": os.path.abspath(dest),
            "bytes": len(data),
            "heads": [h.to_body() for h in heads],
        }
    )
    out.line(
        f"node {nd.name} witnesses {len(heads)} client chain head(s) of repository {rid[:16]}; statement written to "
        f"{dest}"
    )
    for h in heads:
        out.line(f"  {h.cert[:24]}… #{h.seq} {h.snapshot[:24]}…: {h.describe()}")
    if not heads:
        out.info(
            f"node {nd.name} has not seen the repository of record hold any snapshot yet: the statement witnesses "
            "nothing until a `bunker node forward` to a direct upstream or an import of record receipts"
        )
    out.info(f"use it where the repository of record is checked: `bunker check --witness {dest}`")


def witness_sources(paths: tuple[str, ...]) -> list[Source]:
    """What `check --witness` reads: a statement file, or a node directory (the statement is
    made in memory from the node's state, signed with its key)."""
    out: list[Source] = []
    for p in paths:
        if is_node_dir(p):
            out.append((p, _from_node(p)))
        elif os.path.isdir(p):
            raise BunkerError(
                f"--witness {p} is a directory but not a node directory (no node.json)",
                "name a witness statement file (`bunker node witness DIR --out FILE` writes one) or a node directory",
                exit_code=ExitCode.USAGE,
            )
        else:
            out.append((p, _from_file(p)))
    return out


def _from_node(path: str) -> Callable[[str], bytes]:
    def make(repo_id: str) -> bytes:
        from bunker.node.node_dir import NodeDir
        from bunker.node.witnessed import statement_for

        return statement_for(NodeDir(path), repo_id)

    return make


def _from_file(path: str) -> Callable[[str], bytes]:
    def read(_repo_id: str) -> bytes:
        with open(path, "rb") as f:
            return f.read(8 << 20)

    return read
