"""Resolving the repository, key files and passphrase for a command.

Key selection: ``--master-key``/BUNKER_MASTER_KEY and ``--put-key``/BUNKER_PUT_KEY, else the files
``keys/<repo id>.master|.put`` in the config directory. The repository id is pinned by the key:
a repository whose config is not signed by that key's master is refused.
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import click

from bunker import dirs
from bunker.child_env import secret
from bunker.crypto.keyfile import (
    KDF_DEFAULTS,
    MasterKey,
    PutKey,
    load_master_key,
    load_put_key,
    master_key_text,
    put_key_text,
    read_master_repo_id,
    write_private_file,
)
from bunker.errors import BunkerError, ExitCode, KeyRequired
from bunker.private_files import tighten_own
from bunker.repo.authority import issue_client
from bunker.repo.repository import Repository
from bunker.storage import open_backend


@dataclass
class Options:
    """Global options shared by every command."""

    repo: str | None
    master_key: str | None
    put_key: str | None
    as_json: bool

    @property
    def repo_url(self) -> str:
        return self.repo or os.environ.get("BUNKER_REPO") or dirs.default_repository()

    @property
    def repo_is_default(self) -> bool:
        return not (self.repo or os.environ.get("BUNKER_REPO"))

    def master_key_file(self, repo_id: str | None) -> str | None:
        p = self.master_key or os.environ.get("BUNKER_MASTER_KEY")
        if p:
            return p
        return dirs.master_key_path(repo_id) if repo_id else None

    def put_key_file(self, repo_id: str | None) -> str | None:
        p = self.put_key or os.environ.get("BUNKER_PUT_KEY")
        if p:
            return p
        return dirs.put_key_path(repo_id) if repo_id else None


PASSPHRASE_TRIES = 3


def passphrase(prompt: str = "Master key passphrase", confirm: bool = False, env: str = "BUNKER_PASSPHRASE") -> str:
    """``env`` (BUNKER_PASSPHRASE), else ask on the terminal; with neither, fail at once (never
    hang). With ``confirm`` (a new passphrase) it is typed twice; after three mismatches the
    command stops with exit 10 (nothing was changed)."""
    value = secret(env)
    if value is not None:
        return value
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise BunkerError(
            "a passphrase for the master key is needed, but there is no terminal to ask it on",
            f"set {env} in the environment (e.g. `{env}=... bunker ...`) or run the command in a terminal",
            exit_code=ExitCode.NEED_PASSPHRASE,
        )
    for attempt in range(1, PASSPHRASE_TRIES + 1):
        first = _ask(prompt)
        if not confirm or _ask("Repeat for confirmation") == first:
            return first
        left = PASSPHRASE_TRIES - attempt
        if left:
            tries = "try" if left == 1 else "tries"
            click.echo(f"The two passphrases differ; type it again ({left} more {tries}).", err=True)
    raise BunkerError(
        f"the passphrase and its confirmation differed {PASSPHRASE_TRIES} times; nothing was changed",
        f"run the command again and type the same passphrase twice, or set {env} in the environment",
        exit_code=ExitCode.NEED_PASSPHRASE,
    )


def _ask(prompt: str) -> str:
    """One hidden line from the terminal; end of input is no passphrase (exit 10), Ctrl-C stays
    an interrupt (exit 130)."""
    try:
        return getpass.getpass(f"{prompt}: ", stream=sys.stderr)
    except EOFError:
        raise BunkerError(
            "no passphrase was typed (end of input)",
            "run the command again and type the passphrase, or set BUNKER_PASSPHRASE in the environment",
            exit_code=ExitCode.NEED_PASSPHRASE,
        ) from None


def explicit_key(opts: Options) -> tuple[str, str] | None:
    """(repository id, which file says so) of an explicitly given key file, if any."""
    p = opts.put_key or os.environ.get("BUNKER_PUT_KEY")
    if p:
        return load_put_key(p).repo_id, f"put key file {p}"
    p = opts.master_key or os.environ.get("BUNKER_MASTER_KEY")
    if p:
        return read_master_repo_id(p), f"master key file {p}"
    return None


def explicit_repo_id(opts: Options) -> str | None:
    """The repository id named by an explicitly given key file, if any."""
    pinned = explicit_key(opts)
    return pinned[0] if pinned else None


def open_repository(opts: Options) -> Repository:
    """Open the repository, pinned to the id of an explicitly given key file when there is one."""
    if os.path.isabs(opts.repo_url):
        tighten_own(opts.repo_url, children=True)  # the default repository lives in bunker's data directory
    backend = open_backend(opts.repo_url)
    pinned = explicit_key(opts)
    if pinned is None:
        return Repository.open(backend)
    return Repository.open(backend, pinned[0], pinned_by=pinned[1])


def refuse_on_node(repo: Repository, what: str) -> None:
    """Stop before ``what`` (forget, prune, unforget, key changes) when the repository is reached
    through a node: those run only on the repository of record (docs/hierarchy.md, "Roles")."""
    node = getattr(repo.backend, "server_node", "")
    if node:
        raise BunkerError(
            f"the repository at {repo.backend.url} is served by node {node!r}, which takes backups append-only: "
            f"{what} runs only on the repository of record. Nothing was changed",
            "run the same command with --repo naming the repository of record (the top of the hierarchy); "
            "what it decides reaches the node with its next `bunker node forward`",
            exit_code=ExitCode.USAGE,
        )


def load_put(opts: Options, repo: Repository) -> PutKey:
    """The put key for ``repo``; a clear error if there is none."""
    path = opts.put_key_file(repo.repo_id)
    if not path or not os.path.exists(path):
        raise KeyRequired(
            f"no put key for repository {repo.repo_id[:16]}… (looked for {path})",
            "pass it with --put-key FILE or BUNKER_PUT_KEY; the repository's owner makes one with "
            "`bunker key new-client NAME --out FILE`",
        )
    tighten_own(path)
    put = load_put_key(path)
    repo.verify_put_key(put)  # a damaged key is refused before it reads or writes anything
    return put


def load_master(opts: Options, repo: Repository, purpose: str) -> MasterKey:
    """The master key for ``repo`` (asks for the passphrase); refuses clearly without it."""
    return start_master(opts, repo, purpose)()


def start_master(opts: Options, repo: Repository, purpose: str) -> Callable[[], MasterKey]:
    """:func:`load_master` in two halves: the key file is found and the passphrase asked now,
    the key derivation (Argon2id: a fraction of a second of CPU, which runs without the
    interpreter's lock) runs in a thread, so the caller reads what needs no key meanwhile. The function returned
    waits for the key and raises what load_master would (a wrong passphrase)."""
    path = _master_path(opts, repo, purpose)
    pw = passphrase()
    got: list[MasterKey | BaseException] = []

    def derive() -> None:
        try:
            got.append(load_master_key(path, pw))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            got.append(exc)

    thread = threading.Thread(target=derive, name="bunker-key-derivation", daemon=True)
    thread.start()

    def wait() -> MasterKey:
        thread.join()
        if isinstance(got[0], BaseException):
            raise got[0]
        return got[0]

    return wait


def _master_path(opts: Options, repo: Repository, purpose: str) -> str:
    """The master key file for ``repo``, checked to be there and to be this repository's."""
    path = opts.master_key_file(repo.repo_id)
    if not path or not os.path.exists(path):
        has_put = bool(opts.put_key_file(repo.repo_id)) and os.path.exists(opts.put_key_file(repo.repo_id) or "")
        raise KeyRequired(
            f"{purpose} needs the master key, and there is none here (looked for {path})"
            + ("; the put key on this machine can only back up" if has_put else ""),
            "pass it with --master-key FILE (or BUNKER_MASTER_KEY), e.g. from the medium you exported it to",
        )
    key_repo = read_master_repo_id(path)
    if key_repo != repo.repo_id:
        raise KeyRequired(
            f"master key file {path} is for repository {key_repo}, but the repository at {repo.backend.url} is "
            f"{repo.repo_id}",
            "pass this repository's master key with --master-key, or the key's repository with --repo",
        )
    tighten_own(path)
    return path


def master_on_client(repo_id: str) -> bool:
    """True while the master key file still sits in this machine's config directory."""
    return os.path.exists(dirs.master_key_path(repo_id))


@dataclass
class Created:
    repo: Repository
    master_path: str
    put_path: str


def init_repository(url: str, client_name: str, host: str = "", kdf_memory_kib: int = KDF_DEFAULTS["m"]) -> Created:
    """Create a repository, its master key (passphrase-protected, with Argon2id's memory cost
    ``kdf_memory_kib``) and this machine's put key, whose certificate binds ``host`` (default:
    this machine's name; sealed, see docs/security.md)."""
    import socket

    host = host or socket.gethostname()
    # ask first: a run that cannot get a passphrase must not leave anything behind
    pw = passphrase("New master key passphrase", confirm=True)
    if not pw:
        raise BunkerError(
            "the master key passphrase is empty",
            "choose a passphrase (BUNKER_PASSPHRASE or the prompt)",
            exit_code=ExitCode.USAGE,
        )
    if os.path.isabs(url):
        tighten_own(url)
    backend = open_backend(url, create=True)
    if any(True for _ in backend.list("config/")):
        raise BunkerError(
            f"a repository already exists at {url}",
            "use it as it is (bunker backup --repo ...), or choose another --repo for a new repository",
            exit_code=ExitCode.BAD_REPOSITORY,
        )
    master = MasterKey.generate()
    master_path = dirs.master_key_path(master.repo_id)
    # the key file first: a repository without its key would be useless
    write_private_file(master_path, master_key_text(master, pw, kdf_memory_kib))
    repo = Repository.create(backend, master)
    put = issue_client(repo, master, client_name, ("backup",), host=host)
    put_path = dirs.put_key_path(repo.repo_id)
    write_private_file(put_path, put_key_text(put, client_name))
    return Created(repo, master_path, put_path)


def master_warning(master_path: str) -> str:
    return (
        f"The master key is at {master_path}. It is the only way to read these backups, and anyone who "
        "gets it and its passphrase can read them too: move it off this machine, e.g. "
        f"`bunker key export --master /media/usb/bunker-master.key --remove` (or make shares with "
        "`bunker key export --shares 3-of-5`). Until it is moved, every backup run reports this."
    )
