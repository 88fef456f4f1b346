"""`bunker migrate`: from format 1 to format 2 (docs/format.md section 8).

Format 2 binds each snapshot body to its writer, session and checkpoint, names revocations by
snapshot object, and chains config versions. Format-1 snapshots carry none of that, so the
migration records, per certificate, the heads of its format-1 chain (``legacy``) in the first
format-2 config version, signed by the master key: exactly those chains stay trusted, and no
format-1 envelope written later (by a stolen key, or an old bunker) joins them. Revocations by
sequence number become revocations by snapshot object. Where a certificate's format-1 chain is
forked (two snapshots with one sequence number), the administrator picks the branch to trust.
Nothing else changes: packs, indexes, references and snapshots stay as they are.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, ExitCode
from bunker.repo.authority import write_config
from bunker.repo.config import FORMAT_VERSION, LEGACY_FORMAT, RepoConfig, Revocation
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.trust import chain_of


@dataclass
class ClientPlan:
    """What the migration records for one certificate."""

    cert: str
    client: str
    heads: list[str] = field(default_factory=list)  # legacy chain heads to record
    branches: list[str] = field(default_factory=list)  # heads of a fork, when no pick was given
    untrusted: list[str] = field(default_factory=list)  # format-1 snapshots that stay untrusted
    revocation: Revocation | None = None


@dataclass
class MigrationPlan:
    clients: list[ClientPlan]

    @property
    def unresolved(self) -> list[ClientPlan]:
        return [c for c in self.clients if c.branches and not c.heads]


def plan(repo: Repository, picks: dict[str, str]) -> MigrationPlan:
    """The legacy heads and revocations for ``repo`` (opened with ``legacy=True``). ``picks``:
    client name or certificate (prefix) -> snapshot id (prefix) of the branch to trust where a
    chain is forked."""
    if repo.config.format != LEGACY_FORMAT:
        raise BunkerError(
            f"the repository is already in format {repo.config.format}", "nothing to migrate", exit_code=ExitCode.USAGE
        )
    records = [r for r in repo.snapshots() if r.trusted]
    by_cert: dict[str, list[SnapshotRecord]] = defaultdict(list)
    for r in records:
        by_cert[r.snap.env.cert].append(r)
    revoked = {r.client: r for r in repo.config.revoked}
    out = []
    used_picks: set[str] = set()
    for cert_name in sorted({c.name for c in repo.certificates()} | set(by_cert)):
        cert = repo.certificate(cert_name)
        rev = revoked.get(cert_name)
        mine = [r for r in by_cert.get(cert_name, []) if rev is None or r.snap.env.seq <= rev.last_seq]
        cp = ClientPlan(cert_name, cert.client)
        cp.untrusted = sorted(r.name for r in by_cert.get(cert_name, []) if r not in mine)
        envs = {r.name: r.snap.env for r in mine}
        named = {e.prev for e in envs.values()}
        heads = sorted((n for n in envs if n not in named), key=lambda n: -envs[n].seq)
        seqs = [e.seq for e in envs.values()]
        forked = len(seqs) != len(set(seqs))
        pick_key = next((k for k in picks if k == cert.client or cert_name.split("/", 1)[1].startswith(k)), None)
        if pick_key is not None:
            used_picks.add(pick_key)
            want = picks[pick_key].removeprefix("snapshots/")
            chosen = [n for n in envs if n.split("/", 1)[1].startswith(want)]
            if len(chosen) != 1:
                raise BunkerError(
                    f"--pick {pick_key}={want}: {'no' if not chosen else 'more than one'} trusted snapshot of client "
                    f"{cert.client!r} matches",
                    "give the id of one of the branch heads `bunker migrate --dry-run` lists",
                    exit_code=ExitCode.USAGE,
                )
            cp.heads = chosen
        elif forked:
            cp.branches = heads
        else:
            cp.heads = heads
        on_chain = set().union(*(chain_of(envs, h, cert_name) for h in cp.heads)) if cp.heads else set()
        cp.untrusted += sorted(n for n in envs if n not in on_chain and cp.heads)
        if rev is not None:
            top = max((envs[h] for h in cp.heads), key=lambda e: e.seq, default=None)
            last = next((h for h in cp.heads if envs[h] is top), "")
            cp.revocation = Revocation(cert_name, top.seq if top is not None else 0, last)
        out.append(cp)
    unknown = set(picks) - used_picks
    if unknown:
        raise BunkerError(
            f"--pick names no client of this repository: {', '.join(sorted(unknown))}",
            "name the client as `bunker snapshots` lists it",
            exit_code=ExitCode.USAGE,
        )
    return MigrationPlan(out)


def migrate(repo: Repository, master: MasterKey, mplan: MigrationPlan) -> RepoConfig:
    """Write the first format-2 config version (needs the master key and a plan without
    unresolved forks)."""
    if mplan.unresolved:
        names = ", ".join(c.client for c in mplan.unresolved)
        raise BunkerError(
            f"the chains of {names} are forked: two snapshots share a sequence number",
            "pick the branch to trust for each: `bunker migrate --pick CLIENT=SNAPSHOT` (`bunker migrate --dry-run` "
            "lists the branch heads)",
            exit_code=ExitCode.USAGE,
        )
    legacy = {c.cert: tuple(c.heads) for c in mplan.clients if c.heads}
    revoked = tuple(c.revocation for c in mplan.clients if c.revocation is not None)
    cfg = write_config(repo, master, revoked=revoked, legacy=legacy, format=FORMAT_VERSION)
    repo.write_documents()
    return cfg
