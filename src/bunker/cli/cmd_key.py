"""key info | export | passwd | recover (new-client, revoke, merge-configs: cmd_clients.py)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from bunker import dirs
from bunker.cli import context
from bunker.cli.files import write_output
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.crypto.keyfile import (
    KDF_MEMORY_MIB,
    MasterKey,
    load_master_key,
    load_put_key,
    master_kdf_memory,
    master_key_text,
    read_master_repo_id,
)
from bunker.crypto.shares import combine_shares, split_seed
from bunker.errors import BunkerError, ExitCode


@cli.group()
def key() -> None:
    """Manage the master key and put keys."""


@key.command()
@common
@handles_errors
def info(**kwargs: Any) -> None:
    """Show the repository id, which keys this machine holds, and this client's certificate."""
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    put_path = opts.put_key_file(repo.repo_id)
    master_path = opts.master_key_file(repo.repo_id)
    doc: dict[str, Any] = {
        "repository": repo.backend.url,
        "id": repo.repo_id,
        "config_version": repo.config.version,
        "put_key": put_path if put_path and os.path.exists(put_path) else None,
        "master_key": master_path if master_path and os.path.exists(master_path) else None,
        "master_key_on_this_machine": context.master_on_client(repo.repo_id),
    }
    if doc["master_key"]:
        try:  # what each guess at its passphrase costs (a damaged file says so where it is used)
            doc["master_key_kdf_memory_mib"] = master_kdf_memory(doc["master_key"]) >> 10
        except BunkerError:
            doc["master_key_kdf_memory_mib"] = None
    if doc["put_key"]:
        put = load_put_key(doc["put_key"])
        cert = repo.verify_put_key(put)  # a damaged key says what is wrong with it
        doc["client"] = {
            "name": cert.client,
            "capabilities": list(cert.capabilities),
            "domain": put.domain,
            "certificate": "clients/" + __import__("bunker.repo.objects", fromlist=["x"]).content_hash(put.certificate),
        }
    out.document(doc)
    out.line(f"repository   {repo.backend.url}")
    out.line(f"id           {repo.repo_id}")
    out.line(f"put key      {doc['put_key'] or '(none on this machine)'}")
    if "client" in doc:
        c = doc["client"]
        out.line(f"client       {c['name']} (capabilities: {', '.join(c['capabilities'])}; dedup domain {c['domain']})")
    kdf = doc.get("master_key_kdf_memory_mib")
    cost = f" (Argon2id, {kdf} MiB)" if kdf else ""
    out.line(f"master key   {doc['master_key'] or '(not on this machine)'}{cost}")
    if doc["master_key_on_this_machine"]:
        out.line("")
        out.line(context.master_warning(dirs.master_key_path(repo.repo_id)))


