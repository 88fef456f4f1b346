"""check and verify."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from bunker import dirs
from bunker.backup.chain import load_head, witnesses
from bunker.backup.client_dirs import client_cache, client_tag
from bunker.backup.files_cache import FilesCache
from bunker.cli import context
from bunker.cli.cmd_witness import witness_sources
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.cli.output import human_bytes
from bunker.errors import BunkerError, ExitCode
from bunker.node.spool import Spool
from bunker.repo import record_witness
from bunker.repo.check import Checker
from bunker.repo.check_snapshots import Pending
from bunker.repo.index import make_index
from bunker.repo.index_cache import IndexCache
from bunker.repo.objects import content_hash
from bunker.repo.other_secret import NEXT_STEP
from bunker.repo.witnesses import Witness
from bunker.restore.verify import Verifier
from bunker.storage import open_backend


def _repository_id(text: str) -> str:
    """``--expect``'s value as a repository id (64 hex digits, any case), else a usage error."""
    rid = text.strip().lower()
    if len(rid) != 64 or any(c not in "0123456789abcdef" for c in rid):
        raise BunkerError(
            f"--expect {text!r} is not a repository id",
            "give the repository's full id, 64 hex digits (`bunker key info` shows it on a machine with a key; "
            "docs/recovery.md says where else it is written down)",
            exit_code=ExitCode.USAGE,
        )
    return rid


@cli.command()
@common
@click.option("--keyless", is_flag=True, help="Use no key: hashes, signatures, chains and pack sets only.")
@click.option("--expect", "expect", help="Repository id (fingerprint) the copy must have (with --keyless).")
@click.option("--read-data", is_flag=True, help="Decrypt every blob and verify its chunk id (master key).")
@click.option(
    "--witness",
    "witness_paths",
    multiple=True,
    type=click.Path(exists=True),
    metavar="PATH",
    help="A node's witness statement (`bunker node witness`) or a node directory: the newest snapshots it saw "
    "the repository of record hold must still be there (repeatable).",
)
@handles_errors
def check(**kwargs: Any) -> None:
    """Check the repository's integrity (put key by default; --keyless; --read-data)."""
    keyless, expect, read_data = kwargs.pop("keyless"), kwargs.pop("expect"), kwargs.pop("read_data")
    statements = witness_sources(kwargs.pop("witness_paths"))
    if expect is not None:
        expect = _repository_id(expect)
    opts, out = make_options(kwargs)
    backend = open_backend(opts.repo_url)
    secrets = master = None
    own_cert = ""
    # what this machine remembers of each chain it wrote: witnesses the storage cannot rewrite
    heads: list[Witness] = []
    # this machine's snapshots still in its local spool are pending, not withheld
    spool = Spool(opts.repo_url)
    pending = Pending(spool.root, spool.pending_snapshots())
    if keyless:
        if expect:
            heads = [Witness(h.cert, h.seq, h.name, spooled=h.spooled) for h in witnesses(expect.lower())]
        checker = Checker(
            backend, expect.lower() if expect else None, heads=heads, pending=pending, statements=statements
        )
    else:
        repo = context.open_repository(opts)
        heads = [Witness(h.cert, h.seq, h.name, spooled=h.spooled) for h in witnesses(repo.repo_id)]
        if expect and expect.lower() != repo.repo_id:
            out.info(f"warning: --expect {expect} differs from this key's repository {repo.repo_id}")
        put_path = opts.put_key_file(repo.repo_id)
        has_put = bool(put_path and os.path.exists(put_path))
        if read_data or (opts.master_key and not has_put):
            # a master key named on the command line checks on its own where no put key is here
            master = context.load_master(opts, repo, "check --read-data" if read_data else "check")
        if has_put:
            put = context.load_put(opts, repo)
            secrets = put.secrets
            tag = client_tag(put)
            remembered = load_head(dirs.state_dir(repo.repo_id, tag))
            mine = own_cert = "clients/" + content_hash(put.certificate)
            if remembered and not any(h.cert == mine for h in heads):
                heads.append(Witness(mine, remembered.seq, remembered.name, spooled=remembered.spooled))
        elif master is None:
            context.load_put(opts, repo)  # raises the clear "no put key" error
        else:
            secrets = master.put_secrets("default")
        checker = Checker(
            backend,
            repo.repo_id,
            secrets=secrets,
            master=master,
            heads=heads,
            pending=pending,
            progress=(lambda s: out.info(f"checking {s}…")) if sys.stderr.isatty() and not opts.as_json else None,
            own_cert=own_cert,
            statements=statements,
        )
    report = checker.run(keyless)
    if report.repo_id:
        # the retention records this machine signed are witnesses too (repo/record_witness.py)
        for name in sorted(record_witness.missing_in(report.repo_id, {i.name for i in backend.list("retired/")})):
            report.add(
                name,
                "this machine signed this retention record (a retirement or its withdrawal) and it is gone: bunker "
                "never deletes one, so someone with access to the storage did, which un-forgets or re-forgets a "
                "snapshot. `bunker forget`, `unforget` or `prune` on this machine puts it back",
            )
    out.document(report.to_json())
    c = report.counts
    out.line(
        f"checked repository {report.repo_id or '?'} ({report.mode}): {c.get('packs', 0)} packs, "
        f"{c.get('index', 0)} indexes, {c.get('snapshots', 0)} snapshots, {c.get('clients', 0)} clients"
        + (f", {c.get('blobs_verified', 0)} blobs decrypted and verified" if report.mode == "read-data" else "")
        + (f", {human_bytes(report.bytes_read)} read" if report.bytes_read else "")
    )
    for p in report.problems:
        out.line(f"{p.severity}: {p.object}: {p.problem}")
    if report.ok:
        out.line("no damage found" + ("" if report.authenticated else " (authenticity not proven: pass --expect ID)"))
    else:
        errs = [p for p in report.problems if p.severity == "err"]
        damage = sum(1 for p in errs if p.cause == "damage")
        refused = sum(1 for p in errs if p.cause == "witness")
        other = len(errs) - damage - refused
        parts = []
        if damage:
            parts.append(
                f"{damage} problem(s) found: restore damaged objects from a mirror if you have one; snapshots that "
                "need them restore only partly (see docs/recovery.md)"
            )
        if other:
            # a mirror holds the same bytes: only a new backup with a good key replaces them
            parts.append(
                f"{other} problem(s) come from a put key that was damaged when it wrote: {NEXT_STEP} "
                "(see docs/recovery.md)"
            )
        if refused:
            parts.append(f"{refused} witness statement(s) refused: what they say was not checked (see above)")
        out.line("; ".join(parts))
        sys.exit(ExitCode.INTEGRITY)


