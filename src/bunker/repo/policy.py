"""Policy objects (``policy/<hash>``): what the owner decides for every client and node, signed
with the master key, versioned, flowing down the hierarchy with the other records (docs/format.md
section 26, docs/hierarchy.md "Policy").

A policy holds settings: defaults for every client, and per client name the settings that differ.
The settings this version knows are in ``SETTINGS``; ``fixed`` names settings a client's command
line may not override. The highest version in force wins. Two different objects with one
version are a fork: only the master key can make one (someone who holds it made two), so it is
damage, and the version below them stays in force until a new version is set.

A policy is public to whoever reads the storage (it names clients, as their certificates do);
it holds no secret. Its signature is checked by every reader, so a node that relays it cannot
change it, and a copy planted in the storage without the master key is refused.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bunker import encoding
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.objects import make_signed, name_for, parse_signed
from bunker.repo.retention import RULES, Policy, parse_duration

if TYPE_CHECKING:
    from bunker.repo.repository import Repository

MAGIC_POLICY = b"BKPO"
# setting -> (kind, what it does); ages are seconds, counts whole numbers, durations text
SETTINGS: dict[str, tuple[str, str]] = {
    **{f"keep-{r}": ("count", f"retention: `bunker forget --policy` keeps by keep-{r}") for r in RULES},
    "keep-within": ("duration", "retention: keep every snapshot this much younger than the newest (2d, 1y6m)"),
    "checkpoint-interval": ("age", "backup: persist progress this often unless the command line says otherwise"),
    "silent-after": ("age", "status: flag a client whose newest status record is older than this"),
}
RETENTION = tuple(s for s in SETTINGS if s.startswith("keep-"))
# what every node applies (its own node.json where the policy is silent): sizes are bytes
NODE_SETTINGS: dict[str, tuple[str, str]] = {
    "max-size": ("size", "eviction: keep the node's store under this many bytes"),
    "evict-after": ("rule", "eviction: packs recorded by `all` upstreams, `any` one, or a number of them"),
    "stale-after": ("age", "warn when an upstream has sent nothing down for this long"),
    "client-quota": ("size", "bytes each client may leave on the node that its upstreams do not hold yet"),
}
MAX_CLIENTS = 10_000


@dataclass(frozen=True)
class RepoPolicy:
    """A verified policy object."""

    name: str  # policy/<hex>
    version: int
    prev: str  # the policy/<hex> it replaced ("" for version 1)
    time: float
    defaults: dict[str, Any] = field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: tuple[str, ...] = ()
    node_defaults: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings_for(self, client: str) -> dict[str, Any]:
        """The settings that apply to ``client``: its own over the defaults."""
        return {**self.defaults, **self.clients.get(client, {})}

    def settings_for_node(self, node: str) -> dict[str, Any]:
        """The settings that apply to the node named ``node``: its own over the node defaults."""
        return {**self.node_defaults, **self.nodes.get(node, {})}

    def retention_for(self, client: str) -> Policy | None:
        """``client``'s retention rules, or None when the policy gives it none."""
        s = self.settings_for(client)
        counts = {r: int(s.get(f"keep-{r}", 0)) for r in RULES}
        within = parse_duration(s["keep-within"]) if "keep-within" in s else None
        rules = Policy(within=within, **counts)
        return None if rules.empty() else rules

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "prev": self.prev,
            "time": self.time,
            "defaults": self.defaults,
            "clients": self.clients,
            "fixed": list(self.fixed),
            "node_defaults": self.node_defaults,
            "nodes": self.nodes,
        }


def settings_problem(settings: Mapping[str, Any], known: Mapping[str, tuple[str, str]] = SETTINGS) -> str | None:
    """Why ``settings`` are not valid policy settings of ``known`` (None when they are)."""
    for key, value in settings.items():
        if key not in known:
            return f"unknown setting {key!r} (known: {', '.join(known)})"
        kind = known[key][0]
        if kind == "count" and (type(value) is not int or value < 0):
            return f"{key} must be a whole number of 0 or more, not {value!r}"
        if kind == "age" and (type(value) not in (int, float) or not value >= 0):
            return f"{key} must be a number of seconds of 0 or more, not {value!r}"
        if kind == "size" and (type(value) is not int or value < 0):
            return f"{key} must be a number of bytes of 0 or more, not {value!r}"
        if kind == "rule" and not (value in ("all", "any") or (type(value) is int and value >= 1)):
            return f"{key} must be all, any or a number of upstreams of 1 or more, not {value!r}"
        if kind == "duration":
            try:
                parse_duration(value if isinstance(value, str) else "")
            except ValueError:
                return f"{key} must be a duration such as 2d or 1y6m, not {value!r}"
    return None


