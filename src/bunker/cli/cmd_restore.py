"""snapshots, ls and restore."""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
import sys
from typing import TYPE_CHECKING, Any

import click

from bunker import encoding
from bunker.backup.client_dirs import client_cache
from bunker.cli import context
from bunker.cli.known_heads import known_heads, own_client, own_put_key
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.cli.output import human_bytes, quote_name
from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, ExitCode
from bunker.fs.fsmeta import acl_text, flag_letters, hole_bytes
from bunker.node.spool import parse_age
from bunker.process_pool import prestart
from bunker.repo import refs
from bunker.repo.blob_reader import BlobReader
from bunker.repo.index_cache import IndexCache
from bunker.repo.moves import PackMoves
from bunker.repo.repository import Repository, SnapshotRecord
from bunker.repo.selection import (
    Filters,
    KnownHead,
    adoption_problem,
    body_of,
    matches,
    owner,
    resolve_host,
    select,
)
from bunker.repo.snapshot import open_body
from bunker.repo.tree import TreeBudget
from bunker.restore.batches import restore_in_batches
from bunker.restore.evicted import evicted_packs, wait_for_evicted_packs
from bunker.restore.lease import RestoreLease
from bunker.restore.restorer import Restorer, small_files_before_workers
from bunker.runlog import RunLog, display_path

if TYPE_CHECKING:
    from bunker.crypto.derive import PutSecrets
    from bunker.repo.location_map import LocationMap


def filter_options(f: Any) -> Any:
    f = click.option("--client", help="Only snapshots of this client.")(f)
    f = click.option("--host", help="Only snapshots of this host (needs the master key).")(f)
    f = click.option("--tag", multiple=True, help="Only snapshots with this tag (needs the master key).")(f)
    f = click.option("--path", "path_filter", help="Only snapshots of this path (needs the master key).")(f)
    return f


def pop_filters(kwargs: dict[str, Any]) -> Filters:
    return Filters(kwargs.pop("client"), kwargs.pop("host"), tuple(kwargs.pop("tag")), kwargs.pop("path_filter"))


def _fmt_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


