"""The repository: a backend plus its verified config and client certificates.

Opening a repository reads every ``config/`` object, keeps those signed by the master verify key
whose fingerprint is the expected repository id, and takes the highest version. Without an
expected id (first contact, keyless check without --expect) the config must at least be
self-consistent, and callers say that authenticity was not proven.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import MasterKey, PutKey
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.repo import recovery_docs
from bunker.repo.certs import Certificate, make_certificate, parse_certificate
from bunker.repo.config import RepoConfig, Revocation, make_config, new_config, parse_config
from bunker.repo.objects import (
    MAGIC_RETIRED,
    MAGIC_SNAPSHOT,
    SignedObject,
    content_hash,
    is_hash_name,
    name_for,
    parse_signed,
)
from bunker.repo.records import parse_retirement
from bunker.repo.snapshot import ParsedSnapshot, parse_snapshot
from bunker.storage.backend import Backend


class RepositoryError(BunkerError):
    exit_code = ExitCode.BAD_REPOSITORY


@dataclass(frozen=True)
class SnapshotRecord:
    """A listed snapshot with its verification state."""

    name: str
    snap: ParsedSnapshot
    trusted: bool  # signature verified and certificate valid and not revoked past this seq
    problem: str = ""
    stored: float = 0.0  # the storage's own time for the object (0: unknown); see repo/retention.py

    @property
    def short_id(self) -> str:
        return self.name.split("/", 1)[1][:12]


class Repository:
    """A verified view of one repository."""

    def __init__(self, backend: Backend, config: RepoConfig, config_name: str) -> None:
        self.backend = backend
        self.config = config
        self.config_name = config_name
        self.repo_id = config.repo_id
        self._certs: dict[str, Certificate] = {}

    # ----------------------------------------------------------------- opening and creating
    @classmethod
    def create(cls, backend: Backend, master: MasterKey) -> Repository:
        """Write config version 1 and the plaintext recovery documents into an empty backend."""
        if any(True for _ in backend.list("config/")):
            raise RepositoryError(
                f"a repository already exists at {backend.url}",
                "use it as it is, or choose another --repo for a new repository",
            )
        cfg = new_config(master.signing.public_bytes, master.data_public)
        data = make_config(cfg, master.signing)
        name = name_for("config", data)
        backend.put(name, data)
        repo = cls(backend, cfg, name)
        repo.write_documents()
        return repo

    @classmethod
    def open(cls, backend: Backend, expected_id: str | None = None) -> Repository:
        """Open and verify the config; raise if none is valid for ``expected_id``."""
        best: tuple[RepoConfig, str] | None = None
        seen_other: set[str] = set()
        problems: list[str] = []
        for info in backend.list("config/"):
            try:
                data = backend.get(info.name)
                if not is_hash_name(info.name) or content_hash(data) != info.name.split("/", 1)[1]:
                    raise encoding.FormatError("bytes do not match the object name")
                cfg = parse_config(data)
            except (encoding.FormatError, ObjectMissing) as exc:
                problems.append(f"{info.name}: {exc}")
                continue
            if expected_id is not None and cfg.repo_id != expected_id:
                seen_other.add(cfg.repo_id)
                continue
            if best is not None and best[0].repo_id != cfg.repo_id:
                raise RepositoryError(
                    f"repository at {backend.url} holds configs of two different master keys",
                    "someone added a foreign config; run `bunker check --keyless --expect ID` with the id from "
                    "your key file or RECOVERY.md to see which one is yours",
                    exit_code=ExitCode.INTEGRITY,
                )
            if best is None or cfg.version > best[0].version:
                best = (cfg, info.name)
        if best is None:
            if seen_other:
                raise RepositoryError(
                    f"the repository at {backend.url} is not the one your key is for "
                    f"(it claims id {sorted(seen_other)[0][:16]}…, your key expects {(expected_id or '?')[:16]}…)",
                    "its config may have been substituted: do not back up into it; check --repo, or run "
                    "`bunker check --keyless --expect ID`",
                    exit_code=ExitCode.INTEGRITY,
                )
            if problems:
                raise RepositoryError(
                    f"no valid config in the repository at {backend.url}: {problems[0]}",
                    "restore config/ from a mirror, or run `bunker check --keyless` to see what is damaged",
                    exit_code=ExitCode.INTEGRITY,
                )
            raise RepositoryError(
                f"no bunker repository at {backend.url}",
                "check --repo / BUNKER_REPO, or create one with `bunker init`",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        return cls(backend, best[0], best[1])

    def write_documents(self) -> None:
        """(Re)write RECOVERY.md and FORMAT.md (plaintext, no secrets) where they differ from
        what this version of bunker would write (so a repository's copy stays current)."""
        if self.backend.capabilities().partial:
            return  # a spool: the repository's own copies are rewritten by the next run that reaches it
        for name, text in (
            ("RECOVERY.md", recovery_docs.recovery_md(self.repo_id)),
            ("FORMAT.md", recovery_docs.format_md()),
        ):
            data = text.encode()
            try:
                if self.backend.get(name) == data:
                    continue
            except ObjectMissing:
                pass
            self.backend.put(name, data)

    # ----------------------------------------------------------------- objects
    def put_object(self, prefix: str, data: bytes) -> str:
        """Store a hash-named object (a no-op when it already exists); return its name. The
        check comes first (most such objects of a backup exist already, and a check is cheaper
        than a write); the write is create-if-absent: where the storage has conditional writes
        (S3, GCS, Azure, a local disk, `bunker serve`, sftp with hard links) an object stored
        meanwhile is never replaced."""
        name = name_for(prefix, data)
        if not self.backend.exists(name):
            self.backend.put(name, data, if_absent=True)
        return name

    def get_object(self, name: str) -> bytes:
        """Fetch a hash-named object and check that its bytes match its name."""
        data = self.backend.get(name)
        if is_hash_name(name) and content_hash(data) != name.split("/", 1)[1]:
            raise CorruptObject(name, "its bytes do not match its name (altered or truncated)")
        return data

    # ----------------------------------------------------------------- clients
    def certificate(self, name: str) -> Certificate:
        """Load and verify a client certificate (cached)."""
        cert = self._certs.get(name)
        if cert is None:
            data = self.get_object(name)
            try:
                cert = parse_certificate(data, self.config.master_verify, self.repo_id)
            except encoding.FormatError as exc:
                raise CorruptObject(name, str(exc)) from None
            self._certs[name] = cert
        return cert

    def certificates(self) -> Iterator[Certificate]:
        """Every valid certificate (damaged ones are skipped; check reports them)."""
        for info in self.backend.list("clients/"):
            try:
                yield self.certificate(info.name)
            except (CorruptObject, ObjectMissing):
                continue

    def issue_client(
        self, master: MasterKey, client: str, capabilities: tuple[str, ...] = ("backup",), domain: str = "default"
    ) -> PutKey:
        """Make a put key for a new client and publish its certificate (needs the master key)."""
        if master.repo_id != self.repo_id:
            raise RepositoryError("this master key belongs to another repository", "pass the right --master-key")
        secrets = master.put_secrets(domain)
        client_key = SigningKey(os.urandom(32))
        cert = make_certificate(
            master.signing, self.repo_id, client, client_key.public_bytes, domain, secrets.domain_id, capabilities
        )
        self.put_object("clients", cert)
        return PutKey(
            repo_id=self.repo_id,
            master_verify=self.config.master_verify,
            data_public=self.config.data_public,
            domain=domain,
            secrets=secrets,
            client_key=client_key,
            certificate=cert,
        )

    def revoke_client(self, master: MasterKey, cert: Certificate, last_seq: int) -> RepoConfig:
        """Publish a new config version that revokes ``cert``: its snapshots after ``last_seq``
        are no longer trusted and no client deduplicates against its packs (needs the master key)."""
        if master.repo_id != self.repo_id:
            raise RepositoryError("this master key belongs to another repository", "pass the right --master-key")
        kept = tuple(r for r in self.config.revoked if r.client != cert.name)
        cfg = dataclasses.replace(
            self.config,
            version=self.config.version + 1,
            revoked=(*kept, Revocation(cert.name, last_seq)),
            created=time.time(),
        )
        data = make_config(cfg, master.signing)
        self.config_name = self.put_object("config", data)
        self.config = cfg
        return cfg

    def check_put_key(self, put: PutKey) -> Certificate:
        """Verify that ``put`` belongs here and its certificate is valid; publish it if absent."""
        if put.repo_id != self.repo_id:
            raise RepositoryError(
                "the put key belongs to another repository",
                "pass the put key of this repository with --put-key, or the right --repo",
                exit_code=ExitCode.KEY_MISSING,
            )
        name = self.put_object("clients", put.certificate)
        cert = self.certificate(name)
        if cert.verify_key != put.client_key.public_bytes:
            raise RepositoryError("the put key's certificate is not for its own signing key", "make a new put key")
        if name in self.config.revoked_clients():
            raise RepositoryError(
                f"client {cert.client!r} has been revoked in this repository",
                "ask the repository's owner for a new put key (`bunker key new-client NAME`)",
                exit_code=ExitCode.KEY_MISSING,
            )
        return cert

    # ----------------------------------------------------------------- snapshots
    def verify_snapshot_signature(self, snap: ParsedSnapshot) -> tuple[bool, str]:
        """(trusted, problem) for a parsed snapshot: signature, certificate and revocation."""
        try:
            cert = self.certificate(snap.env.cert)
        except (CorruptObject, ObjectMissing) as exc:
            return False, f"its certificate is not usable ({exc.message})"
        try:
            verify(cert.verify_key, MAGIC_SNAPSHOT, snap.env_bytes, snap.sig)
        except BadSignature:
            return False, "its signature does not verify (forged or altered)"
        if snap.env.repo_id != self.repo_id:
            return False, "it belongs to another repository"
        if snap.env.client != cert.client:
            return False, "its client name differs from its certificate"
        last = self.config.revoked_clients().get(snap.env.cert)
        if last is not None and snap.env.seq > last:
            return False, f"it was written by revoked client {cert.client!r} after its last trusted snapshot"
        return True, ""

    def snapshots(self) -> list[SnapshotRecord]:
        """Every snapshot, verified, ordered by time then client and sequence."""
        out = []
        for info in self.backend.list("snapshots/"):
            try:
                data = self.get_object(info.name)
                snap = parse_snapshot(data)
            except (CorruptObject, ObjectMissing, encoding.FormatError):
                continue  # check reports damaged snapshots
            trusted, problem = self.verify_snapshot_signature(snap)
            out.append(SnapshotRecord(info.name, snap, trusted, problem, info.mtime))
        out.sort(key=lambda r: (r.snap.env.time, r.snap.env.client, r.snap.env.seq))
        return out

    def verify_retirement(self, data: bytes) -> str:
        """The snapshot a retirement record retires, once its signature is verified and its signer
        may retire snapshots (see verify_pruner). Raise FormatError (or CorruptObject/ObjectMissing
        for the certificate)."""
        snap_name, _signer = parse_retirement(data)
        self.verify_pruner(parse_signed(data, MAGIC_RETIRED), "forget snapshots")
        return snap_name

    def verify_pruner(self, obj: SignedObject, what: str) -> None:
        """Check a record only pruners may write (retirement, GC condemnation): signed by the
        master key (signer ``""``) or by a certificate with ``prune`` that is not revoked (a
        revoked client's records would let a stolen key make prune delete data). Raise
        FormatError (or CorruptObject/ObjectMissing for the certificate)."""
        if obj.signer == "":
            key = self.config.master_verify
        else:
            cert = self.certificate(obj.signer)
            if "prune" not in cert.capabilities:
                raise encoding.FormatError(f"signer {cert.client!r} has no prune capability (may not {what})")
            if obj.signer in self.config.revoked_clients():
                raise encoding.FormatError(
                    f"signer {cert.client!r} has been revoked; run the command again with the master key or a "
                    "trusted prune-capable put key if it should really happen"
                )
            key = cert.verify_key
        try:
            verify(key, obj.magic, obj.body_bytes, obj.sig)
        except BadSignature:
            raise encoding.FormatError("its signature does not verify (forged or altered)") from None

    def retired_snapshots(self) -> set[str]:
        """Names (``snapshots/<hex>``) of the snapshots that a valid retirement record retires.
        Damaged, forged or unauthorised records are ignored here; `bunker check` reports them."""
        out: set[str] = set()
        for info in self.backend.list("retired/"):
            try:
                out.add(self.verify_retirement(self.get_object(info.name)))
            except (CorruptObject, ObjectMissing, encoding.FormatError):
                continue
        return out

    def client_head(self, cert_name: str) -> SnapshotRecord | None:
        """The trusted snapshot with the highest sequence number of one client certificate."""
        best = None
        for rec in self.snapshots():
            if (
                rec.trusted
                and rec.snap.env.cert == cert_name
                and (best is None or rec.snap.env.seq > best.snap.env.seq)
            ):
                best = rec
        return best

    def domain_secrets(self, master: MasterKey, domain_id: str) -> PutSecrets:
        """S of the dedup domain ``domain_id``, found through the certificates (master key)."""
        for name in ("default", *sorted({c.domain_name for c in self.certificates()})):
            secrets = master.put_secrets(name)
            if secrets.domain_id == domain_id:
                return secrets
        raise RepositoryError(
            f"no client certificate names dedup domain {domain_id}",
            "the clients/ objects are missing or damaged; run `bunker check --keyless`",
            exit_code=ExitCode.INTEGRITY,
        )
