"""The repository: a backend plus its verified config and client certificates.

Opening a repository reads every ``config/`` object, keeps those signed by the master verify key
whose fingerprint is the expected repository id, and resolves their chain (repo/config_chain.py:
the highest version, forks, and this machine's floor, below which it refuses to go). Without an
expected id (first contact, keyless check without --expect) the config must at least be
self-consistent, and callers say that authenticity was not proven. A repository still in format
1 is refused with the command that migrates it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import UNRESTORABLE, MasterKey, PutKey, damaged_put_key
from bunker.crypto.sign import BadSignature, verify
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.repo import recovery_docs
from bunker.repo.certs import Certificate, parse_certificate
from bunker.repo.config import (
    FORMAT_VERSION,
    LEGACY_FORMAT,
    RepoConfig,
    Revocation,
    make_config,
    new_config,
    parse_config,
)
from bunker.repo.config_chain import ConfigChain, ConfigFloor, Floor, floor_problem, resolve
from bunker.repo.objects import (
    MAGIC_RETIRED,
    MAGIC_SNAPSHOT,
    MAGIC_UNRETIRED,
    SignedObject,
    content_hash,
    is_hash_name,
    name_for,
    parse_signed,
)
from bunker.repo.records import Retirements, parse_retirement, parse_unretirement
from bunker.repo.snapshot import ParsedSnapshot, parse_snapshot
from bunker.repo.trust import chain_trust
from bunker.storage.backend import Backend


class RepositoryError(BunkerError):
    exit_code = ExitCode.BAD_REPOSITORY


def _put_key_name(put: PutKey) -> str:
    return f"the put key {put.path}" if put.path else "the put key"


@dataclass(frozen=True)
class SnapshotRecord:
    """A listed snapshot with its verification state."""

    name: str
    snap: ParsedSnapshot
    trusted: bool  # signature verified, certificate valid, on a trusted chain (revocation, migration)
    problem: str = ""
    stored: float = 0.0  # the storage's own time for the object (0: unknown); see repo/retention.py

    @property
    def short_id(self) -> str:
        return self.name.split("/", 1)[1][:12]


class Repository:
    """A verified view of one repository."""

    def __init__(self, backend: Backend, chain: ConfigChain, configs: dict[str, RepoConfig] | None = None) -> None:
        self.backend = backend
        self.chain = chain
        self.configs = configs if configs is not None else {chain.name: chain.current}
        self.config = chain.current
        self.config_name = chain.name
        self.repo_id = chain.current.repo_id
        self._certs: dict[str, Certificate] = {}
        self._parsed: dict[str, ParsedSnapshot | None] = {}  # hash-named, so never stale
        self._verified: set[str] = set()  # snapshots whose own checks passed (they cannot change)
        # retention records this machine wrote that the storage no longer lists
        # (repo/record_witness.py): counted as present by retirements()
        self.witnessed: dict[str, bytes] = {}
        self._damaged: dict[str, str] = {}  # snapshot objects that do not parse: name -> why

    def with_backend(self, backend: Backend) -> Repository:
        """The same verified view over another backend (e.g. one that spools)."""
        return Repository(backend, self.chain, self.configs)

    @property
    def revoked(self) -> dict[str, tuple[Revocation, ...]]:
        """Revoked certificates -> their revocations (every config branch's, when forked)."""
        return self.chain.revocations

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
        repo = cls(backend, resolve({name: cfg}))
        repo.write_documents()
        ConfigFloor(repo.repo_id).raise_to(cfg.version, name)
        return repo

    @classmethod
    def open(
        cls,
        backend: Backend,
        expected_id: str | None = None,
        *,
        legacy: bool = False,
        floor: bool = True,
        pinned_by: str = "",
    ) -> Repository:
        """Open and verify the config; raise if none is valid for ``expected_id`` (which
        ``pinned_by`` names: "put key file X", "--expect"), if the repository is still in format 1
        (unless ``legacy``: `bunker migrate`), or if its config is below what this machine has
        seen (``floor``)."""
        found: dict[str, RepoConfig] = {}
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
            if found and next(iter(found.values())).repo_id != cfg.repo_id:
                raise RepositoryError(
                    f"repository at {backend.url} holds configs of two different master keys",
                    "someone added a foreign config; run `bunker check --keyless --expect ID` with the id from "
                    "your key file or RECOVERY.md to see which one is yours",
                    exit_code=ExitCode.INTEGRITY,
                )
            found[info.name] = cfg
        if not found:
            if seen_other:
                claimed = ", ".join(sorted(seen_other))
                raise RepositoryError(
                    f"the repository at {backend.url} is not the one "
                    + ("your key is for" if pinned_by else "expected")
                    + f": its config is signed by the master key of repository {claimed}, "
                    + (f"and {pinned_by} is for repository {expected_id}" if pinned_by else f"not {expected_id}"),
                    "if the key or the repository is the wrong one, pass the right key file or --repo; if this is "
                    "your key's own repository, its config was replaced by another master key's: do not back up into "
                    f"it, and compare it with your copy (`bunker check --keyless --expect {expected_id}`)",
                    exit_code=ExitCode.INTEGRITY,
                )
            if problems or any(True for prefix in ("snapshots/", "packs/") for _ in backend.list(prefix)):
                raise RepositoryError(
                    f"no valid config in the repository at {backend.url}: "
                    + (problems[0] if problems else "config/ is empty, yet it holds packs or snapshots (deleted?)"),
                    "restore config/ from a mirror, or run `bunker check --keyless` to see what is damaged",
                    exit_code=ExitCode.INTEGRITY,
                )
            raise RepositoryError(
                f"no bunker repository at {backend.url}",
                "check --repo / BUNKER_REPO, or create one with `bunker init`",
                exit_code=ExitCode.NO_REPOSITORY,
            )
        chain = resolve(found)
        if chain.current.format == LEGACY_FORMAT and not legacy:
            raise RepositoryError(
                f"the repository at {backend.url} is in format version {LEGACY_FORMAT}; this bunker reads format "
                f"{FORMAT_VERSION}, which binds each snapshot to its writer and each revocation to a snapshot",
                f"migrate it once with the master key: `bunker migrate --repo {backend.url}` (docs/format.md, "
                "section 8); older bunker versions keep reading it until then",
            )
        repo = cls(backend, chain, found)
        if floor:
            machine = ConfigFloor(repo.repo_id)
            mine = machine.load()
            if mine is not None:
                repo.enforce_floor(mine)
            if not chain.forked:
                machine.raise_to(chain.current.version, chain.name)
        return repo

    def enforce_floor(self, floor: Floor) -> None:
        """Refuse a config below ``floor`` (a rollback); a config history that does not descend
        from it is treated as a fork (reads go on, writes are refused until it is merged)."""
        problem = floor_problem(self.chain, floor)
        if problem is None:
            return
        kind, message = problem
        if kind == "rollback":
            raise RepositoryError(
                message,
                "do not back up into it: restore config/ from a mirror or the copy you trust (`bunker check --keyless "
                "--expect ID` lists the configs there); if the master key's holder really wants this config, they "
                "run `bunker key merge-configs`, which writes a newer version",
                exit_code=ExitCode.INTEGRITY,
            )
        self.chain = dataclasses.replace(self.chain, fork=tuple(sorted({*self.chain.fork, floor.name})))

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

    def add_config(self, name: str, cfg: RepoConfig) -> None:
        """Take a config version this process just wrote (repo/authority.py) into the view."""
        self.configs[name] = cfg
        self.chain = resolve(self.configs)
        self.config, self.config_name = self.chain.current, self.chain.name
        ConfigFloor(self.repo_id).raise_to(cfg.version, name)

    def refuse_if_forked(self, what: str) -> None:
        """Writes wait until the master key merges a forked config history."""
        if self.chain.forked:
            raise RepositoryError(
                f"cannot {what}: the repository's config history is forked (versions "
                + ", ".join(h.split("/", 1)[1][:12] for h in self.chain.fork)
                + f" besides the current {self.config_name.split('/', 1)[1][:12]}); reading goes on with every "
                "branch's revocations applied",
                "the master key's holder runs `bunker key merge-configs`, which writes a version joining the "
                "branches; then run this again",
                exit_code=ExitCode.INTEGRITY,
            )

    def verify_put_key(self, put: PutKey) -> Certificate:
        """The put key's certificate, once the key is shown to be whole and of this repository,
        without writing anything: every part that later writes depend on must fit the parts the
        master key signed (the certificate, the config), or the data written with it could not
        be read back. Every command that loads a put key goes through here."""
        if put.repo_id != self.repo_id:
            raise RepositoryError(
                f"{_put_key_name(put)} is for repository {put.repo_id}, but the repository at {self.backend.url} is "
                f"{self.repo_id}",
                "pass this repository's put key with --put-key, or the key's repository with --repo",
                exit_code=ExitCode.KEY_MISSING,
            )
        try:
            cert = parse_certificate(put.certificate, self.config.master_verify, self.repo_id)
        except encoding.FormatError as exc:
            raise damaged_put_key(
                put.path, f"the certificate inside it is not valid here ({exc})", UNRESTORABLE
            ) from None
        problem = ""
        if cert.verify_key != put.client_key.public_bytes:
            problem = "its signing key is not the one its certificate names"
        elif cert.domain != put.secrets.domain_id:
            problem = (
                f"its secret belongs to dedup domain {put.secrets.domain_id}, but its certificate to {cert.domain}"
            )
        elif all(put.data_public != c.data_public for c in self.configs.values()):
            problem = "its data public key (to which backups are sealed) is not the repository's"
        elif put.domain != cert.domain_name:
            raise damaged_put_key(
                put.path, f"its dedup domain is named {put.domain!r}, but its certificate names {cert.domain_name!r}"
            )
        if problem:
            raise damaged_put_key(put.path, problem, UNRESTORABLE)
        return cert

    def check_put_key(self, put: PutKey) -> Certificate:
        """Verify that ``put`` belongs here and its certificate is valid (verify_put_key); publish
        the certificate if absent. Every command that writes goes through here: it also refuses
        a config below the put key's floor, a revoked client and a forked config history."""
        self.verify_put_key(put)
        if put.config_version:
            self.enforce_floor(Floor(put.config_version, put.config_name, "the put key (when it was issued)"))
        name = self.put_object("clients", put.certificate)
        cert = self.certificate(name)
        if name in self.revoked:
            raise RepositoryError(
                f"client {cert.client!r} has been revoked in this repository",
                "ask the repository's owner for a new put key (`bunker key new-client NAME`)",
                exit_code=ExitCode.KEY_MISSING,
            )
        self.refuse_if_forked("write")
        return cert

    # ----------------------------------------------------------------- snapshots
    def verify_snapshot_signature(self, snap: ParsedSnapshot) -> tuple[bool, str]:
        """(trusted, problem) for a parsed snapshot on its own: signature, certificate, repository,
        client name and dedup domain. Whether its chain is trusted (revocation, migration) is
        decided over all snapshots (``snapshots``)."""
        env = snap.env
        try:
            cert = self.certificate(env.cert)
        except (CorruptObject, ObjectMissing) as exc:
            return False, f"its certificate is not usable ({exc.message})"
        try:
            verify(cert.verify_key, MAGIC_SNAPSHOT, snap.env_bytes, snap.sig)
        except BadSignature:
            return False, "its signature does not verify (forged or altered)"
        if env.repo_id != self.repo_id:
            return False, "it belongs to another repository"
        if env.client != cert.client:
            return False, "its client name differs from its certificate"
        original = cert
        if env.adopted is not None:
            # only a prune-capable client of the same dedup domain turns another client's dead run
            # into a snapshot; a claim by anyone else would move that run into another chain (and
            # into another client's listing and retention group)
            try:
                original = self.certificate(env.adopted.cert)
            except (CorruptObject, ObjectMissing) as exc:
                return False, f"the certificate of the run it adopted is not usable ({exc.message})"
            if "prune" not in cert.capabilities:
                return False, f"its signer {cert.client!r} has no prune capability, so it may not adopt another run"
            if original.client != env.adopted.client:
                return False, (
                    f"it names client {env.adopted.client!r}, but {env.adopted.cert} belongs to {original.client!r}"
                )
            if cert.domain != original.domain:
                return False, "it adopts a run of another dedup domain than its signer's"
        if env.version >= 2 and env.domain != original.domain:
            return False, (
                f"its dedup domain {env.domain} is not the one of {original.client!r}'s certificate "
                f"({original.domain}): its data cannot be its client's"
            )
        return True, ""

    def _own_trust(self, name: str, snap: ParsedSnapshot) -> tuple[bool, str]:
        """``verify_snapshot_signature`` once per snapshot that passes (a backup lists the
        snapshots twice: for its chain's head, and when it links); a failure is checked again."""
        if name in self._verified:
            return True, ""
        trusted, problem = self.verify_snapshot_signature(snap)
        if trusted:
            self._verified.add(name)
        return trusted, problem

    def parsed_snapshot(self, name: str) -> ParsedSnapshot | None:
        """The parsed snapshot object ``name`` (cached: hash-named objects never change), None
        when it is damaged or malformed (check reports it)."""
        if name not in self._parsed:
            try:
                self._parsed[name] = parse_snapshot(self.get_object(name))
            except CorruptObject as exc:
                self._parsed[name] = None
                self._damaged[name] = exc.problem
            except encoding.FormatError as exc:
                self._parsed[name] = None
                self._damaged[name] = f"malformed: {exc}"
        return self._parsed[name]

    def damaged_snapshots(self) -> dict[str, str]:
        """The listed snapshot objects that are damaged (their bytes do not match their name, or
        they do not parse): name -> what is wrong. Nobody can tell whose they were."""
        out = {}
        for info in self.backend.list("snapshots/"):
            try:
                if self.parsed_snapshot(info.name) is None:
                    out[info.name] = self._damaged.get(info.name, "damaged")
            except ObjectMissing:
                continue  # deleted meanwhile (a prune)
        return out

    def snapshots(self) -> list[SnapshotRecord]:
        """Every snapshot, verified, ordered by time then client and sequence. A snapshot is
        trusted when it verifies on its own and lies on a trusted chain: a revoked client's only
        up to the snapshot its revocation names, a format-1 snapshot only on the chain `bunker
        migrate` recorded."""
        listed: list[tuple[str, ParsedSnapshot, float]] = []
        for info in self.backend.list("snapshots/"):
            try:
                snap = self.parsed_snapshot(info.name)
            except ObjectMissing:
                continue
            if snap is not None:
                listed.append((info.name, snap, info.mtime))
        own = {name: self._own_trust(name, snap) for name, snap, _ in listed}
        chained = chain_trust(
            {name: snap.env for name, snap, _ in listed if own[name][0]},
            self.revoked,
            None if self.config.format == LEGACY_FORMAT else self.chain.legacy,  # format 1: its own rules
        )
        out = []
        for name, snap, stored in listed:
            trusted, problem = own[name]
            if trusted and name in chained:
                trusted, problem = False, chained[name]
            out.append(SnapshotRecord(name, snap, trusted, problem, stored))
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
            if obj.signer in self.revoked:
                raise encoding.FormatError(
                    f"signer {cert.client!r} has been revoked; run the command again with the master key or a "
                    "trusted prune-capable put key if it should really happen"
                )
            key = cert.verify_key
        try:
            verify(key, obj.magic, obj.body_bytes, obj.sig)
        except BadSignature:
            raise encoding.FormatError("its signature does not verify (forged or altered)") from None

    def verify_unretirement(self, data: bytes) -> tuple[str, str]:
        """(retirement record, snapshot) that an unretire record withdraws, once its signature is
        verified and its signer may forget snapshots (the same signers as a retirement)."""
        retirement, snap_name, _signer = parse_unretirement(data)
        self.verify_pruner(parse_signed(data, MAGIC_UNRETIRED), "withdraw retirements")
        return retirement, snap_name

    def read_retirement_record(self, name: str, data: bytes, into: Retirements) -> None:
        """Add one object of ``retired/`` to ``into``: a retirement or an unretire record, by its
        magic. Raise FormatError (or CorruptObject/ObjectMissing for a certificate)."""
        if data[:4] == MAGIC_UNRETIRED:
            into.withdrawals[name] = self.verify_unretirement(data)
        else:
            into.records[name] = self.verify_retirement(data)

    def retirements(self) -> Retirements:
        """Every valid record under ``retired/``, and those in ``witnessed`` (damaged, forged or
        unauthorised ones are only listed in ``problems``; `bunker check` reports them)."""
        out = Retirements()
        listed = [info.name for info in self.backend.list("retired/")]
        for name in listed:
            try:
                self.read_retirement_record(name, self.get_object(name), out)
            except (CorruptObject, ObjectMissing, encoding.FormatError) as exc:
                out.problems.append((name, exc.message if isinstance(exc, BunkerError) else str(exc)))
        for name, data in sorted(self.witnessed.items()):
            if name not in listed:
                try:
                    self.read_retirement_record(name, data, out)
                except (CorruptObject, ObjectMissing, encoding.FormatError) as exc:
                    out.problems.append((name, exc.message if isinstance(exc, BunkerError) else str(exc)))
        return out

    def retired_snapshots(self) -> set[str]:
        """Names (``snapshots/<hex>``) of the snapshots that are retired: a valid retirement record
        names them and no valid unretire record withdraws it."""
        return self.retirements().retired()

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
