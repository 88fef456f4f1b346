"""What the owner's policy (repo/policy.py) changes in a backup run: the checkpoint interval
when the command line gives none (or always, when the policy fixes it), and the version the run
reports in its status record (docs/hierarchy.md, "Policy")."""

from __future__ import annotations

from dataclasses import dataclass, field

from bunker import encoding
from bunker.crypto.keyfile import PutKey
from bunker.repo.certs import parse_certificate
from bunker.repo.policy_memory import policy_in_force
from bunker.repo.repository import Repository

DEFAULT_CHECKPOINT_SECONDS = 10.0


@dataclass
class AppliedPolicy:
    version: int  # 0: no policy
    checkpoint_seconds: float
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (level, code, message) for the run's log


def apply_policy(repo: Repository, put: PutKey, checkpoint_seconds: float | None) -> AppliedPolicy:
    """The settings this run uses: ``checkpoint_seconds`` from the command line (None when not
    given) against the policy in force for this client."""
    current, events = policy_in_force(repo)
    given = checkpoint_seconds
    if current is None:
        return AppliedPolicy(0, DEFAULT_CHECKPOINT_SECONDS if given is None else given, list(events))
    try:
        client = parse_certificate(put.certificate, put.master_verify, put.repo_id).client
    except encoding.FormatError:
        client = ""  # the run itself refuses such a key, with the reason
    wanted = current.settings_for(client).get("checkpoint-interval")
    seconds = given if given is not None else float(wanted) if wanted is not None else DEFAULT_CHECKPOINT_SECONDS
    if (
        given is not None
        and wanted is not None
        and "checkpoint-interval" in current.fixed
        and float(wanted) != given
    ):
        seconds = float(wanted)
        events.append(
            (
                "warn",
                "policy-fixed",
                f"--checkpoint-interval {given:g}s was given, but policy version {current.version} fixes "
                f"checkpoint-interval at {float(wanted):g}s for this client: the policy's value applies; remove the "
                "option from this machine's backup command, or ask the owner to change the policy",
            )
        )
    return AppliedPolicy(current.version, seconds, list(events))
