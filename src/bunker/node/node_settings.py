"""What a node runs with for one repository (docs/hierarchy.md, "Policy"): its own node.json,
overridden by the node settings of the owner's policy that reached its store.

The policy (repo/policy.py) is the one place the owner sets every node's bound, eviction rule,
staleness limit and per-client quota; a node applies the newest version it holds, read from its
store and verified with the master key each time it is needed (the policy objects are few and
small). node.json stays what applies where the policy is silent, and a quota node.json names
for one client (`bunker node quota`) wins over the policy's ``client-quota`` for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

from bunker import encoding
from bunker.errors import BunkerError
from bunker.node.node_dir import NodeDir
from bunker.repo.policy import RepoPolicy, read_policies
from bunker.repo.repository import Repository


@dataclass(frozen=True)
class NodeSettings:
    max_size: int | None
    evict_after: str
    stale_after: float
    client_quota: int | None  # bytes per client without a quota of its own in node.json
    policy: RepoPolicy | None  # the policy they come from (None: node.json alone)
    from_policy: tuple[str, ...]  # the settings the policy gave

    def to_json(self) -> dict[str, object]:
        return {
            "max_size": self.max_size,
            "evict_after": self.evict_after,
            "stale_after": self.stale_after,
            "client_quota": self.client_quota,
            "policy_version": self.policy.version if self.policy else None,
            "from_policy": list(self.from_policy),
        }


def node_policy(nd: NodeDir, repo_id: str) -> RepoPolicy | None:
    """The policy in force in the node's store of ``repo_id`` (None: none, or unreadable)."""
    try:
        return read_policies(Repository.open(nd.store(repo_id), repo_id, floor=False)).current
    except (BunkerError, encoding.FormatError):
        return None


def node_settings(nd: NodeDir, repo_id: str) -> NodeSettings:
    """The settings node ``nd`` applies to its store of ``repo_id``."""
    cfg = nd.config
    policy = node_policy(nd, repo_id)
    given = policy.settings_for_node(cfg.name) if policy is not None else {}
    return NodeSettings(
        max_size=int(given["max-size"]) if "max-size" in given else cfg.max_size,
        evict_after=str(given.get("evict-after", cfg.evict_after)),
        stale_after=float(given.get("stale-after", cfg.stale_after)),
        client_quota=int(given["client-quota"]) if "client-quota" in given else None,
        policy=policy,
        from_policy=tuple(sorted(given)),
    )
