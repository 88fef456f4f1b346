"""How a repository path names a node: a node directory holds ``node.json`` (node/node_dir.py).

A client whose repository is a node directory (or ``<node dir>/<repository id>``) starts the
node's server for the run (`bunker node serve DIR --stdio`, the forked mode: docs/hierarchy.md)
instead of writing into the directory itself. This module only recognises such paths; it lives
here because the storage layer opens repositories by URL and may not import the node layer.
"""

from __future__ import annotations

import os
import re

NODE_FILE = "node.json"
REPO_ID = re.compile(r"[0-9a-f]{64}")


def is_node_dir(path: str) -> bool:
    """True if ``path`` is a node directory (it holds ``node.json``)."""
    return os.path.isfile(os.path.join(path, NODE_FILE))


def split_node_path(path: str) -> tuple[str, str | None] | None:
    """``(node dir, repository id or None)`` if ``path`` names a node directory or
    ``<node dir>/<repository id>``; None otherwise."""
    path = os.path.abspath(path)
    if is_node_dir(path):
        return path, None
    parent, leaf = os.path.split(path)
    if REPO_ID.fullmatch(leaf) and is_node_dir(parent):
        return parent, leaf
    return None
