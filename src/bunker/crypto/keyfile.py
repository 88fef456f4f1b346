"""Key files: the passphrase-protected master key and the password-less put key.

Both are ASCII files (a comment header naming the repository, then base64 of canonical msgpack),
so they can be printed, mailed to oneself or pasted into a password manager.
"""

from __future__ import annotations

import base64
import os
import re
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
DEFAULT_KDF_MEMORY_MIB = KDF_DEFAULTS["m"] >> 10
# the memory cost `bunker init --kdf-memory` accepts, in MiB, and the one a reader accepts, in KiB
KDF_MEMORY_MIB = (1, 4096)
KDF_MEMORY_KIB = (8, 4 << 20)


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
    path: str = field(default="", compare=False)  # the file it was read from (for messages)

    def __post_init__(self) -> None:
        actual = fingerprint(self.master_verify)
        if actual != self.repo_id:
            raise damaged_put_key(
                self.path,
                f"the repository id inside it ({self.repo_id}) is not the fingerprint of the master verify key "
                f"inside it ({actual})",
            )


UNRESTORABLE = "backups with it could not be restored, so nothing was written with it"


def damaged_put_key(path: str, problem: str, consequence: str = "nothing was written with it") -> KeyFileError:
    """The error for a put key file whose parts do not fit together."""
    what = f"put key file {path}" if path else "the put key"
    return KeyFileError(
        f"{what} is damaged: {problem}; {consequence}",
        "restore the file from your copy, or make a new put key with `bunker key new-client NAME --out FILE` on the "
        "machine with the master key (then `bunker key revoke` the old client if the file may have leaked)",
    )


def _armor(label: str, comment: list[str], payload: dict[str, Any]) -> str:
    body = base64.b64encode(encoding.pack(payload)).decode()
    lines = [f"# {c}" for c in comment] + [f"-----BEGIN {label}-----"]
    lines += [body[i : i + 64] for i in range(0, len(body), 64)]
    lines.append(f"-----END {label}-----")
    return "\n".join(lines) + "\n"


_KINDS = {MASTER_LABEL: ("master key", "--master-key"), PUT_LABEL: ("put key", "--put-key")}


def _dearmor(text: str, label: str, path: str) -> dict[str, Any]:
    what, option = _KINDS[label]
    other = PUT_LABEL if label == MASTER_LABEL else MASTER_LABEL
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if begin not in text:
        if f"-----BEGIN {other}-----" in text:
            other_what, other_option = _KINDS[other]
            raise KeyFileError(
                f"{path} is a {other_what} file, not a {what} file",
                f"pass it with {other_option}, and the {what} file with {option}",
            )
        problem = "it is empty" if not text.strip() else "it holds no bunker key"
        raise KeyFileError(
            f"{path} is not a {what} file: {problem}",
            f"pass the {what} file (it starts with a comment naming the repository, then {begin})",
        )
    if end not in text.split(begin, 1)[1]:
        raise KeyFileError(
            f"{what} file {path} is truncated: it has no {end} line",
            "restore it from your copy (the whole file, up to its END line)",
        )
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        raw = base64.b64decode("".join(body.split()), validate=True)
    except ValueError as exc:
        raise KeyFileError(
            f"{what} file {path} is damaged: its text is not valid base64 ({exc})", "restore it from your copy"
        ) from None
    try:
        return encoding.expect_map(encoding.unpack(raw), "v", "kind", "repo")
    except encoding.FormatError as exc:
        raise KeyFileError(
            f"{what} file {path} is damaged: its content does not decode ({exc})", "restore it from your copy"
        ) from None


def _header_repo_id(text: str) -> str | None:
    """The repository id named in a key file's first comment line (written by every bunker)."""
    m = re.search(r"^# Bunker (?:master|put) key .*repository ([0-9a-f]{64})\s*$", text, re.MULTILINE)
    return m.group(1) if m else None


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


MASTER_KEY_SUM = b"bunker master key file sum\x00"


def _sum(context: bytes, payload: dict[str, Any]) -> bytes:
    """The checksum of a key file's fields (all but ``sum``): a damaged file is told from a wrong
    passphrase, and a damaged put key is caught before it writes data nobody could read back."""
    import blake3

    return blake3.blake3(context + encoding.pack({k: v for k, v in payload.items() if k != "sum"})).digest(16)


def _sum_holds(context: bytes, m: dict[str, Any]) -> bool:
    """Whether a read file's ``sum`` matches its fields (a map that cannot be packed does not)."""
    try:
        return bool(m["sum"] == _sum(context, m))
    except (TypeError, ValueError, OverflowError):
        return False


def master_key_text(key: MasterKey, passphrase: str, memory_kib: int = KDF_DEFAULTS["m"]) -> str:
    """The master key file's text, the seed sealed under an Argon2id key of ``passphrase``
    (``memory_kib``: Argon2id's memory cost; each guess at the passphrase costs that much)."""
    salt = os.urandom(16)
    kdf = {**KDF_DEFAULTS, "m": memory_kib}
    kek = _kek(passphrase, salt, **kdf)
    box = aead.encrypt(kek, key.seed, b"bunker master key v1\x00" + key.repo_id.encode())
    payload: dict[str, Any] = {
        "v": 1,
        "kind": "master",
        "repo": key.repo_id,
        "kdf": {"alg": "argon2id", "salt": salt, **kdf},
        "box": box,
    }
    payload["sum"] = _sum(MASTER_KEY_SUM, payload)
    comment = [
        f"Bunker master key of repository {key.repo_id}",
        "It decrypts every backup. Protected by a passphrase (Argon2id).",
        "Keep it OFF the machines that back up; see RECOVERY.md in the repository.",
    ]
    return _armor(MASTER_LABEL, comment, payload)


