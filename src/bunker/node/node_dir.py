"""A node directory: a node's configuration, its key and its state (docs/hierarchy.md).

Layout of ``DIR``:

- ``node.json``: name, store path and size bound, upstreams, eviction rule, staleness bound, and
  ``abandon_after`` (seconds after which a dead backup's checkpoint no client adopted is given up
  to the top: node/abandon.py);
- ``node.key``: the node seed (32 random bytes; every node key derives from it), 0600;
- ``node.key.previous``: the seed before the last `bunker node rotate-key` (one generation is
  kept: pieces sealed to the old key still open; node/rotation.py);
- ``state/``: per repository and link: sequence numbers, receipts, what was sent;
- the store (``DIR/store`` unless ``--store PATH``): one repository directory per repository the
  node relays (``<store>/<repository id>``), in the repository format, so clients, `check` and
  `serve` use it as any repository.

Several nodes may live on one machine (one directory each); one node may relay several
repositories. A node holds no put key and no master key: it cannot read what it carries.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3

from bunker.crypto.node_keys import NodeKeys, NodePublic
from bunker.errors import BunkerError, ExitCode
from bunker.private_files import write_private_file
from bunker.repo.node_certs import node_name_problem
from bunker.storage.local import STALE_TEMP_SECONDS, LocalBackend
from bunker.storage.node_path import NODE_FILE, REPO_ID, is_node_dir, split_node_path

__all__ = ["NODE_FILE", "REPO_ID", "NodeConfig", "NodeDir", "NodeError", "Upstream", "is_node_dir", "split_node_path"]

KEY_FILE = "node.key"
PREVIOUS_KEY_FILE = "node.key.previous"
NEXT_KEY_FILE = "node.key.next"  # only while `bunker node rotate-key` runs
CARD_KIND = "bunker node card"
NODE_FORMAT = 1
DEFAULT_STALE_AFTER = 7 * 86400  # a week without news from upstream: revocations may be missing
DEFAULT_ABANDON_AFTER = 14 * 86400  # a dead backup's checkpoint waits this long for its client (node/abandon.py)
EVICT_RULES = ("all", "any")


class NodeError(BunkerError):
    """A node directory that cannot be used as asked."""


@dataclass
class Upstream:
    """Where a node sends what it holds: the repository of record itself (``direct``) or another
    node through a mailbox (``link``)."""

    name: str
    kind: str  # "direct" | "link"
    url: str
    repo: str = ""  # direct: the repository id found at ``url`` when it was added
    peer: str = ""  # link: the far node's id
    peer_name: str = ""  # link: the far node's name (from its card)
    card: str = ""  # link: the far node's public keys (base64 of NodePublic.to_bytes())
    piece_size: int = 0  # link: largest piece written to its mailbox (0: the default)
    resend_after: float = 0.0  # link: seconds before what no receipt names is sent again (0: default)
    added: float = 0.0  # when it was added (a link never heard from is stale only after stale_after)
    previous_card: str = ""  # link: the far node's keys before its last rotation (node/rotation.py)

    def peer_public(self) -> NodePublic:
        return NodePublic.from_bytes(base64.b64decode(self.card))

    def previous_public(self) -> NodePublic | None:
        """The far node's keys before it rotated them (its pieces written before still open)."""
        return NodePublic.from_bytes(base64.b64decode(self.previous_card)) if self.previous_card else None


