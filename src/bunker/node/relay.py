"""`bunker node forward`: a node sends what it holds to each upstream (docs/hierarchy.md, "Up").

Each upstream is served on its own: one that cannot be reached is a problem of that upstream
(named, with the next step), never a reason to stop delivering to the others, and never fatal:
the data stays on the node and the next run sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.node.abandon import Abandonment, abandon_all
from bunker.node.node_dir import NodeDir, Upstream
from bunker.node.receipt_flow import issue_record_receipts
from bunker.node.relay_direct import DirectReport, forward_direct
from bunker.node.relay_link import forward_link, send_down


@dataclass(frozen=True)
class Problem:
    level: str  # note | warn | err
    code: str
    message: str


@dataclass
class Forwarded:
    """What a `node forward` run did, per upstream and repository."""

    reports: list[Any] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    abandoned: list[Abandonment] = field(default_factory=list)  # dead backups' checkpoints given up (node/abandon.py)

    def lines(self) -> list[str]:
        out = []
        for r in self.reports:
            if isinstance(r, DirectReport):
                out.append(
                    f"{r.upstream} ({r.repo_id[:16]}): sent {r.sent} objects ({r.sent_bytes} bytes), "
                    f"{r.present} already there, {len(r.snapshots)} snapshots, {r.down} records down"
                )
            else:
                out.append(r.summary())
        return out

    def exit_code(self) -> int:
        levels = {p.level for p in self.problems}
        if "err" in levels:
            return ExitCode.ERR
        return ExitCode.WARN if "warn" in levels else ExitCode.OK


def forward_all(nd: NodeDir, only: str | None = None) -> Forwarded:
    """Deliver to every upstream (or only ``only``), every repository the node relays; then send
    each downstream link the records and receipts it lacks."""
    result = Forwarded()
    downs = [d for d in nd.config.downstreams if only in (None, d.name)]
    ups = [u for u in nd.config.upstreams if only in (None, u.name)]
    if only and not ups and not downs:
        nd.upstream(only)  # names the links there are
    # before the relays: an abandoned root made now goes up in this same run
    result.abandoned, problems = abandon_all(nd)
    result.problems += [Problem(*p) for p in problems]
    result.problems += [Problem("note", f"checkpoint-{a.state}", a.message(nd.name)) for a in result.abandoned]
    if not nd.config.upstreams:
        result.problems.append(
            Problem(
                "warn",
                "no-upstream",
                f"node {nd.name} has no upstream: what it holds stays here; add one with "
                f"`bunker node upstream add {nd.root} NAME --direct URL | --link URL --card FILE`",
            )
        )
    for up in ups:
        _forward_up(nd, up, result)
    for down in downs:
        for repo_id in nd.repositories():
            try:
                sent = send_down(nd, repo_id, down)
            except StorageError as exc:
                result.problems.append(
                    Problem(
                        "warn",
                        "mailbox-unreachable",
                        f"the mailbox of downstream link {down.name} cannot be reached ({exc.message}); records "
                        "and receipts for it wait here and go with the next forward",
                    )
                )
                continue
            if sent.pieces:
                result.reports.append(sent)
    return result


def _forward_up(nd: NodeDir, up: Upstream, result: Forwarded) -> None:
    repos = [up.repo] if up.kind == "direct" else nd.repositories()
    for repo_id in repos:
        try:
            if up.kind == "direct":
                report: Any = forward_direct(nd, repo_id, up)
            else:
                report = forward_link(nd, repo_id, up)
        except StorageError as exc:
            result.problems.append(
                Problem(
                    "warn",
                    "upstream-unreachable",
                    f"upstream {up.name} cannot be reached ({exc.message}); what it lacks stays on node "
                    f"{nd.name} and the next `bunker node forward` sends it",
                )
            )
            continue
        except BunkerError as exc:
            result.problems.append(
                Problem(
                    "err",
                    "upstream-failed",
                    f"upstream {up.name}: {exc.message}" + (f" (next step: {exc.hint})" if exc.hint else ""),
                )
            )
            continue
        result.reports.append(report)
        if up.kind == "direct":
            issue_record_receipts(nd, repo_id)
        for snap, why in report.held:
            result.problems.append(Problem("note", "held", f"{snap} waits on node {nd.name}: {why}"))
        for snap in report.forks:
            result.problems.append(
                Problem(
                    "err",
                    "fork",
                    f"{snap} is a fork of its client's chain: the repository of record holds another snapshot "
                    f"at its place, or at the place of one it builds on; it stays on node {nd.name}, never sent. "
                    "Nothing to do on the node: the client's next backup through it continues from the top's "
                    "snapshot and takes along what the fork held (docs/hierarchy.md, \"A client without a chain "
                    "head\"); if the client backs up elsewhere, run `bunker check` at the top",
                )
            )
        for snap in report.damaged:
            result.problems.append(
                Problem(
                    "err",
                    "damaged",
                    f"{snap} in node {nd.name}'s store does not parse; it is not sent "
                    f"(run `bunker check --keyless --repo {nd.store_path(repo_id)}`)",
                )
            )
