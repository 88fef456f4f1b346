"""Adding a node's upstreams (docs/hierarchy.md, "Up").

A *direct* upstream is the repository of record itself, on any backend: adding it opens the
repository there and records its id, so a wrong URL is refused now rather than at the first
delivery. A *link* upstream is another node reached through a mailbox (a folder on a carried
disk, an sftp directory, an S3 prefix): adding it pins the far node's card, whose keys seal and
sign what crosses the link.
"""

from __future__ import annotations

import base64
import os
import time

from bunker.errors import ExitCode
from bunker.node.node_dir import NodeDir, NodeError, Upstream, parse_card
from bunker.repo.node_certs import node_name_problem
from bunker.repo.repository import Repository
from bunker.storage.url import local_path, open_backend


def _check_name(nd: NodeDir, name: str) -> None:
    problem = node_name_problem(name)
    if problem:
        raise NodeError(f"cannot name a link {name!r}: {problem}", "choose another name", exit_code=ExitCode.USAGE)
    if any(u.name == name for u in (*nd.config.upstreams, *nd.config.downstreams)):
        raise NodeError(
            f"node {nd.name} already has an upstream or downstream named {name!r}",
            "choose another name, or edit node.json to change it",
            exit_code=ExitCode.USAGE,
        )


def _link(nd: NodeDir, name: str, link_url: str, card_file: str | None, piece_size: int | None) -> Upstream:
    if not card_file:
        raise NodeError(
            "a link needs the far node's card",
            "get it with `bunker node card DIR` on the far node's machine and pass it with --card FILE",
            exit_code=ExitCode.USAGE,
        )
    with open(card_file, encoding="utf-8") as f:
        peer_name, public = parse_card(f.read(), card_file)
    if public.node_id == nd.config.node_id:
        raise NodeError("that card is this node's own", "pass the far node's card", exit_code=ExitCode.USAGE)
    path = local_path(link_url)
    return Upstream(
        name=name,
        kind="link",
        url=link_url if path is None else os.path.abspath(path),
        peer=public.node_id,
        peer_name=peer_name,
        card=base64.b64encode(public.to_bytes()).decode(),
        piece_size=piece_size or 0,
        added=time.time(),
    )


def add_downstream(directory: str, name: str, link_url: str, card_file: str | None) -> Upstream:
    """Add a downstream link ``name`` (a node that sends its data here) and save it."""
    nd = NodeDir(directory)
    _check_name(nd, name)
    down = _link(nd, name, link_url, card_file, None)
    nd.config.downstreams.append(down)
    nd.save()
    return down


def add_upstream(
    directory: str,
    name: str,
    direct_url: str | None,
    link_url: str | None,
    card_file: str | None,
    piece_size: int | None = None,
) -> Upstream:
    """Add upstream ``name`` to the node at ``directory`` and save its configuration."""
    nd = NodeDir(directory)
    _check_name(nd, name)
    if bool(direct_url) == bool(link_url):
        raise NodeError(
            "an upstream is either --direct URL or --link URL --card FILE",
            "give exactly one of them",
            exit_code=ExitCode.USAGE,
        )
    if direct_url:
        if card_file:
            raise NodeError("--card goes with --link only", "drop --card", exit_code=ExitCode.USAGE)
        path = local_path(direct_url)
        url = direct_url if path is None else path
        backend = open_backend(url)
        try:
            repo = Repository.open(backend, None, floor=False)
        finally:
            backend.close()
        if repo.repo_id not in nd.repositories():
            raise NodeError(
                f"the repository at {direct_url} ({repo.repo_id}) is not one node {nd.name} relays",
                f"seed the node with it first: `bunker node export-seed --repo {direct_url} FILE` and "
                f"`bunker node seed {nd.root} FILE`",
                exit_code=ExitCode.USAGE,
            )
        up = Upstream(name=name, kind="direct", url=url, repo=repo.repo_id, added=time.time())
    else:
        assert link_url is not None
        up = _link(nd, name, link_url, card_file, piece_size)
    nd.config.upstreams.append(up)
    nd.save()
    return up
