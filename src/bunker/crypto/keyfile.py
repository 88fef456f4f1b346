"""Key files: the passphrase-protected master key and the password-less put key.

Both are ASCII files (a comment header naming the repository, then base64 of canonical msgpack),
so they can be printed, mailed to oneself or pasted into a password manager.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import SEED_SIZE, PutSecrets, put_secret_for_domain
from bunker.crypto.kem import DataPrivateKey, DataPublicKey
from bunker.crypto.sign import SigningKey, fingerprint
from bunker.errors import BunkerError, ExitCode
from bunker.private_files import write_private_file as write_private_file  # key and state files' writer

MASTER_LABEL = "BUNKER MASTER KEY"
PUT_LABEL = "BUNKER PUT KEY"
DEFAULT_DOMAIN = "default"
# Argon2id cost: ~0.15 s and 64 MiB on the 2-core reference machine.
KDF_DEFAULTS = {"t": 3, "m": 65536, "p": 4}


class KeyFileError(BunkerError):
    """A key file that is missing, malformed, for another repository, or not openable."""

    exit_code = ExitCode.BAD_REPOSITORY


class WrongPassphrase(BunkerError):
    """The passphrase does not open the master key."""

    exit_code = ExitCode.BAD_PASSPHRASE


@dataclass
class MasterKey:
    """The master seed and everything derived from it. Only restore, check --read-data and key
    management load it; the backup code path never does."""

    seed: bytes
    _domains: dict[str, PutSecrets] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_SIZE:
            raise ValueError("master seed must be 32 bytes")
        self.signing = SigningKey.master_from_seed(self.seed)
        self.data_private = DataPrivateKey(self.seed)
        self.data_public = self.data_private.public()
        self.repo_id = fingerprint(self.signing.public_bytes)

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random master seed."""
        return cls(os.urandom(SEED_SIZE))

    def put_secrets(self, domain: str = DEFAULT_DOMAIN) -> PutSecrets:
        """S of a dedup domain (cached)."""
        if domain not in self._domains:
            self._domains[domain] = put_secret_for_domain(self.seed, domain)
        return self._domains[domain]


@dataclass
class PutKey:
    """What a backup machine holds: no password, cannot decrypt (docs/security.md section 3)."""

    repo_id: str
    master_verify: bytes
    data_public: DataPublicKey
    domain: str
    secrets: PutSecrets
    client_key: SigningKey
    certificate: bytes  # the clients/ object bytes, signed by the master
    config_version: int = 0  # the repository's config when the key was issued: a fresh machine's floor
    config_name: str = ""
    host: str = ""  # the host the certificate binds ("" when none)
    host_salt: bytes = b""  # the salt of the certificate's host commitment

    def __post_init__(self) -> None:
        if fingerprint(self.master_verify) != self.repo_id:
            raise KeyFileError(
                "put key is inconsistent: its master verify key does not match its repository id",
                "the key file is damaged; make a new one with `bunker key new-client NAME --out FILE`",
            )


def _armor(label: str, comment: list[str], payload: dict[str, Any]) -> str:
    body = base64.b64encode(encoding.pack(payload)).decode()
    lines = [f"# {c}" for c in comment] + [f"-----BEGIN {label}-----"]
    lines += [body[i : i + 64] for i in range(0, len(body), 64)]
    lines.append(f"-----END {label}-----")
    return "\n".join(lines) + "\n"


def _dearmor(text: str, label: str, path: str) -> dict[str, Any]:
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if begin not in text or end not in text:
        other = "put key" if label == MASTER_LABEL else "master key"
        hint = f"this looks like a {other} file" if ("BEGIN BUNKER" in text) else "it is not a bunker key file"
        raise KeyFileError(f"{path} is not a {label.lower()} file", f"{hint}; pass the right file")
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        raw = base64.b64decode("".join(body.split()), validate=True)
        return encoding.expect_map(encoding.unpack(raw), "v", "kind", "repo")
    except (ValueError, encoding.FormatError) as exc:
        raise KeyFileError(f"key file {path} is damaged ({exc})", "restore it from your copy") from None


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1 << 20)
    except FileNotFoundError:
        raise KeyFileError(
            f"{what} {path} does not exist",
            "pass the key file with --master-key/--put-key (or BUNKER_MASTER_KEY/BUNKER_PUT_KEY)",
            exit_code=ExitCode.KEY_MISSING,
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}", "check its permissions") from None


def _kek(passphrase: str, salt: bytes, t: int, m: int, p: int) -> bytes:
    return Argon2id(salt=salt, length=32, iterations=t, lanes=p, memory_cost=m).derive(passphrase.encode())


def master_key_text(key: MasterKey, passphrase: str) -> str:
    """The master key file's text, the seed sealed under an Argon2id key of ``passphrase``."""
    salt = os.urandom(16)
    kek = _kek(passphrase, salt, **KDF_DEFAULTS)
    box = aead.encrypt(kek, key.seed, b"bunker master key v1\x00" + key.repo_id.encode())
    payload = {
        "v": 1,
        "kind": "master",
        "repo": key.repo_id,
        "kdf": {"alg": "argon2id", "salt": salt, **KDF_DEFAULTS},
        "box": box,
    }
    comment = [
        f"Bunker master key of repository {key.repo_id}",
        "It decrypts every backup. Protected by a passphrase (Argon2id).",
        "Keep it OFF the machines that back up; see RECOVERY.md in the repository.",
    ]
    return _armor(MASTER_LABEL, comment, payload)