@cli.command()
@common
@filter_options
@click.option("--all", "show_all", is_flag=True, help="Also list retired snapshots (forgotten by `bunker forget`).")
@handles_errors
def snapshots(**kwargs: Any) -> None:
    """List snapshots. Envelopes are public; host, paths and tags need the master key."""
    show_all = kwargs.pop("show_all")
    f = pop_filters(kwargs)
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    master = None
    mpath = opts.master_key_file(repo.repo_id)
    if f.sealed or (opts.master_key or os.environ.get("BUNKER_MASTER_KEY")):
        master = context.load_master(opts, repo, "showing host, paths and tags")
    rows = []
    retired = repo.retired_snapshots()
    hidden = 0
    records = repo.snapshots()
    if f.host and master is not None:
        mine = [r for r in records if not f.client or owner(repo, r) == f.client]
        f.host_certs = resolve_host(repo, mine, f.host, master)
    for rec in records:
        if not matches(rec, f, master, repo):
            continue
        if rec.name in retired and not show_all:
            hidden += 1
            continue
        e = rec.snap.env
        row: dict[str, Any] = {
            "id": rec.name.split("/", 1)[1],
            "client": owner(repo, rec),
            "seq": e.seq,
            "time": e.time,
            "complete": e.complete,
            "level": e.level,
            "stats": e.stats,
            "trusted": rec.trusted,
            "retired": rec.name in retired,
        }
        if rec.problem:
            row["problem"] = rec.problem
        if e.adopted is not None:
            # a dead run's last checkpoint, made a snapshot by `bunker prune` in the pruner's chain
            adopted = {"by": e.client, "client": e.adopted.client, "cert": e.adopted.cert, "session": e.adopted.session}
            why = adoption_problem(repo, rec)
            row["adopted"] = {**adopted, "problem": why} if why else adopted
        if master is not None:
            body = body_of(rec, master)
            if body:
                row.update(host=body.get("host"), paths=body.get("paths"), tags=body.get("tags"))
            elif rec.trusted:
                # sealed for another envelope (moved from another client's chain) or damaged
                row["trusted"] = False
                row["problem"] = "its body does not open for this envelope; `bunker check --read-data` names why"
        rows.append(row)
    damaged, missing = _unlisted(opts, repo, f, {r["id"] for r in rows}, records)
    out.document(
        {"repository": repo.backend.url, "id": repo.repo_id, "snapshots": rows, "damaged": damaged, "missing": missing}
    )
    out.line(
        f"{'id':12}  {'time':19}  {'client':16} {'seq':>4}  {'level':5}  {'files':>8}  {'size':>10}  state"
        + ("  host / paths / tags" if master else "")
    )
    for r in rows:
        adopted_row = r.get("adopted")
        state = (
            ("retired" if r["retired"] else "complete" if r["complete"] else "INCOMPLETE")
            + ("" if r["complete"] or not r["retired"] else ", incomplete")
            + (f", adopted by prune client {adopted_row['by']!r} (seq #{r['seq']} of its chain)" if adopted_row else "")
            + (
                f" (claims the run of {adopted_row['client']!r}: {adopted_row['problem']})"
                if adopted_row and "problem" in adopted_row
                else ""
            )
            + ("" if r["trusted"] else f" UNTRUSTED: {r.get('problem')}")
        )
        line = (
            f"{r['id'][:12]}  {_fmt_time(r['time'])}  {r['client'][:16]:16} {r['seq']:>4}  {r['level']:5}  "
            f"{r['stats'].get('files', 0):>8}  {human_bytes(r['stats'].get('bytes', 0)):>10}  {state}"
        )
        if master is not None:
            line += f"  {r.get('host')} {' '.join(r.get('paths') or [])} {','.join(r.get('tags') or [])}"
        out.line(line)
    for d in damaged:
        out.line(f"{d['id'][:12]}  {'?':19}  {'?':16} {'?':>4}  {'?':5}  {'?':>8}  {'?':>10}  DAMAGED: {d['problem']}")
    for m in missing:
        state = "PENDING: waits in this machine's local spool" if m["pending"] else f"MISSING: {m['problem']}"
        who = f"{m['client'][:16]:16} {m['seq']:>4}"
        out.line(f"{m['id'][:12]}  {'?':19}  {who}  {'?':5}  {'?':>8}  {'?':>10}  {state}")
    if not rows and not damaged and not missing:
        out.line("(no snapshots)")
    if hidden and not opts.as_json:
        out.info(f"{hidden} retired snapshot(s) not shown (forgotten by `bunker forget`); list them with --all")
    lost = [m for m in missing if not m["pending"]]
    if damaged or lost:
        if not opts.as_json:
            named = [d["id"][:12] + " (damaged)" for d in damaged] + [m["id"][:12] + " (missing)" for m in lost]
            names = ", ".join(named)
            out.info(
                f"err: snapshots {names}: run `bunker check` to see what else is affected; restore them from a mirror "
                "if you have one"
            )
        sys.exit(ExitCode.INTEGRITY)
    _ = mpath