@key.command()
@common
@click.option("--master", "dest", type=click.Path(dir_okay=False), help="Write the master key file to FILE.")
@click.option("--remove", is_flag=True, help="Delete this machine's copy once FILE is written and checked.")
@click.option("--shares", help="Print SLIP-39 shares instead, e.g. 3-of-5 (asks for the passphrase).")
@handles_errors
def export(**kwargs: Any) -> None:
    """Move the master key off this machine: to a FILE, or as SLIP-39 shares for custodians."""
    dest, remove, shares = kwargs.pop("dest"), kwargs.pop("remove"), kwargs.pop("shares")
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    src = opts.master_key_file(repo.repo_id)
    if not src or not os.path.exists(src):
        raise BunkerError(
            f"there is no master key at {src}", "pass it with --master-key FILE", exit_code=ExitCode.KEY_MISSING
        )
    if not dest and not shares:
        raise BunkerError("say where to export to", "use --master FILE or --shares 3-of-5", exit_code=ExitCode.USAGE)
    doc: dict[str, Any] = {"id": repo.repo_id}
    if shares:
        try:
            t, n = (int(x) for x in shares.lower().split("-of-"))
        except ValueError:
            raise BunkerError(
                f"--shares {shares!r} is not of the form T-of-N", "e.g. --shares 3-of-5", exit_code=ExitCode.USAGE
            ) from None
        master = load_master_key(src, context.passphrase())
        words = split_seed(master.seed, t, n)
        doc["shares"] = words
        doc["threshold"] = t
        out.document(doc)
        out.line(f"Master key of repository {repo.repo_id} as {t}-of-{n} SLIP-39 shares.")
        out.line(
            f"Give each share to a different custodian; any {t} of them recover the key with `bunker key recover`."
        )
        for i, w in enumerate(words, 1):
            out.line(f"\nshare {i}/{n}:\n{w}")
    if dest:
        with open(src, encoding="ascii") as f:
            text = f.read()
        write_output(dest, text, "the master key")
        with open(dest, encoding="ascii") as f:
            copied = f.read()
        if read_master_repo_id(dest) != repo.repo_id or copied != text:
            raise BunkerError(
                f"the copy at {dest} does not read back correctly", "the local key was kept; try another medium"
            )
        doc["exported_to"] = os.path.abspath(dest)
        if remove:
            os.unlink(src)
            doc["removed"] = src
        if not shares:
            out.document(doc)
        out.line(
            f"master key written to {dest}"
            + (
                f"; removed {src} from this machine"
                if remove
                else f"; the local copy {src} is still here (add --remove to delete it)"
            )
        )


@key.command()
@common
@click.option(
    "--kdf-memory",
    "kdf_memory",
    type=click.IntRange(*KDF_MEMORY_MIB),
    default=None,
    help="MiB of memory Argon2id takes to open the master key from now on [default: what it takes now].",
)
@handles_errors
def passwd(**kwargs: Any) -> None:
    """Change the master key's passphrase (new one from BUNKER_NEW_PASSPHRASE or the terminal)."""
    kdf_mib = kwargs.pop("kdf_memory")
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    path = opts.master_key_file(repo.repo_id)
    master = context.load_master(opts, repo, "changing the passphrase")
    new = context.passphrase("New passphrase", confirm=True, env="BUNKER_NEW_PASSPHRASE")
    if not new:
        raise BunkerError("the new passphrase is empty", "choose a non-empty passphrase", exit_code=ExitCode.USAGE)
    assert path
    memory_kib = kdf_mib << 10 if kdf_mib is not None else master_kdf_memory(path)
    write_output(path, master_key_text(master, new, memory_kib), "the master key")
    out.document({"master_key": path, "changed": True, "kdf_memory_mib": memory_kib >> 10})
    out.line(f"passphrase of {path} changed (Argon2id with {memory_kib >> 10} MiB)")


@key.command()
@common
@click.option(
    "--out", "dest", required=True, type=click.Path(dir_okay=False), help="Write the master key file to FILE."
)
@handles_errors
def recover(**kwargs: Any) -> None:
    """Rebuild the master key file from SLIP-39 shares (one share per line on standard input)."""
    dest = kwargs.pop("dest")
    opts, out = make_options(kwargs)
    if sys.stdin.isatty():
        click.echo("Enter the shares, one per line; an empty line ends.", err=True)
    lines: list[str] = []
    for line in sys.stdin:
        if not line.strip():
            if lines:
                break
            continue
        lines.append(" ".join(line.split()))
    master = MasterKey(combine_shares(lines))
    pw = context.passphrase("New passphrase for the recovered master key", confirm=True)
    if not pw:
        raise BunkerError("the new passphrase is empty", "choose a non-empty passphrase", exit_code=ExitCode.USAGE)
    write_output(dest, master_key_text(master, pw), "the master key")
    out.document({"id": master.repo_id, "master_key": os.path.abspath(dest)})
    out.line(f"recovered the master key of repository {master.repo_id}; written to {dest}")