@cli.command()
@common
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--read-data", is_flag=True, help="Also fetch and decrypt each stored chunk and compare it.")
@handles_errors
def verify(**kwargs: Any) -> None:
    """Confirm with the put key (no password) that local files' current content is stored."""
    paths, read_data = kwargs.pop("paths"), kwargs.pop("read_data")
    for p in paths:
        if not os.path.lexists(p):
            raise BunkerError(
                f"{p} does not exist", "check the path: verify proves files that are here now", exit_code=ExitCode.USAGE
            )
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    put = context.load_put(opts, repo)
    cache_dir = client_cache(repo, put)
    index = IndexCache(repo, put.secrets, cache_dir).load()
    fcache = FilesCache(os.path.join(cache_dir, "files.sqlite"))
    try:
        rep = Verifier(repo, index, fcache, read_data).run(list(paths))
    finally:
        fcache.close()
    out.document(
        {
            "ok": rep.ok,
            "stored": len(rep.stored),
            "missing": [{"path": p, "why": w} for p, w in rep.missing],
            "new": rep.new,
            "changed": rep.changed,
            "unreadable": [{"path": p, "why": w} for p, w in rep.unreadable],
            "bytes": rep.bytes,
            "chunks_compared": rep.chunks_compared,
        }
    )
    for p in rep.new:
        out.line(f"new since last backup: {p}")
    for p in rep.changed:
        out.line(f"changed since last backup: {p}")
    for p, why in rep.missing:
        out.line(f"NOT STORED: {p}: {why}")
    for p, why in rep.unreadable:
        out.line(f"unreadable: {p}: {why}")
    out.line(
        f"{len(rep.stored)} files stored in the repository ({human_bytes(rep.bytes)} read"
        + (f", {rep.chunks_compared} chunks decrypted and compared" if read_data else "")
        + f"); "
        f"{len(rep.missing)} not stored, {len(rep.unreadable)} unreadable"
    )
    if not rep.ok:
        out.line("next step: run `bunker backup` on the files not stored")
        sys.exit(ExitCode.INTEGRITY)


@cli.group("index")
def index_group() -> None:
    """Maintain the index (a cache of the pack trailers)."""


@index_group.command("rebuild")
@common
@handles_errors
def index_rebuild(**kwargs: Any) -> None:
    """Index every pack of this client's dedup domain that no index object names (put key)."""
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    put = context.load_put(opts, repo)
    cert = repo.check_put_key(put)
    index = IndexCache(repo, put.secrets, None, for_dedup=False).load()
    packs = index.add_unindexed_packs()
    entries = [e for _, es in index.unindexed for e in es]
    name = None
    if entries:
        data = make_index(entries, put.secrets, put.client_key, cert.name)
        name = repo.put_object("index", data)
    out.document({"packs_read": packs, "chunks_indexed": len(entries), "index": name, "problems": index.problems})
    for p in index.problems:
        out.line(f"warn: index object skipped: {p}")
    out.line(f"{packs} unindexed pack(s) read, {len(entries)} chunks indexed" + (f" in {name}" if name else ""))
