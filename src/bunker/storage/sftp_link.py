"""Reaching an sftp server: ``sftp://`` URLs, the user's ssh settings (keys, ~/.ssh/config,
known_hosts, BUNKER_SSH_IDENTITY and BUNKER_SSH_KNOWN_HOSTS), opening an SSH connection with
them, and what a refused connection means in words and next steps: an unknown or changed host
key (with its fingerprint and the ssh-keyscan command that trusts it), a refused login, an
unusable key."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncssh

from bunker.errors import BunkerError, ExitCode, StorageError
from bunker.storage.ssh_address import SshAddress, parse_ssh_address, ssh_dir

DEFAULT_PORT = 22
KEEPALIVE_SECONDS = 30.0
IDENTITY_VAR = "BUNKER_SSH_IDENTITY"
KNOWN_HOSTS_VAR = "BUNKER_SSH_KNOWN_HOSTS"
_URL_HINT = (
    "write it as sftp://USER@HOST:PORT/ABSOLUTE/PATH, or sftp://USER@HOST/~/PATH for a directory below "
    "the login directory"
)

# asyncssh logs every connection at INFO; bunker reports failures itself
logging.getLogger("asyncssh").setLevel(logging.WARNING)


def _usage(message: str, hint: str = _URL_HINT) -> BunkerError:
    return BunkerError(message, hint, exit_code=ExitCode.USAGE)


# ------------------------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class SftpLocation(SshAddress):
    """A parsed ``sftp://`` repository URL. ``path`` is absolute, or relative to the login
    directory (``.`` for the login directory itself); ``user`` and ``port`` are None when the
    URL does not give them (then ~/.ssh/config or the defaults apply)."""

    @property
    def url(self) -> str:
        """The canonical URL: what error messages show and worker processes reopen."""
        return self.canonical("sftp")

    @property
    def where(self) -> str:
        """How error messages name the place: ``sftp server HOST:PORT, directory PATH``."""
        return f"sftp server {self.host_port}, directory {self.shown_path}"

    def ssh_command(self) -> str:
        """The ssh command line that tests the same login."""
        port = f"-p {self.port} " if self.port is not None and self.port != DEFAULT_PORT else ""
        user = f"{self.user}@" if self.user else ""
        return f"ssh {port}{user}{self.host}"


def parse_sftp_url(url: str) -> SftpLocation:
    """Parse ``sftp://[user@]host[:port]/path``: ``/path`` is absolute, ``/~/path`` below the
    login directory."""
    parts = urlsplit(url)
    if parts.scheme != "sftp":
        raise _usage(f"{url!r} is not an sftp:// URL")
    if parts.query or parts.fragment:
        raise _usage(f"sftp:// URLs take no parameters ({url!r})")
    a = parse_ssh_address(parts, url, _URL_HINT)
    return SftpLocation(a.host, a.port, a.user, a.path)


# ----------------------------------------------------------------------------------- connections

# the private key files ssh and asyncssh try when nothing names one (asyncssh's order)
DEFAULT_KEY_FILES = ("id_ed25519_sk", "id_ecdsa_sk", "id_ed448", "id_ed25519", "id_ecdsa", "id_rsa", "id_dsa")
_NO_FILES: list[str] = []  # marks "no key file": the agent's keys are fetched when connecting


def _names_identities(config: str) -> bool:
    """Whether an ssh config file names key files of its own (IdentityFile)."""
    try:
        with open(config, encoding="utf-8", errors="replace") as f:
            return any(line.strip().lower().startswith("identityfile") for line in f)
    except OSError:
        return False


async def _agent_keys() -> list[Any]:
    """The keys of the running ssh-agent (SSH_AUTH_SOCK), none without one."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        async with asyncssh.connect_agent() as agent:
            return list(await agent.get_keys())
    except (OSError, asyncssh.Error):
        return []