def _master_payload(path: str) -> dict[str, Any]:
    """A master key file's map, checked as far as it can be without the passphrase: its checksum
    (files written before it existed: the id in its first line)."""
    text = _read(path, "master key file")
    m = _dearmor(text, MASTER_LABEL, path)
    if m.get("kind") != "master" or not isinstance(m.get("repo"), str):
        raise KeyFileError(
            f"master key file {path} is damaged: its fields are not those of a master key", "restore it from your copy"
        )
    if "sum" in m:
        if not _sum_holds(MASTER_KEY_SUM, m):
            raise KeyFileError(
                f"master key file {path} is damaged: its checksum does not match its content",
                "restore it from your copy, or recover the key from its shares (`bunker key recover`, RECOVERY.md)",
            )
        return m
    header = _header_repo_id(text)
    if header is not None and header != m["repo"]:
        raise KeyFileError(
            f"master key file {path} is damaged: the repository id inside it ({m['repo']}) differs from the one "
            f"in its first line ({header})",
            "restore it from your copy, or recover the key from its shares (`bunker key recover`, RECOVERY.md)",
        )
    return m


def master_kdf_memory(path: str) -> int:
    """Argon2id's memory cost (KiB) of a master key file, read without the passphrase (the
    default where the file does not say: load_master_key refuses such a file anyway)."""
    kdf = _master_payload(path).get("kdf")
    m = kdf.get("m") if isinstance(kdf, dict) else None
    lo, hi = KDF_MEMORY_KIB
    return m if isinstance(m, int) and lo <= m <= hi else KDF_DEFAULTS["m"]


def read_master_repo_id(path: str) -> str:
    """The repository id a master key file is for, without the passphrase."""
    return str(_master_payload(path)["repo"])


def load_master_key(path: str, passphrase: str) -> MasterKey:
    """Open a master key file; raise WrongPassphrase or KeyFileError."""
    m = _master_payload(path)
    damaged = "restore it from your copy, or recover the key from its shares (`bunker key recover`, RECOVERY.md)"
    try:
        kdf = encoding.expect_map(m["kdf"], "alg", "salt", "t", "m", "p")
        lo, hi = KDF_MEMORY_KIB
        if kdf["alg"] != "argon2id" or not (1 <= kdf["t"] <= 64 and lo <= kdf["m"] <= hi and 1 <= kdf["p"] <= 64):
            raise encoding.FormatError("unsupported key derivation parameters")
        kek = _kek(passphrase, kdf["salt"], kdf["t"], kdf["m"], kdf["p"])
        box = encoding.field_bytes(m, "box")
    except (KeyError, TypeError, ValueError) as exc:  # ValueError: FormatError, or Argon2id refusing parameters
        raise KeyFileError(f"master key file {path} is damaged: {exc}", damaged) from None
    try:
        seed = aead.decrypt(kek, box, b"bunker master key v1\x00" + str(m["repo"]).encode())
    except aead.DecryptionFailed:
        raise WrongPassphrase(
            f"the passphrase does not open the master key {path}",
            "type the passphrase again (or fix BUNKER_PASSPHRASE); if it is lost, recover the key from its shares "
            "(RECOVERY.md)"
            + (
                ""
                if "sum" in m
                else "; this file has no checksum (an older bunker wrote it), so if you are sure of the passphrase "
                "it may be damaged: try your other copy"
            ),
        ) from None
    if len(seed) != SEED_SIZE:
        raise KeyFileError(f"master key file {path} is damaged: its seed has {len(seed)} bytes, not 32", damaged)
    key = MasterKey(seed)
    if key.repo_id != m["repo"]:
        raise KeyFileError(
            f"master key file {path} is damaged: its seed belongs to repository {key.repo_id}, but the file names "
            f"{m['repo']}",
            damaged,
        )
    return key


PUT_KEY_SUM = b"bunker put key file v2\x00"


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
    payload["sum"] = _sum(PUT_KEY_SUM, payload)
    comment = [
        f"Bunker put key of client {client_name!r} for repository {key.repo_id}",
        "It can take backups but cannot read them. Keep it private (mode 0600):",
        "whoever holds it can add data and confirm guessed content until the client is revoked.",
    ]
    return _armor(PUT_LABEL, comment, payload)


def load_put_key(path: str) -> PutKey:
    """Read a put key file; raise KeyFileError if it is missing or damaged."""
    m = _dearmor(_read(path, "put key file"), PUT_LABEL, path)
    # the checksum first: a damaged version number must not pass for an older or newer format
    if "sum" in m and not _sum_holds(PUT_KEY_SUM, m):
        raise damaged_put_key(path, "its checksum does not match its content", UNRESTORABLE)
    if m.get("v") not in (1, 2):
        raise KeyFileError(
            f"put key file {path} has version {m.get('v')!r}, which this bunker does not know", "use a newer bunker"
        )
    if m["v"] >= 2 and "sum" not in m:
        raise damaged_put_key(path, "its checksum is missing")
    if m.get("kind") != "put":
        raise damaged_put_key(path, f"it says it is a {m.get('kind')!r} key")
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
            path=path,
        )
    except (KeyError, ValueError, TypeError, encoding.FormatError) as exc:
        raise damaged_put_key(path, f"a field is malformed ({exc})") from None