def read_master_repo_id(path: str) -> str:
    """The repository id a master key file is for, without the passphrase."""
    return str(_dearmor(_read(path, "master key file"), MASTER_LABEL, path)["repo"])


def load_master_key(path: str, passphrase: str) -> MasterKey:
    """Open a master key file; raise WrongPassphrase or KeyFileError."""
    m = _dearmor(_read(path, "master key file"), MASTER_LABEL, path)
    try:
        kdf = encoding.expect_map(m["kdf"], "alg", "salt", "t", "m", "p")
        if kdf["alg"] != "argon2id" or not (1 <= kdf["t"] <= 64 and 8 <= kdf["m"] <= 4 << 20 and 1 <= kdf["p"] <= 64):
            raise encoding.FormatError("unsupported key derivation parameters")
        kek = _kek(passphrase, kdf["salt"], kdf["t"], kdf["m"], kdf["p"])
        box = encoding.field_bytes(m, "box")
    except (KeyError, TypeError, ValueError) as exc:  # ValueError: FormatError, or Argon2id refusing parameters
        raise KeyFileError(f"master key file {path} is damaged ({exc})", "restore it from your copy") from None
    try:
        seed = aead.decrypt(kek, box, b"bunker master key v1\x00" + str(m["repo"]).encode())
    except aead.DecryptionFailed:
        raise WrongPassphrase(
            f"the passphrase does not open the master key {path}",
            "type the passphrase again (or fix BUNKER_PASSPHRASE); if it is lost, recover the key from "
            "its shares (RECOVERY.md)",
        ) from None
    if len(seed) != SEED_SIZE:
        raise KeyFileError(f"master key file {path} is inconsistent (bad seed size)", "restore it from your copy")
    key = MasterKey(seed)
    if key.repo_id != m["repo"]:
        raise KeyFileError(f"master key file {path} is inconsistent", "restore it from your copy")
    return key


PUT_KEY_SUM = b"bunker put key file v2\x00"


def _put_key_sum(payload: dict[str, Any]) -> bytes:
    """The checksum of a put key file's fields (all but ``sum``): a damaged secret is caught
    when the key is loaded, before it writes data nobody could read back."""
    import blake3

    return blake3.blake3(PUT_KEY_SUM + encoding.pack({k: v for k, v in payload.items() if k != "sum"})).digest(16)


def put_key_text(key: PutKey, client_name: str) -> str:
    """The put key file's text (no passphrase: a backup must run unattended)."""
    payload: dict[str, Any] = {
        "v": 2,
        "kind": "put",
        "repo": key.repo_id,
        "master_verify": key.master_verify,
        "data_mlkem": key.data_public.mlkem,
        "data_x25519": key.data_public.x25519,
        "domain": key.domain,
        "secret": key.secrets.secret,
        "client_key": key.client_key.private_bytes,
        "cert": key.certificate,
        "config": {"version": key.config_version, "name": key.config_name},
        "host": key.host,
        "host_salt": key.host_salt,
    }
    payload["sum"] = _put_key_sum(payload)
    comment = [
        f"Bunker put key of client {client_name!r} for repository {key.repo_id}",
        "It can take backups but cannot read them. Keep it private (mode 0600):",
        "whoever holds it can add data and confirm guessed content until the client is revoked.",
    ]
    return _armor(PUT_LABEL, comment, payload)


def load_put_key(path: str) -> PutKey:
    """Read a put key file; raise KeyFileError if it is missing or damaged."""
    m = _dearmor(_read(path, "put key file"), PUT_LABEL, path)
    if m.get("v") not in (1, 2):
        raise KeyFileError(
            f"put key file {path} has version {m.get('v')!r}, which this bunker does not know", "use a newer bunker"
        )
    if m["v"] >= 2 and m.get("sum") != _put_key_sum(m):
        raise KeyFileError(
            f"put key file {path} is damaged: its checksum does not match its content",
            "restore it from your copy, or make a new one with `bunker key new-client NAME --out FILE` on the machine "
            "with the master key; backups with a damaged key could not be restored",
        )
    try:
        floor = encoding.expect_map(m.get("config", {"version": 0, "name": ""}), "version", "name")
        return PutKey(
            repo_id=str(m["repo"]),
            master_verify=encoding.field_bytes(m, "master_verify", 32),
            data_public=DataPublicKey(encoding.field_bytes(m, "data_mlkem"), encoding.field_bytes(m, "data_x25519")),
            domain=encoding.field(m, "domain", str),
            secrets=PutSecrets(encoding.field_bytes(m, "secret", 32)),
            client_key=SigningKey(encoding.field_bytes(m, "client_key", 32)),
            certificate=encoding.field_bytes(m, "cert"),
            config_version=encoding.field(floor, "version", int),
            config_name=encoding.field(floor, "name", str),
            host=str(m.get("host", "")),
            host_salt=bytes(m.get("host_salt", b"")),
        )
    except (KeyError, ValueError, TypeError, encoding.FormatError) as exc:
        raise KeyFileError(f"put key file {path} is damaged ({exc})", "restore it from your copy") from None