def _unlisted(
    opts: context.Options, repo: Repository, f: Filters, shown: set[str], records: list[SnapshotRecord]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The snapshot objects that are damaged (whoever's: that cannot be told), and the chain
    heads this machine remembers of the clients listed that the repository does not hold as
    listed snapshots (missing, or still waiting in this machine's spool)."""
    damaged = [{"id": n.split("/", 1)[1], "problem": p} for n, p in sorted(repo.damaged_snapshots().items())]
    present = {r.name for r in records}
    newest: dict[str, int] = {}
    for r in records:
        if r.trusted:
            newest[r.snap.env.cert] = max(newest.get(r.snap.env.cert, 0), r.snap.env.seq)
    missing = []
    for head in known_heads(opts, repo):
        if head.name in present or head.name.split("/", 1)[1] in shown or head.seq <= newest.get(head.cert, 0):
            continue  # listed, or the chain went on past it (another machine with this key)
        try:
            client = repo.certificate(head.cert).client
        except (BunkerError, encoding.FormatError):
            client = "?"
        if f.client and client != f.client:
            continue
        if any(d["id"] == head.name.split("/", 1)[1] for d in damaged):
            continue  # listed as damaged already
        missing.append(
            {
                "id": head.name.split("/", 1)[1],
                "client": client,
                "seq": head.seq,
                "pending": head.pending,
                "problem": "this machine remembers it as its newest; the repository does not hold it (deleted or "
                "rolled back)",
            }
        )
    return damaged, missing


def _open_for_reading(
    opts: context.Options, spec: str, f: Filters, purpose: str, workers: str = ""
) -> tuple[Repository, MasterKey, SnapshotRecord, BlobReader, bytes]:
    """The repository, master key, chosen snapshot, a reader of its blobs and its root tree.
    ``workers``: the module of the worker processes the command may start (their forkserver
    starts once the key is derived, if the snapshot is large enough to need them)."""
    repo = context.open_repository(opts)
    # the key derivation runs while the snapshot is chosen and its index read (where this
    # machine's put key is of the snapshot's dedup domain, its secrets are the domain's)
    master_key = context.start_master(opts, repo, purpose)
    known: list[KnownHead] = []
    put = own_put_key(opts, repo)
    if spec == "latest":
        # on a machine that backs up, `latest` is its own client's unless told otherwise
        mine = None if (f.client or f.host) else own_client(repo, put)
        if mine is not None:
            f.client, f.own_client = mine, True
        known = known_heads(opts, repo)
    rec = select(repo, spec, f, master_key() if f.sealed else None, known)
    if spec == "latest":
        for name, problem in sorted(repo.damaged_snapshots().items()):
            # whose it was cannot be told: it may have been newer than the one chosen
            click.echo(
                f"warn: {name} is damaged ({problem}): nobody can tell whose snapshot it was or whether it was newer "
                f"than {rec.short_id}, the `latest` chosen; run `bunker check`",
                err=True,
            )
    if rec.name in repo.retired_snapshots():
        click.echo(
            f"note: snapshot {rec.short_id} was forgotten (retired by `bunker forget`); it is read while its data "
            "is still stored, and `bunker prune` removes that data",
            err=True,
        )
    own = put if put is not None and put.secrets.domain_id == rec.snap.env.domain else None
    secrets = own.secrets if own is not None else repo.domain_secrets(master_key(), rec.snap.env.domain)
    cache_dir = None
    if own is not None:
        with contextlib.suppress(OSError):  # (moving an older cache's files there failed: none used)
            cache_dir = client_cache(repo, own)
    locations = _snapshot_index(repo, rec, secrets, cache_dir)
    master = master_key()
    if workers and len(locations) > small_files_before_workers(repo.backend):
        # the workers' forkserver starts now, beside the root tree's reading, not when the first
        # batch is handed over; after the key's derivation, so Argon2id's 64 MiB and the
        # forkserver never add up in the command's peak memory (docs/performance.md). A snapshot
        # of fewer chunks than the small files that start the workers never needs them: its
        # restore starts no process
        prestart(workers)
    try:
        body = open_body(rec.snap, master.data_private)
    except Exception as exc:
        raise BunkerError(
            f"snapshot {rec.short_id} cannot be opened: {exc}", "run `bunker check`", exit_code=ExitCode.INTEGRITY
        ) from None
    return repo, master, rec, BlobReader(repo, master.data_private, secrets, locations), body["root"]


def _snapshot_index(
    repo: Repository, rec: SnapshotRecord, secrets: PutSecrets, cache_dir: str | None
) -> LocationMap:
    """Where the chunks of snapshot ``rec`` are: from the index objects (through this machine's
    index cache ``cache_dir``, its own client's when the snapshot is of its dedup domain), only in
    the packs its pack set names."""
    try:
        # where a chunk is stored twice (a pack that vanished and the copy stored again), read
        # the copy this snapshot's pack set names
        # (resolved through the move records of repacks: its blobs may be in newer packs)
        packs: set[str] | None = PackMoves.load(repo).resolve(refs.read_set(rec.snap.env.packset, repo.get_object))
    except (BunkerError, encoding.FormatError):
        packs = None
    index = IndexCache(repo, secrets, cache_dir, for_dedup=False, only_packs=packs).load()
    try:
        chunks = refs.read_set(rec.snap.env.chunkset, repo.get_object, secrets)
    except (BunkerError, encoding.FormatError):
        chunks = []  # restore still goes on and reports every file it cannot complete
    unindexed, lost = index.cover(chunks)
    if unindexed and cache_dir is not None:
        # the cache is a copy: where it does not locate every chunk, the repository's index
        # objects are read instead, so a copy that fell behind never costs a restore its data
        click.echo(
            f"note: the index cache of this machine does not locate {unindexed} chunks of this snapshot; the index "
            "is read from the repository",
            err=True,
        )
        index = IndexCache(repo, secrets, None, for_dedup=False, only_packs=packs).load()
        unindexed, lost = index.cover(chunks)
    if unindexed:
        click.echo(
            f"note: {unindexed} chunks of this snapshot were not in the index; found {unindexed - lost} of them in "
            "the packs themselves. Run `bunker index rebuild` to write them into the index",
            err=True,
        )
    return index.locations


def damaged_packs(reader: BlobReader) -> list[tuple[str, str]]:
    """(pack object, message) for every pack read although its writer's signature failed."""
    return [
        (
            f"packs/{pack}",
            f"packs/{pack} is damaged ({why}); its blobs were used, each checked against its chunk id (who wrote the "
            "pack cannot be proven any more): run `bunker check`, and replace the pack from a mirror if you have one",
        )
        for pack, why in sorted(reader.damaged.items())
    ]


def budget_of(rec: SnapshotRecord) -> TreeBudget:
    """The tree walk budget of a snapshot: its signed statistics (FORMAT.md section 14)."""
    return TreeBudget(rec.short_id, rec.snap.env.stats)


_TYPE = {"f": "-", "d": "d", "l": "l", "c": "c", "b": "b", "p": "p", "s": "s"}


def _ls_item(path: str, e: dict[str, Any]) -> dict[str, Any]:
    """One item of `ls --json`: the common fields, plus the others the entry has."""
    it: dict[str, Any] = {
        "path": path,
        "type": e["t"],
        "mode": e.get("m", 0),
        "size": e.get("sz", 0),
        "mtime_ns": e.get("mt", 0),
        "user": e.get("U"),
        "group": e.get("G"),
        "uid": e.get("u"),
        "gid": e.get("g"),
        "target": display_path(e.get("lt")) if e.get("lt") else None,
    }
    if "ct" in e:
        it["ctime_ns"] = e["ct"]
    if "at" in e:
        it["atime_ns"] = e["at"]
    if "dev" in e:
        it["device"] = e["dev"]
    if "ino" in e:  # hard links: every name of one inode has the same link_group
        it.update(link_group=e["ino"], nlink=e["nl"])
    if "x" in e:
        it["xattrs"] = sorted(display_path(n) for n in e["x"])
    if "acl" in e:
        if "a" in e["acl"]:
            it["acl"] = acl_text(e["acl"]["a"])
        if "d" in e["acl"]:
            it["default_acl"] = acl_text(e["acl"]["d"])
    if "fl" in e:
        it["flags"] = flag_letters(e["fl"])
    if "hole" in e:
        it["hole_bytes"] = hole_bytes(e["hole"])
    return it


def _ls_line(it: dict[str, Any], raw_path: bytes, raw_target: bytes | None) -> str:
    """One line of `ls`; names quoted as GNU ls quotes them (a newline or an escape sequence in
    a name is shown as $'\\n' / $'\\033', never passed to the terminal)."""
    mode = _TYPE[it["type"]] + stat.filemode(it["mode"])[1:] + ("+" if "acl" in it or "default_acl" in it else "")
    t = _fmt_time(it["mtime_ns"] / 1e9)
    size = f"{it['device'][0]}, {it['device'][1]}" if "device" in it else str(it["size"])
    user, group = (n if n.isprintable() else quote_name(n) for n in (it.get("user") or "?", it.get("group") or "?"))
    who = f"{user:>8} {group:>8}"
    line = f"{mode:11} {who} {size:>12} {t}  {quote_name(raw_path)}"
    if raw_target:
        line += f" -> {quote_name(raw_target)}"
    extra = []
    if "nlink" in it:
        extra.append(f"{it['nlink']} links")
    if it.get("flags"):
        extra.append(f"flags {it['flags']}")
    if "xattrs" in it:
        extra.append(f"xattrs {len(it['xattrs'])}")
    if "hole_bytes" in it:
        extra.append(f"sparse, {human_bytes(it['hole_bytes'])} in holes")
    return line + (f"  [{'; '.join(extra)}]" if extra else "")


@cli.command("ls")
@common
@filter_options
@click.argument("snapshot")
@click.argument("path", required=False, default="/")
@click.option("--recursive", "-R", is_flag=True, help="List everything below PATH.")
@handles_errors
def ls_cmd(**kwargs: Any) -> None:
    """List files in SNAPSHOT (an id prefix or `latest`) under PATH. Needs the master key."""
    spec, path, recursive = kwargs.pop("snapshot"), kwargs.pop("path"), kwargs.pop("recursive")
    f = pop_filters(kwargs)
    opts, out = make_options(kwargs)
    repo, _, rec, reader, root = _open_for_reading(opts, spec, f, "listing files")
    restorer = Restorer(reader, b"/nonexistent", RunLog(), budget=budget_of(rec))
    entry = restorer.find(root, path)
    base = b"/" + b"/".join(c for c in os.fsencode(path).split(b"/") if c)
    items: list[tuple[dict[str, Any], bytes, bytes | None]] = []
    stack = [(base, entry, 0)]
    first = True
    while stack:
        p, e, depth = stack.pop()
        if e["t"] == "d" and (first or recursive):
            for child in reversed(restorer.walk_tree(depth, e["st"], display_path(p))):
                stack.append((p.rstrip(b"/") + b"/" + child["n"], child, depth + 1))
        if not first or e["t"] != "d":
            items.append((_ls_item(display_path(p), e), p, e.get("lt")))
        first = False
    damaged = damaged_packs(reader)
    listed = [it for it, _, _ in items]
    out.document({"snapshot": rec.name.split("/", 1)[1], "items": listed, "damaged_packs": [n for n, _ in damaged]})
    for it, raw, target in items:
        out.line(_ls_line(it, raw, target))
    for _, message in damaged:
        out.info(f"err: {message}")
    if damaged:
        sys.exit(ExitCode.ERR)
    _ = repo


@cli.command()
@common
@filter_options
@click.argument("snapshot")
@click.argument("paths", nargs=-1)
@click.option("--target", "-t", required=True, type=click.Path(file_okay=False), help="Directory to restore into.")
@click.option("--numeric-owner", is_flag=True, help="As root, use stored uid/gid instead of user/group names.")
@click.option(
    "--wait",
    "wait_for",
    metavar="AGE",
    help="Through a node that evicted data the snapshot needs: wait up to AGE (e.g. 30m, 2d) for the requested "
    "data to arrive, then restore (without it the restore stops with exit 6 and you run it again).",
)
@handles_errors
def restore(**kwargs: Any) -> None:
    """Restore SNAPSHOT (an id prefix or `latest`), or only PATHS of it, into --target. Needs the master key."""
    spec, paths, target, numeric = (
        kwargs.pop("snapshot"),
        kwargs.pop("paths"),
        kwargs.pop("target"),
        kwargs.pop("numeric_owner"),
    )
    wait_text = kwargs.pop("wait_for")
    wait_seconds = parse_age(wait_text) if wait_text is not None else 0.0
    if not target.strip():
        # an empty name would mean the current directory: never a guess for where files land
        raise BunkerError(
            "--target is empty",
            "name the directory to restore into, e.g. --target ./restored",
            exit_code=ExitCode.USAGE,
        )
    f = pop_filters(kwargs)
    opts, out = make_options(kwargs)
    repo, _, rec, reader, root = _open_for_reading(opts, spec, f, "restore", "bunker.restore.workers")
    log = RunLog()
    lease = RestoreLease(repo.backend, rec.name)  # through a node: its packs stay while this runs
    completed = False
    try:
        leased = lease.take()
        need = evicted_packs(repo, rec) if leased else {}

        def make_restorer() -> Restorer:
            return Restorer(
                reader, os.fsencode(os.path.abspath(target)), log, numeric_owner=numeric, budget=budget_of(rec)
            )

        if lease.room is not None and sum(need.values()) > lease.room:
            out.info(
                f"the node holds {lease.room} bytes of room, and the {len(need)} pack(s) it evicted that snapshot "
                f"{rec.short_id} needs are {sum(need.values())} bytes: restoring in batches"
            )
            stats = restore_in_batches(repo, rec, make_restorer, root, list(paths), lease, wait_seconds, out.info)
        else:
            # (through a node that leases, the evicted packs were just listed: not listed again)
            names = sorted(need) if leased else None
            waiting = wait_for_evicted_packs(repo, rec, wait_seconds, out.info, names=names)
            if waiting:
                first = waiting[0]
                raise BunkerError(
                    f"{len(waiting)} pack(s) snapshot {rec.short_id} needs are held only upstream of the node this "
                    "repository is reached through and could not be fetched "
                    f"{'in ' + wait_text if wait_text else 'at once'}: "
                    f"requested ({first.message}); nothing was restored",
                    "run this restore again once they have arrived: `bunker node requests DIR` on the node lists the "
                    "requests, and its next `bunker node forward` (or its daemon) asks again",
                    exit_code=ExitCode.REQUESTED,
                )
            stats = make_restorer().restore(root, list(paths))
        completed = not stats.requested
    finally:
        lease.end(done=completed)
    for _, message in damaged_packs(reader):
        log.add("err", "pack-damaged", message)
    out.document(
        {
            "snapshot": rec.name.split("/", 1)[1],
            "target": os.path.abspath(target),
            "level": log.level,
            "stats": stats.__dict__,
            "events": [e.to_json() for e in log.events],
        }
    )
    if not opts.as_json:
        for e in log.events:
            click.echo(f"{e.level}: {display_path(e.path) + ': ' if e.path else ''}{e.message}", err=True)
        click.echo(
            f"restored snapshot {rec.short_id} into {target}: {stats.files} files, {stats.dirs} dirs, "
            f"{stats.links} symlinks, {stats.hardlinks} hard links, {stats.other} other items, "
            f"{human_bytes(stats.bytes)}; level {log.level}"
            + (f"; {stats.failed} items could not be restored" if stats.failed else "")
            + (f"; {stats.kept} files were restored by an earlier run of this restore" if stats.kept else "")
        )
    if stats.requested:
        # data a node evicted was requested upstream: not damage, a wait (docs/hierarchy.md)
        click.echo(
            f"{stats.requested} file(s) need data that was requested from upstream: run this restore again once it "
            "has arrived (`bunker node requests DIR` on the node shows the requests)",
            err=True,
        )
        sys.exit(ExitCode.REQUESTED)
    if stats.failed or log.level == "err":
        sys.exit(ExitCode.ERR)
