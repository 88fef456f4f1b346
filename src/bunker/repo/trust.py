"""Which snapshots lie on a trusted chain (docs/format.md section 18, docs/security.md).

A snapshot that verifies on its own (signature, certificate, repository, domain) is still not
trusted when its chain is not:

- a revoked client's snapshots are trusted only on the chain that ends at the snapshot its
  revocation names (walking ``prev`` back from it): a stolen key cannot add snapshots, neither
  after that one nor on a branch forked below it;
- a format-1 snapshot (written before the repository was migrated) is trusted only on the chains
  `bunker migrate` recorded for its certificate (``legacy``: the heads of its chain, several
  where a gap splits it): old envelopes carry no binding of body to writer, so no new one may
  join.
"""

from __future__ import annotations

from collections.abc import Mapping

from bunker.repo.config import Revocation
from bunker.repo.snapshot import Envelope


def chain_of(envs: Mapping[str, Envelope], head: str, cert: str) -> set[str]:
    """``head`` and every snapshot of ``cert`` it links back to through ``prev``; empty when
    ``head`` is not among ``envs`` (missing, damaged or not verified)."""
    out: set[str] = set()
    cur = head
    while cur and cur in envs and cur not in out and envs[cur].cert == cert:
        out.add(cur)
        cur = envs[cur].prev
    return out


def chain_trust(
    envs: Mapping[str, Envelope],
    revoked: Mapping[str, tuple[Revocation, ...]],
    legacy: Mapping[str, tuple[str, ...]] | None,
) -> dict[str, str]:
    """Snapshot name -> why it is not trusted, for those of ``envs`` (each verified on its own)
    that lie on no trusted chain. ``legacy`` None: a repository still in format 1, read by its
    own rules (only for `bunker migrate`)."""
    out: dict[str, str] = {}
    chains: dict[tuple[str, str], set[str]] = {}

    def on_chain(name: str, cert: str, head: str) -> bool:
        key = (cert, head)
        if key not in chains:
            chains[key] = chain_of(envs, head, cert) if head else set()
        return name in chains[key]

    for name, env in envs.items():
        if (
            env.version < 2
            and legacy is not None
            and not any(on_chain(name, env.cert, head) for head in legacy.get(env.cert, ()))
        ):
                out[name] = (
                    "it is a format-1 snapshot that is not on the chain `bunker migrate` recorded for its client "
                    "(written by an older bunker after the migration, or forged)"
                )
                continue
        for r in revoked.get(env.cert, ()):
            # a format-1 revocation (only while migrating) names a sequence number
            trusted = env.seq <= r.last_seq if r.last is None else on_chain(name, env.cert, r.last)
            if not trusted:
                missing = bool(r.last) and r.last not in envs
                out[name] = (
                    f"its client {env.client!r} was revoked, and the last trusted snapshot its revocation names "
                    f"({r.last}) is missing or damaged, so none of its snapshots can be trusted; restore that snapshot "
                    "from a mirror"
                    if missing
                    else f"it was written by revoked client {env.client!r} after its last trusted snapshot "
                    f"(#{r.last_seq}) or on a branch of its chain"
                )
                break
    return out