@dataclass
class NodeConfig:
    """The contents of ``node.json``."""

    name: str
    node_id: str
    store: str
    max_size: int | None = None
    upstreams: list[Upstream] = field(default_factory=list)
    downstreams: list[Upstream] = field(default_factory=list)  # links whose far node sends data here
    evict_after: str = "all"  # "all", "any", or a number k of upstreams
    stale_after: int = DEFAULT_STALE_AFTER
    abandon_after: int = DEFAULT_ABANDON_AFTER
    quotas: dict[str, int] = field(default_factory=dict)  # certificate or client name -> undelivered bytes
    format: int = NODE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> NodeConfig:
        try:
            raw = json.loads(text)
            ups = [Upstream(**u) for u in raw.pop("upstreams", [])]
            downs = [Upstream(**d) for d in raw.pop("downstreams", [])]
            cfg = cls(upstreams=ups, downstreams=downs, **raw)
        except (ValueError, TypeError) as exc:
            raise NodeError(
                f"the node configuration {where} is damaged: {exc}",
                "restore it from a backup of the node directory, or make the node again with `bunker node init`",
                exit_code=ExitCode.BAD_REPOSITORY,
            ) from None
        if cfg.format != NODE_FORMAT:
            raise NodeError(
                f"the node configuration {where} is of format {cfg.format}; this bunker reads {NODE_FORMAT}",
                "run the bunker version that made this node",
                exit_code=ExitCode.BAD_REPOSITORY,
            )
        return cfg


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1.5T``, ``123456`` (bytes; K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise NodeError(
            f"{text!r} is not a size", "write it like 500M, 20G or 1.5T (powers of 1024)", exit_code=ExitCode.USAGE
        )
    return int(float(m.group(1)) * 1024 ** " KMGTP".index(m.group(2).upper() or " "))


def key_text(seed: bytes) -> str:
    check = blake3.blake3(b"bunker node key check\x00" + seed).hexdigest()[:16]
    return json.dumps({"kind": "bunker node key", "v": 1, "seed": seed.hex(), "check": check}) + "\n"


def card_text(name: str, public: NodePublic) -> str:
    """The node's public card: what `bunker key new-node` certifies and a paired node pins."""
    doc = {
        "kind": CARD_KIND,
        "v": 1,
        "name": name,
        "id": public.node_id,
        "public": base64.b64encode(public.to_bytes()).decode(),
    }
    return json.dumps(doc, indent=2) + "\n"


def parse_card(text: str, where: str) -> tuple[str, NodePublic]:
    """``(name, public keys)`` of a card; refuses a card whose id is not its keys' fingerprint."""
    try:
        doc = json.loads(text)
        if doc.get("kind") != CARD_KIND:
            raise ValueError("not a node card")
        public = NodePublic.from_bytes(base64.b64decode(doc["public"], validate=True))
        name = str(doc["name"])
        if doc.get("id") != public.node_id:
            raise ValueError("its id is not the fingerprint of its keys")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NodeError(
            f"{where} is not a usable node card ({exc})",
            "make it again with `bunker node card DIR` on the node's machine and copy it whole",
            exit_code=ExitCode.USAGE,
        ) from None
    if node_name_problem(name):
        raise NodeError(f"{where} names the node {name!r}, which is not a node name", "make the card again")
    return name, public


class NodeDir:
    """An existing node directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        where = os.path.join(self.root, NODE_FILE)
        try:
            with open(where, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise NodeError(
                f"{self.root} is not a node directory (no {NODE_FILE})",
                "make one with `bunker node init DIR`, or check the path",
                exit_code=ExitCode.NO_REPOSITORY,
            ) from None
        except PermissionError:
            raise NodeError(
                f"may not read the node directory {self.root} (permission denied)",
                "run the command as the user that owns the node directory",
                exit_code=ExitCode.FATAL,
            ) from None
        self.config = NodeConfig.from_json(text, where)
        self._keys: NodeKeys | None = None

    # ------------------------------------------------------------------ making one

    @classmethod
    def init(
        cls,
        root: str,
        name: str,
        store: str | None = None,
        max_size: int | None = None,
        abandon_after: int = DEFAULT_ABANDON_AFTER,
    ) -> NodeDir:
        """Make a new node directory with a fresh node key."""
        root = os.path.abspath(root)
        problem = node_name_problem(name)
        if problem:
            raise NodeError(
                f"cannot name a node {name!r}: {problem}", "choose another --name", exit_code=ExitCode.USAGE
            )
        if os.path.exists(os.path.join(root, NODE_FILE)):
            raise NodeError(
                f"{root} is already a node directory",
                "use it as it is, or choose another directory",
                exit_code=ExitCode.USAGE,
            )
        if os.path.isdir(root) and any(not n.startswith(".") for n in os.listdir(root)):
            raise NodeError(f"{root} is not empty", "make a node in a new or empty directory", exit_code=ExitCode.USAGE)
        os.makedirs(root, mode=0o700, exist_ok=True)
        seed = os.urandom(32)
        keys = NodeKeys.from_seed(seed)
        write_private_file(os.path.join(root, KEY_FILE), key_text(seed))
        cfg = NodeConfig(
            name=name,
            node_id=keys.public().node_id,
            store=os.path.abspath(store) if store else os.path.join(root, "store"),
            max_size=max_size,
            abandon_after=abandon_after,
        )
        os.makedirs(cfg.store, mode=0o700, exist_ok=True)
        write_private_file(os.path.join(root, NODE_FILE), cfg.to_json())
        return cls(root)

    def save(self) -> None:
        write_private_file(os.path.join(self.root, NODE_FILE), self.config.to_json())

    # ------------------------------------------------------------------ keys

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def keys(self) -> NodeKeys:
        """The node's current keys (node.key)."""
        if self._keys is None:
            where = os.path.join(self.root, KEY_FILE)
            keys = read_key_file(where)
            if keys.public().node_id != self.config.node_id:
                nxt = os.path.join(self.root, NEXT_KEY_FILE)
                if os.path.exists(nxt) and read_key_file(nxt).node_id == self.config.node_id:
                    # a `rotate-key` stopped between saving node.json and renaming the new key
                    os.replace(nxt, where)
                    return self.keys
                raise NodeError(
                    f"the node key {where} is not the key of node {self.name} ({self.config.node_id[:16]})",
                    "put this node's own node.key back",
                    exit_code=ExitCode.BAD_REPOSITORY,
                )
            self._keys = keys
        return self._keys

    @property
    def previous_keys(self) -> NodeKeys | None:
        """The node's keys before its last rotation (node.key.previous), if it rotated."""
        where = os.path.join(self.root, PREVIOUS_KEY_FILE)
        return read_key_file(where) if os.path.exists(where) else None

    def card(self) -> str:
        return card_text(self.name, self.keys.public())

    # ------------------------------------------------------------------ stores and state

    def store_path(self, repo_id: str) -> str:
        return os.path.join(self.config.store, repo_id)

    def repositories(self) -> list[str]:
        """The ids of the repositories this node relays (seeded stores)."""
        try:
            names = os.listdir(self.config.store)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if REPO_ID.fullmatch(n) and os.path.isdir(os.path.join(self.config.store, n)))

    def store(self, repo_id: str) -> LocalBackend:
        """The store of one repository (a repository directory)."""
        if repo_id not in self.repositories():
            raise NodeError(
                f"node {self.name} does not relay repository {repo_id}",
                f"seed it first: `bunker node seed {self.root} FILE` with a seed file made at the top "
                "(`bunker node export-seed`)",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        return LocalBackend(self.store_path(repo_id))

    def only_repository(self) -> str:
        """The repository a client reaches when it names only the node directory."""
        repos = self.repositories()
        if len(repos) == 1:
            return repos[0]
        if not repos:
            raise NodeError(
                f"node {self.name} relays no repository yet",
                f"seed it: `bunker node seed {self.root} FILE` with a seed file made at the top "
                "(`bunker node export-seed`)",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        raise NodeError(
            f"node {self.name} relays {len(repos)} repositories: {', '.join(r[:16] for r in repos)}",
            f"name one in the URL: {self.root}/<repository id> (the id is in your put key: `bunker key info`)",
            exit_code=ExitCode.USAGE,
        )

    def state_dir(self, *parts: str) -> str:
        path = os.path.join(self.root, "state", *parts)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def scratch_dir(self, name: str) -> str:
        """A state folder for files one command writes and removes again (a bundle's pieces
        before they go into a mailbox, a piece fetched for import). A process killed meanwhile
        leaves its file there: files older than STALE_TEMP_SECONDS are removed on the way in,
        which no file still in use reaches (a piece is written and put within minutes)."""
        path = self.state_dir(name)
        now = time.time()
        with os.scandir(path) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > (
                        STALE_TEMP_SECONDS
                    ):
                        os.unlink(entry.path)
        return path

    @contextlib.contextmanager
    def moving(self) -> Iterator[None]:
        """Hold the node's data-moving lock (an flock on ``state/moving.lock``, released by the
        kernel whatever ends the process): forwards, imports and evictions of one node never run
        at once, whether a daemon's cycle or a command run by hand (sequence numbers, sent logs
        and receipt chains are read, advanced and written by each)."""
        fd = os.open(os.path.join(self.state_dir(), "moving.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def upstream(self, name: str) -> Upstream:
        for u in self.config.upstreams:
            if u.name == name:
                return u
        known = ", ".join(u.name for u in self.config.upstreams) or "none"
        raise NodeError(
            f"node {self.name} has no upstream {name!r} (it has: {known})",
            f"add it with `bunker node upstream add {self.root} {name} --direct URL | --link URL --card FILE`",
            exit_code=ExitCode.USAGE,
        )


def read_key_file(where: str) -> NodeKeys:
    """The node keys of a key file (node.key or node.key.previous), checked against its checksum."""
    try:
        with open(where, encoding="utf-8") as f:
            doc = json.loads(f.read())
        seed = bytes.fromhex(doc["seed"])
        ok = len(seed) == 32 and json.loads(key_text(seed))["check"] == doc["check"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NodeError(
            f"the node key {where} cannot be read ({exc})",
            "restore it from a backup of the node directory; without node.key the node must be made again "
            "and certified anew (`bunker node init`, `bunker key new-node`)",
            exit_code=ExitCode.BAD_REPOSITORY,
        ) from None
    if not ok:
        raise NodeError(
            f"the node key {where} is damaged (its checksum does not match)",
            "restore it from a backup of the node directory",
            exit_code=ExitCode.BAD_REPOSITORY,
        )
    return NodeKeys.from_seed(seed)


def read_json(path: str, default: Any) -> Any:
    """A small state file, or ``default`` when it does not exist yet."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def write_json(path: str, value: Any) -> None:
    write_private_file(path, json.dumps(value, sort_keys=True) + "\n")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
