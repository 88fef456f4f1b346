"""Resolving the repository, key files and passphrase for a command.

Key selection: ``--master-key``/BUNKER_MASTER_KEY and ``--put-key``/BUNKER_PUT_KEY, else the files
``keys/<repo id>.master|.put`` in the config directory. The repository id is pinned by the key:
a repository whose config is not signed by that key's master is refused.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import click

from bunker import dirs
from bunker.child_env import secret
from bunker.crypto.keyfile import (
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


def passphrase(prompt: str = "Master key passphrase", confirm: bool = False) -> str:
    """BUNKER_PASSPHRASE, else ask on the terminal; with neither, fail at once (never hang)."""
    env = secret("BUNKER_PASSPHRASE")
    if env is not None:
        return env
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise BunkerError(
            "a passphrase for the master key is needed, but there is no terminal to ask it on",
            "set BUNKER_PASSPHRASE in the environment (e.g. `BUNKER_PASSPHRASE=... bunker ...`) or run the "
            "command in a terminal",
            exit_code=ExitCode.NEED_PASSPHRASE,
        )
    value: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
    return value


def explicit_repo_id(opts: Options) -> str | None:
    """The repository id named by an explicitly given key file, if any."""
    p = opts.put_key or os.environ.get("BUNKER_PUT_KEY")
    if p:
        return load_put_key(p).repo_id
    p = opts.master_key or os.environ.get("BUNKER_MASTER_KEY")
    if p:
        return read_master_repo_id(p)
    return None


def open_repository(opts: Options) -> Repository:
    """Open the repository, pinned to the id of an explicitly given key file when there is one."""
    if os.path.isabs(opts.repo_url):
        tighten_own(opts.repo_url, children=True)  # the default repository lives in bunker's data directory
    backend = open_backend(opts.repo_url)
    return Repository.open(backend, explicit_repo_id(opts))


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
    return load_put_key(path)


def load_master(opts: Options, repo: Repository, purpose: str) -> MasterKey:
    """The master key for ``repo`` (asks for the passphrase); refuses clearly without it."""
    path = opts.master_key_file(repo.repo_id)
    if not path or not os.path.exists(path):
        has_put = bool(opts.put_key_file(repo.repo_id)) and os.path.exists(opts.put_key_file(repo.repo_id) or "")
        raise KeyRequired(
            f"{purpose} needs the master key, and there is none here (looked for {path})"
            + ("; the put key on this machine can only back up" if has_put else ""),
            "pass it with --master-key FILE (or BUNKER_MASTER_KEY), e.g. from the medium you exported it to",
        )
    if read_master_repo_id(path) != repo.repo_id:
        raise KeyRequired(f"master key {path} is for another repository", "pass the right --master-key")
    tighten_own(path)
    return load_master_key(path, passphrase())


def master_on_client(repo_id: str) -> bool:
    """True while the master key file still sits in this machine's config directory."""
    return os.path.exists(dirs.master_key_path(repo_id))


@dataclass
class Created:
    repo: Repository
    master_path: str
    put_path: str


def init_repository(url: str, client_name: str, host: str = "") -> Created:
    """Create a repository, its master key (passphrase-protected) and this machine's put key,
    whose certificate binds ``host`` (default: this machine's name; sealed, see docs/security.md)."""
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
    write_private_file(master_path, master_key_text(master, pw))
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
