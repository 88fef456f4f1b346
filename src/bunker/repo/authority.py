"""What only the master key writes: client certificates and config versions (docs/format.md
sections 8, 9). Every config version written here follows the current one and joins any forked
branch, keeping every branch's revocations (repo/config_chain.py)."""

from __future__ import annotations

import dataclasses
import os
import time

from bunker.crypto.keyfile import MasterKey, PutKey
from bunker.crypto.node_keys import NodePublic
from bunker.crypto.sign import SigningKey
from bunker.repo.certs import Certificate, bind_host, make_certificate
from bunker.repo.config import FORMAT_VERSION, RepoConfig, Revocation, make_config
from bunker.repo.node_certs import NodeCertificate, make_node_certificate, parse_node_certificate
from bunker.repo.repository import Repository, RepositoryError


def _own(repo: Repository, master: MasterKey) -> None:
    if master.repo_id != repo.repo_id:
        raise RepositoryError(
            f"this master key is for repository {master.repo_id}, but the repository at {repo.backend.url} is "
            f"{repo.repo_id}",
            "pass this repository's master key with --master-key, or the key's repository with --repo",
        )


def issue_client(
    repo: Repository,
    master: MasterKey,
    client: str,
    capabilities: tuple[str, ...] = ("backup",),
    domain: str = "default",
    host: str = "",
) -> PutKey:
    """Make a put key for a new client and publish its certificate; ``host``: the host the
    certificate binds (sealed; "" binds none)."""
    _own(repo, master)
    repo.refuse_if_forked("issue a put key")
    secrets = master.put_secrets(domain)
    client_key = SigningKey(os.urandom(32))
    salt = os.urandom(32) if host else b""
    binding = bind_host(master.data_public, repo.repo_id, client_key.public_bytes, host, salt) if host else None
    cert = make_certificate(
        master.signing,
        repo.repo_id,
        client,
        client_key.public_bytes,
        domain,
        secrets.domain_id,
        capabilities,
        binding,
    )
    repo.put_object("clients", cert)
    return PutKey(
        repo_id=repo.repo_id,
        master_verify=repo.config.master_verify,
        data_public=repo.config.data_public,
        domain=domain,
        secrets=secrets,
        client_key=client_key,
        certificate=cert,
        config_version=repo.config.version,
        config_name=repo.config_name,
        host=host,
        host_salt=salt,
    )


def next_revocations(repo: Repository) -> tuple[Revocation, ...]:
    """The revocations the next config version carries: one per client; where forked branches
    revoked one client differently, the one trusting the shorter chain."""
    out: dict[str, Revocation] = {}
    for rs in repo.revoked.values():
        usable = [r for r in rs if r.last is not None]
        if usable:
            out[usable[0].client] = min(usable, key=lambda r: r.last_seq)
    return tuple(out.values())


def write_config(repo: Repository, master: MasterKey, **changes: object) -> RepoConfig:
    """Publish the next config version with ``changes``. It follows the current version and
    merges every forked branch's head, keeping their revocations."""
    _own(repo, master)
    cfg = dataclasses.replace(
        repo.config,
        version=max(c.version for c in repo.configs.values()) + 1,
        prev=repo.config_name,
        merges=tuple(h for h in repo.chain.fork if h in repo.configs),
        revoked=next_revocations(repo),
        legacy=dict(repo.chain.legacy),
        # a node revoked on any branch stays revoked: revocation is never undone
        revoked_nodes=tuple(sorted({n for c in repo.configs.values() for n in c.revoked_nodes})),
        created=time.time(),
        format=FORMAT_VERSION,
    )
    cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
    name = repo.put_object("config", make_config(cfg, master.signing))
    repo.add_config(name, cfg)
    return cfg


def revoke_client(repo: Repository, master: MasterKey, cert: Certificate, last: str, last_seq: int) -> RepoConfig:
    """Publish a new config version that revokes ``cert``: only its snapshots on the chain
    ending at ``last`` (a snapshot name; "" for none) stay trusted, and no client deduplicates
    against its packs."""
    kept = tuple(r for r in next_revocations(repo) if r.client != cert.name)
    return write_config(repo, master, revoked=(*kept, Revocation(cert.name, last_seq, last)))


def issue_node(
    repo: Repository, master: MasterKey, node: str, public: NodePublic, capabilities: tuple[str, ...]
) -> NodeCertificate:
    """Publish a certificate for a node (docs/hierarchy.md): its name, keys and capabilities,
    with the current config version as the node's floor."""
    _own(repo, master)
    repo.refuse_if_forked("certify a node")
    data = make_node_certificate(master.signing, repo.repo_id, node, public, capabilities, repo.config.version)
    repo.put_object("nodes", data)
    return parse_node_certificate(data, repo.config.master_verify, repo.repo_id)


def revoke_node(repo: Repository, master: MasterKey, cert: NodeCertificate) -> RepoConfig:
    """Publish a config version that no longer trusts ``cert``: its receipts free nothing and
    its bundles are refused from then on."""
    revoked = tuple(sorted({*repo.config.revoked_nodes, cert.name}))
    return write_config(repo, master, revoked_nodes=revoked)
