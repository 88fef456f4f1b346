"""Which config version is the repository's, and what a reader must refuse (docs/format.md 8).

Format-2 configs form a hash chain: each names the version it follows (``prev``), and a version
that joins two branches names the other heads (``merges``). The highest version is the current
one. Two rules close what deleting or adding configs could do:

- **Floor.** Every reader remembers the highest version it has seen (``ConfigFloor``, in this
  machine's state directory; put keys carry the version current when they were issued) and
  refuses a repository whose current config is lower, or does not descend from the one it saw:
  deleting the newest config (to undo a revocation) is a rollback, never silently accepted.
- **Forks.** Two configs with one version, or a version no later version descends from, are
  branches only the master key could have made (two administrators at once, or a master working
  from a stale copy). Readers then apply every branch's revocations together and refuse to write
  until the master key writes a version that merges them (`bunker key merge-configs`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

from bunker import dirs
from bunker.repo.config import LEGACY_FORMAT, RepoConfig, Revocation


@dataclass(frozen=True)
class ConfigChain:
    """The verified configs of one repository id, resolved."""

    current: RepoConfig
    name: str  # config/<hex> of ``current``
    ancestors: frozenset[str]  # names ``current`` descends from, itself included
    fork: tuple[str, ...] = ()  # heads of branches ``current`` does not descend from (sorted)
    revocations: dict[str, tuple[Revocation, ...]] = field(default_factory=dict)  # every branch's, per cert
    legacy: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def forked(self) -> bool:
        return bool(self.fork)


def resolve(configs: dict[str, RepoConfig]) -> ConfigChain:
    """Resolve the valid configs of one repository id (name -> config; at least one)."""
    top_version = max(c.version for c in configs.values())
    tops = sorted(n for n, c in configs.items() if c.version == top_version)
    name = tops[-1]
    ancestors, gap = _ancestors(configs, name)
    fork = set(tops[:-1])
    for n, c in configs.items():
        # below a missing link nothing is known: those versions are a gap (check reports it), not a fork
        if n not in ancestors and c.format != LEGACY_FORMAT and c.version >= gap:
            fork.add(n)
    # a branch head is a forked config no other forked config descends from
    fork_ancestors: set[str] = set()
    for n in fork:
        fork_ancestors |= _ancestors(configs, n)[0] - {n}
    heads = tuple(sorted(fork - fork_ancestors))
    branches = [configs[name], *(configs[h] for h in heads)]
    revocations: dict[str, tuple[Revocation, ...]] = {}
    legacy: dict[str, tuple[str, ...]] = {}
    for cfg in branches:
        for r in cfg.revoked:
            if r not in revocations.get(r.client, ()):
                revocations[r.client] = (*revocations.get(r.client, ()), r)
        for cert, head in cfg.legacy.items():
            legacy.setdefault(cert, head)
    return ConfigChain(configs[name], name, frozenset(ancestors), heads, revocations, legacy)


def _ancestors(configs: dict[str, RepoConfig], start: str) -> tuple[set[str], int]:
    """``start`` and every config it descends from through ``prev`` and ``merges``, and the
    highest version whose predecessor is missing (0: none; versions below it are beyond a gap).
    A format-1 config (before chains existed) stands for every format-1 config: `bunker
    migrate` chained the first format-2 version to the format-1 one it had chosen."""
    seen: set[str] = set()
    gap = 0
    todo = [start]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        cfg = configs.get(n)
        if cfg is None:
            continue
        if cfg.format == LEGACY_FORMAT:
            seen |= {m for m, c in configs.items() if c.format == LEGACY_FORMAT}
            continue
        links = [p for p in (cfg.prev, *cfg.merges) if p]
        if any(p not in configs for p in links) or (not links and cfg.version > 1):
            gap = max(gap, cfg.version)
        todo += links
    return seen, gap


def missing_links(configs: dict[str, RepoConfig], chain: ConfigChain) -> list[tuple[str, str]]:
    """(config, the missing config it names) along the current chain: deleted versions."""
    out = []
    for n in sorted(chain.ancestors):
        cfg = configs.get(n)
        if cfg is None or cfg.format == LEGACY_FORMAT:
            continue
        out += [(n, p) for p in (cfg.prev, *cfg.merges) if p and p not in configs]
    return out


@dataclass(frozen=True)
class Floor:
    """The highest config a reader has seen: version and object name."""

    version: int
    name: str
    source: str  # where the floor comes from, for messages ("this machine", "the put key")


def floor_problem(chain: ConfigChain, floor: Floor) -> tuple[str, str] | None:
    """("rollback" | "diverged", message) when ``chain`` breaks ``floor``; None when it holds."""
    cur = chain.current
    if cur.version < floor.version:
        return "rollback", (
            f"the repository's config is version {cur.version} ({chain.name}), but {floor.source} has seen version "
            f"{floor.version} ({floor.name}): newer configs were deleted or the repository was rolled back, which "
            "can undo a revocation"
        )
    if floor.name and floor.name not in chain.ancestors:
        return "diverged", (
            f"the repository's config version {cur.version} ({chain.name}) does not descend from version "
            f"{floor.version} ({floor.name}), which {floor.source} has seen: the config history was forked or "
            "rewritten"
        )
    return None


class ConfigFloor:
    """This machine's floor for one repository id (``state/<id prefix>/config-floor.json`` in
    the data directory). Losing the file costs only the floor, never data."""

    def __init__(self, repo_id: str) -> None:
        self.path = os.path.join(dirs.data_dir(), "state", repo_id[:32], "config-floor.json")

    def load(self) -> Floor | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
            return Floor(int(d["version"]), str(d["name"]), "this machine")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def raise_to(self, version: int, name: str) -> None:
        """Remember ``version`` if it is higher than the floor (best effort: a reader on a
        read-only home still reads)."""
        from bunker.crypto.keyfile import write_private_file

        old = self.load()
        if old is not None and old.version >= version:
            return
        with contextlib.suppress(OSError):
            write_private_file(self.path, json.dumps({"version": version, "name": name}))