def make_policy(
    master: SigningKey,
    repo_id: str,
    version: int,
    prev: str,
    defaults: Mapping[str, Any],
    clients: Mapping[str, Mapping[str, Any]],
    fixed: tuple[str, ...] = (),
    node_defaults: Mapping[str, Any] | None = None,
    nodes: Mapping[str, Mapping[str, Any]] | None = None,
) -> bytes:
    """Sign a policy version (needs the master key); raise ValueError for invalid settings."""
    for where, s in [("defaults", defaults), *((f"client {c!r}", s) for c, s in clients.items())]:
        why = settings_problem(s)
        if why:
            raise ValueError(f"{where}: {why}")
    node_defaults, nodes = dict(node_defaults or {}), dict(nodes or {})
    for where, s in [("node-defaults", node_defaults), *((f"node {n!r}", s) for n, s in nodes.items())]:
        why = settings_problem(s, NODE_SETTINGS)
        if why:
            raise ValueError(f"{where}: {why}")
    unknown = [f for f in fixed if f not in SETTINGS]
    if unknown:
        raise ValueError(f"fixed names unknown settings: {', '.join(unknown)}")
    if version < 1 or (prev == "") != (version == 1):
        raise ValueError(f"policy version {version} with previous version {prev!r}")
    body = {
        "v": 1,
        "repo": repo_id,
        "version": version,
        "prev": prev,
        "time": time.time(),
        "defaults": dict(defaults),
        "clients": {c: dict(s) for c, s in sorted(clients.items())},
        "fixed": sorted(set(fixed)),
    }
    if node_defaults or nodes:  # (absent otherwise: a reader of version 1 of the body reads the rest)
        body["node-defaults"] = node_defaults
        body["nodes"] = {n: dict(s) for n, s in sorted(nodes.items())}
    return make_signed(MAGIC_POLICY, body, master, "")


def parse_policy(data: bytes, master_verify: bytes, repo_id: str) -> RepoPolicy:
    """Decode and verify a policy object; raise FormatError saying why it cannot be trusted."""
    obj = parse_signed(data, MAGIC_POLICY)
    if obj.signer != "":
        raise encoding.FormatError("a policy must be signed by the master key")
    try:
        verify(master_verify, MAGIC_POLICY, obj.body_bytes, obj.sig)
    except BadSignature:
        raise encoding.FormatError("the policy is not signed by this repository's master key") from None
    b = obj.body
    if encoding.field(b, "v", int) != 1:
        raise encoding.FormatError("a policy of an unknown format version")
    if encoding.field(b, "repo", str) != repo_id:
        raise encoding.FormatError("the policy belongs to another repository")
    version, prev = encoding.field(b, "version", int), encoding.field(b, "prev", str)
    if version < 1 or (prev == "") != (version == 1) or (prev and not prev.startswith("policy/")):
        raise encoding.FormatError(f"policy version {version} with previous version {prev!r}")
    defaults = encoding.field(b, "defaults", dict)
    clients = encoding.field(b, "clients", dict)
    fixed = encoding.field(b, "fixed", list)
    if len(clients) > MAX_CLIENTS or not all(isinstance(c, str) and isinstance(s, dict) for c, s in clients.items()):
        raise encoding.FormatError("the policy's clients are malformed")
    for s in (defaults, *clients.values()):
        why = settings_problem(s)
        if why:
            raise encoding.FormatError(f"the policy holds an invalid setting: {why}")
    if not all(isinstance(f, str) and f in SETTINGS for f in fixed):
        raise encoding.FormatError("the policy fixes unknown settings")
    node_defaults = b.get("node-defaults", {})
    nodes = b.get("nodes", {})
    if (
        not isinstance(node_defaults, dict)
        or not isinstance(nodes, dict)
        or len(nodes) > MAX_CLIENTS
        or not all(isinstance(n, str) and isinstance(s, dict) for n, s in nodes.items())
    ):
        raise encoding.FormatError("the policy's node settings are malformed")
    for s in (node_defaults, *nodes.values()):
        why = settings_problem(s, NODE_SETTINGS)
        if why:
            raise encoding.FormatError(f"the policy holds an invalid node setting: {why}")
    return RepoPolicy(
        name=name_for("policy", data),
        version=version,
        prev=prev,
        time=float(encoding.field(b, "time", (int, float))),
        defaults=dict(defaults),
        clients={c: dict(s) for c, s in clients.items()},
        fixed=tuple(fixed),
        node_defaults=dict(node_defaults),
        nodes={n: dict(s) for n, s in nodes.items()},
    )


@dataclass
class PolicyState:
    """The policies a repository holds: the one in force, and what is wrong with the others."""

    current: RepoPolicy | None = None
    verified: list[RepoPolicy] = field(default_factory=list)  # every policy object that verifies
    problems: list[tuple[str, str]] = field(default_factory=list)  # (object, why): refused or forked
    forked: bool = False

    @property
    def highest(self) -> RepoPolicy | None:
        """The verified policy with the highest version (forked or not): a new version follows it."""
        return max(self.verified, key=lambda p: (p.version, p.name), default=None)


def read_policies(repo: Repository) -> PolicyState:
    """Every policy object of ``repo``, verified; the highest version in force. A version held by
    two different objects is a fork: the highest version below it that is not forked is in
    force (and ``forked`` says the owner must set a new version)."""
    state = PolicyState()
    by_version: dict[int, list[RepoPolicy]] = {}
    for info in repo.backend.list("policy/"):
        try:
            p = parse_policy(repo.get_object(info.name), repo.config.master_verify, repo.repo_id)
        except (encoding.FormatError, CorruptObject) as exc:
            state.problems.append((info.name, exc.message if isinstance(exc, CorruptObject) else str(exc)))
            continue
        except ObjectMissing:
            continue  # deleted while listed: a mirror being pruned; nothing to judge
        by_version.setdefault(p.version, []).append(p)
        state.verified.append(p)
    for version in sorted(by_version, reverse=True):
        found = by_version[version]
        if len(found) > 1:
            state.forked = True
            names = ", ".join(sorted(p.name for p in found))
            for p in found:
                state.problems.append(
                    (
                        p.name,
                        f"two policies claim version {version} ({names}): only the master key signs policies, so "
                        "whoever holds it made both; set a new version with `bunker policy set FILE` (the version "
                        "below them applies until then)",
                    )
                )
            continue
        state.current = found[0]
        break
    return state
