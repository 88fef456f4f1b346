"""Seed files: what a node needs to serve a repository before anything came down a link
(docs/hierarchy.md, "Setting up a node").

A seed file holds the repository's public records: every config version, client certificate and
node certificate, and a checksum over them all (a file damaged in transit is refused whole).
RECOVERY.md and FORMAT.md are written anew on the node from the config. Nothing in it is secret
(all of it is readable by anyone who holds the repository). `bunker node export-seed` writes one at the top (or on any
copy); `bunker node seed DIR FILE` adds its repository to a node, or adds what is new to a node
that already relays it. Every object is checked against its name, and the configs against the
repository id the file claims, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

from bunker import encoding
from bunker.errors import BunkerError, ExitCode
from bunker.node.node_dir import NodeDir, NodeError
from bunker.repo.config import parse_config
from bunker.repo.objects import content_hash, is_hash_name
from bunker.repo.repository import Repository
from bunker.storage.backend import Backend
from bunker.storage.local import LocalBackend

SEED_MAGIC = b"BKSEED01"
SEED_PREFIXES = ("config/", "clients/", "nodes/")
CHECKSUM = 32
MAX_SEED = 256 << 20


@dataclass
class Seeded:
    repo_id: str
    added: int  # objects new to the node's store
    present: int  # objects it already had
    created: bool  # the node did not relay this repository before


def seed_objects(backend: Backend) -> dict[str, bytes]:
    """The objects of a seed, read from a repository."""
    out: dict[str, bytes] = {}
    for prefix in SEED_PREFIXES:
        for info in backend.list(prefix):
            out[info.name] = backend.get(info.name)
    return out


def export_seed(repo: Repository) -> bytes:
    """A seed file for ``repo``."""
    payload = encoding.pack({"repo": repo.repo_id, "objects": seed_objects(repo.backend)})
    return SEED_MAGIC + payload + blake3.blake3(payload).digest()


def _refuse(where: str, problem: str) -> BunkerError:
    return NodeError(
        f"{where} is not a usable seed file: {problem}",
        "make it again at the top with `bunker node export-seed --repo URL FILE` and copy it whole",
        exit_code=ExitCode.USAGE,
    )


def read_seed(data: bytes, where: str) -> tuple[str, dict[str, bytes]]:
    """``(repository id, objects)`` of a seed file, every object checked."""
    if len(data) > MAX_SEED or not data.startswith(SEED_MAGIC):
        raise _refuse(where, "it does not start like one")
    payload, checksum = data[len(SEED_MAGIC) : -CHECKSUM], data[-CHECKSUM:]
    if blake3.blake3(payload).digest() != checksum:
        raise _refuse(where, "it is damaged (its checksum does not match: truncated or altered in transit)")
    try:
        doc = encoding.expect_map(encoding.unpack(payload), "repo", "objects")
        repo_id = encoding.field(doc, "repo", str)
        objects = encoding.field(doc, "objects", dict)
    except encoding.FormatError as exc:
        raise _refuse(where, str(exc)) from None
    configs = 0
    for name, body in objects.items():
        if not isinstance(name, str) or not isinstance(body, bytes):
            raise _refuse(where, "it holds a malformed entry")
        if not name.startswith(SEED_PREFIXES) or not is_hash_name(name):
            raise _refuse(where, f"it holds {name[:80]!r}, which a seed never carries")
        if content_hash(body) != name.split("/", 1)[1]:
            raise _refuse(where, f"{name}'s bytes do not match its name (damaged in transit)")
        if name.startswith("config/"):
            try:
                cfg = parse_config(body)
            except encoding.FormatError as exc:
                raise _refuse(where, f"{name}: {exc}") from None
            if cfg.repo_id != repo_id:
                raise _refuse(where, f"{name} belongs to repository {cfg.repo_id}, not {repo_id}")
            configs += 1
    if not configs:
        raise _refuse(where, "it holds no config")
    return repo_id, objects


def import_seed(node: NodeDir, data: bytes, where: str) -> Seeded:
    """Add the seed's repository (or what is new of it) to ``node``'s store."""
    repo_id, objects = read_seed(data, where)
    created = repo_id not in node.repositories()
    store = LocalBackend(node.store_path(repo_id), create=True)
    added = present = 0
    for name in sorted(objects, key=lambda n: (not n.startswith("config/"), n)):
        if store.put(name, objects[name], if_absent=True):
            added += 1
        else:
            present += 1
    # the store must open as the repository the seed claims (the configs verify, the chain resolves)
    repo = Repository.open(store, repo_id, floor=False)
    repo.write_documents()  # RECOVERY.md and FORMAT.md, from the config: a node's copy is restorable too
    return Seeded(repo_id, added, present, created)