class Link:
    """One SSH connection and how many SFTP channels it carries (touched on the loop only)."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.channels = 0
        self.full = False  # the server refused one more channel on it
        self.lost = False


class _HostKeySeen:
    """What the server presented when its host key was not trusted."""

    def __init__(self) -> None:
        self.key: asyncssh.SSHKey | None = None
        self.host = ""
        self.addr = ""
        self.port = DEFAULT_PORT


class _Client(asyncssh.SSHClient):
    def __init__(self, seen: _HostKeySeen) -> None:
        self._seen = seen
        self.link: Link | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # called only for a key that known_hosts does not trust: remember it for the message
        self._seen.key, self._seen.host, self._seen.addr, self._seen.port = key, host, addr, port
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.lost = True


class Connector:
    """Opens SSH connections for one location with the user's ssh settings."""

    def __init__(self, loc: SftpLocation, env: Mapping[str, str], timeout: float) -> None:
        self.loc = loc
        self.timeout = timeout
        self.identity = env.get(IDENTITY_VAR) or None
        self.known_hosts = env.get(KNOWN_HOSTS_VAR) or None
        for var, path in ((IDENTITY_VAR, self.identity), (KNOWN_HOSTS_VAR, self.known_hosts)):
            if path is not None and not os.access(path, os.R_OK):
                raise BunkerError(
                    f"{var}={path} is not a readable file",
                    f"point {var} at an existing file, or unset it to use the defaults in {ssh_dir()}",
                    exit_code=ExitCode.USAGE,
                )

    @property
    def known_hosts_file(self) -> str:
        """The one file whose host keys bunker trusts: BUNKER_SSH_KNOWN_HOSTS, else known_hosts
        in :func:`ssh_dir` (the passwd entry's home, as for ssh://)."""
        return self.known_hosts or os.path.join(ssh_dir(), "known_hosts")

    def settings(self) -> dict[str, Any]:
        """asyncssh's config files and keys, from :func:`ssh_dir` (asyncssh's own defaults would
        take ~ from $HOME, OpenSSH takes it from the passwd entry: one rule for both schemes).
        Keys: BUNKER_SSH_IDENTITY; else the IdentityFile lines of the config (a ``~`` in them
        asyncssh expands by $HOME, the same directory unless $HOME was changed); else the
        default id_* files there. The agent's keys count in every case."""
        ssh = ssh_dir()
        config = os.path.join(ssh, "config")
        readable = os.access(config, os.R_OK)
        out: dict[str, Any] = {"config": [config] if readable else []}
        if self.identity:
            out["client_keys"] = [self.identity]
        elif readable and _names_identities(config):
            out["client_keys"] = ()
        else:
            files = [p for n in DEFAULT_KEY_FILES if os.path.isfile(p := os.path.join(ssh, n))]
            # encrypted keys are skipped, as ssh in batch mode skips them (the agent may hold them)
            out.update(client_keys=files or _NO_FILES, ignore_encrypted=True)
        return out

    def trusted_host_keys(self) -> asyncssh.SSHKnownHosts:
        """The entries of known_hosts_file, read for each connection; none when it is missing.
        Always given to asyncssh explicitly: left to its defaults, asyncssh takes
        UserKnownHostsFile from ~/.ssh/config, where ``none`` turns host key checking off."""
        kh = self.known_hosts_file
        try:
            with open(kh, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise StorageError(
                f"cannot read {kh}, the file of trusted ssh host keys: {exc.strerror}",
                f"make {kh} readable for this user, or point {KNOWN_HOSTS_VAR} at another known_hosts file",
                exit_code=ExitCode.FATAL,
            ) from None
        try:
            return asyncssh.import_known_hosts(text)
        except ValueError as exc:
            raise StorageError(
                f"{kh}, the file of trusted ssh host keys, has a line that is not a known_hosts entry ({exc})",
                f"fix or remove that line of {kh}",
                exit_code=ExitCode.FATAL,
            ) from None

    async def connect(self) -> Link:
        seen = _HostKeySeen()
        clients: list[_Client] = []

        def factory() -> _Client:
            client = _Client(seen)
            clients.append(client)
            return client

        kw: dict[str, Any] = {
            # only this file's keys, whatever ~/.ssh/config says (docs/security.md)
            "known_hosts": self.trusted_host_keys(),
            **self.settings(),
            "connect_timeout": self.timeout,
            "keepalive_interval": KEEPALIVE_SECONDS,
            "keepalive_count_max": 3,
            # never fall back to a password or keyboard prompt: bunker runs unattended
            "preferred_auth": "gssapi-keyex,gssapi-with-mic,hostbased,publickey",
            "client_factory": factory,
        }
        if kw["client_keys"] is _NO_FILES:
            # no key file: the agent's keys alone (asyncssh would read $HOME's for an empty list)
            kw["client_keys"] = await _agent_keys() or None
        if self.loc.user:
            kw["username"] = self.loc.user
        port: Any = self.loc.port if self.loc.port is not None else ()
        try:
            conn = await asyncssh.connect(self.loc.host, port, **kw)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._host_key_error(seen, exc) from None
        except asyncssh.PermissionDenied as exc:
            raise StorageError(
                f"the ssh server {self.loc.host_port} refused the login ({exc})",
                f"bunker logs in with the keys of your ssh-agent (SSH_AUTH_SOCK), {ssh_dir()}/id_* and "
                "BUNKER_SSH_IDENTITY; add the public key to ~/.ssh/authorized_keys of the user on the server and "
                "check that "
                f"`{self.loc.ssh_command()}` logs in without a password",
                exit_code=ExitCode.FATAL,
            ) from None
        except asyncssh.KeyImportError as exc:
            raise StorageError(
                f"cannot use the ssh key {self.identity or '(from ' + ssh_dir() + ')'}: {exc}",
                "use a key without a passphrase in BUNKER_SSH_IDENTITY, or load the key into ssh-agent "
                "(`ssh-add FILE`)",
                exit_code=ExitCode.FATAL,
            ) from None
        link = Link(conn)
        for client in clients:
            client.link = link
        return link

    def _host_key_error(self, seen: _HostKeySeen, exc: Exception) -> StorageError:
        kh = self.known_hosts_file
        qkh = shlex.quote(kh)  # the commands in the hint run as printed
        if seen.key is None:
            return StorageError(
                f"refused to connect to the ssh server {self.loc.host_port}: {exc}",
                f"check the server's host key and the entries for it in {kh}",
                exit_code=ExitCode.FATAL,
            )
        port = seen.port or DEFAULT_PORT
        fingerprint = seen.key.get_fingerprint("sha256")
        alg = seen.key.get_algorithm()
        kind = alg.removeprefix("ssh-").split("-", 1)[0]
        host = seen.host or self.loc.host  # after ~/.ssh/config's HostName: what known_hosts must name
        keyscan = f"ssh-keyscan {'-p ' + str(port) + ' ' if port != DEFAULT_PORT else ''}{host} >> {qkh}"
        entry = f"[{host}]:{port}" if port != DEFAULT_PORT else host
        known = False
        with contextlib.suppress(Exception):
            if os.path.isfile(kh):
                known = bool(asyncssh.match_known_hosts(kh, seen.host, seen.addr, port)[0])
        check = (
            f"(on the server: `ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub`)"
            if kind in ("ed25519", "rsa", "ecdsa")
            else ""
        )
        if known:
            return StorageError(
                f"refused to connect to the ssh server {self.loc.host_port}: its host key changed. It now presents "
                f"the {alg} key {fingerprint}, which does not match the key recorded in {kh}. Someone may be "
                "intercepting the connection, or the server was reinstalled",
                f"ask the server's administrator for its key's fingerprint {check}; only if it is {fingerprint}, "
                f"remove the old entry with `ssh-keygen -R '{entry}' -f {qkh}` and trust the new key with `{keyscan}`",
                exit_code=ExitCode.FATAL,
            )
        return StorageError(
            f"refused to connect to the ssh server {self.loc.host_port}: its host key is unknown (not in {kh}, the "
            "only file of host keys bunker trusts). "
            f"The server presents the {alg} key {fingerprint}",
            f"make sure that this is the server's key {check}, then trust it with `{keyscan}` "
            "and run the command again",
            exit_code=ExitCode.FATAL,
        )
