"""Spooled snapshots that need packs which vanished upstream while this machine was offline.

An offline run deduplicates against the packs it last saw upstream. If a prune removed some of
them meanwhile (an offline session can outlive any grace period, docs/format.md section 15), forwarding the
snapshot as it is would deliver holes. Instead, under the forwarding lease:

1. the chunks that lived only in vanished packs are stored again from the source files, where
   the files cache shows a file unchanged since it was backed up;
2. what cannot be recovered makes the snapshot *incomplete* (level err), naming the affected
   files (from the files cache; lost directory listings are counted);
3. the snapshot gets a new pack set, and it and every later spooled snapshot of the chain are
   signed again (they were never published, so nobody holds the old names), and the client's
   chain head follows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pyfastcdc import FastCDC

from bunker import dirs
from bunker.backup.chain import ChainHead, load_head, save_head
from bunker.backup.chunker import file_pieces, make_cdc
from bunker.backup.files_cache import FilesCache, lookup
from bunker.backup.run import client_cache, client_tag
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import PutKey
from bunker.fs import deep_path
from bunker.repo import blob, refs
from bunker.repo.certs import Certificate
from bunker.repo.index_cache import IndexCache
from bunker.repo.objects import name_for
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.snapshot import ParsedSnapshot, make_snapshot, parse_snapshot
from bunker.runlog import LEVELS, display_path
from bunker.storage.local import LocalBackend

MAX_NAMED_FILES = 100  # affected files named per snapshot; the rest are counted


@dataclass
class Repaired:
    """One spooled snapshot that was signed again."""

    old: str
    new: str
    vanished_packs: int = 0
    recovered_chunks: int = 0
    lost_chunks: int = 0
    files: list[str] = field(default_factory=list)  # files whose content is incomplete
    more_files: int = 0

    @property
    def complete(self) -> bool:
        return self.lost_chunks == 0


def repair_spooled_chain(
    repo: Repository,
    put: PutKey,
    cert: Certificate,
    spool: LocalBackend,
    names: list[str],
    upstream_packs: set[str],
    refresh: Callable[[], None] = lambda: None,
) -> tuple[list[str], list[Repaired]]:
    """Make every spooled snapshot in ``names`` deliverable. Returns the names to send, in chain
    order, and what was repaired. ``refresh`` keeps the caller's lease alive."""
    snaps: list[tuple[str, ParsedSnapshot]] = sorted(
        ((n, parse_snapshot(spool.get(n))) for n in names), key=lambda x: x[1].env.seq
    )
    state_dir = dirs.state_dir(repo.repo_id, client_tag(put))
    head = load_head(state_dir)
    renamed: dict[str, str] = {}
    repaired: list[Repaired] = []
    out: list[str] = []
    recovery: _Recovery | None = None
    for name, snap in snaps:
        env = snap.env
        packs = refs.read_set(env.packset, repo.get_object)
        vanished = sorted(p for p in packs if p not in upstream_packs)
        new_prev = renamed.get(env.prev, env.prev)
        if not vanished and new_prev == env.prev:
            out.append(name)
            continue
        fix = Repaired(name, name, vanished_packs=len(vanished))
        stats = dict(env.stats)
        level, complete, packset = env.level, env.complete, env.packset
        if vanished:
            if recovery is None:
                recovery = _Recovery(repo, put, cert, vanished)
            chunk_ids = refs.read_set(env.chunkset, repo.get_object, put.secrets)
            lost = recovery.recover(chunk_ids, refresh)
            locs = recovery.index.locations
            packset_objs = refs.build_packset({locs[c].pack for c in chunk_ids if c in locs})
            for obj_name, data in packset_objs.items():
                if obj_name != "top":
                    repo.put_object("refs", data)
            packset = refs.top_name(packset_objs)
            fix.recovered_chunks = len(recovery.recovered & set(chunk_ids))
            fix.lost_chunks = len(lost)
            stats["chunks_recovered"] = fix.recovered_chunks
            if lost:
                complete = False
                level = max(level, "err", key=LEVELS.index)
                stats["chunks_lost"] = len(lost)
                fix.files, fix.more_files = recovery.files_with(lost)
        new_env = dataclasses.replace(env, prev=new_prev, packset=packset, complete=complete, level=level, stats=stats)
        data = make_snapshot(new_env, snap.body_ct, put.client_key)
        fix.new = name_for("snapshots", data)
        spool.put(fix.new, data)
        renamed[name] = fix.new
        repaired.append(fix)
        out.append(fix.new)
        if head is not None and head.name == name:
            head = ChainHead(head.seq, fix.new, head.cert)
            save_head(state_dir, head)
    if recovery is not None:
        recovery.close()
    for old in renamed:
        spool.delete(old)  # only now: a crash before leaves both, and the chain head names the new
    return out, repaired


def drop_superseded(spool: LocalBackend, names: list[str], head: ChainHead | None) -> list[str]:
    """Where a crash left two spooled snapshots with one sequence number (a repair was signed
    but the old one not yet deleted), keep the one on the chain that ends at this client's head."""
    parsed = {n: parse_snapshot(spool.get(n)) for n in names}
    by_seq: dict[tuple[str, int], list[str]] = {}
    for n, s in parsed.items():
        by_seq.setdefault((s.env.cert, s.env.seq), []).append(n)
    if all(len(v) == 1 for v in by_seq.values()):
        return names
    on_chain: set[str] = set()
    cur = head.name if head is not None else ""
    while cur in parsed:
        on_chain.add(cur)
        cur = parsed[cur].env.prev
    keep = []
    for group in by_seq.values():
        chosen = [n for n in group if n in on_chain] or group[-1:]
        keep += chosen
        for n in group:
            if n not in chosen:
                spool.delete(n)
    return keep


class _Recovery:
    """The index view without the vanished packs, a writer for what is stored again, and the
    files cache to find and name source files."""

    def __init__(self, repo: Repository, put: PutKey, cert: Certificate, vanished: Iterable[str]) -> None:
        self.repo, self.put = repo, put
        cache_dir = client_cache(repo, put)
        self.index = IndexCache(repo, put.secrets, None, absent_packs=vanished).load()
        self.writer = SessionWriter(repo, put, cert.name, self.index)
        path = os.path.join(cache_dir, "files.sqlite")
        self.files = FilesCache(path if os.path.exists(path) else None)
        self.cdc = make_cdc(repo.config.chunker, put.secrets)
        self.recovered: set[bytes] = set()

    def recover(self, chunk_ids: list[bytes], refresh: Callable[[], None]) -> set[bytes]:
        """Store again what of ``chunk_ids`` is not located, from unchanged source files;
        return the chunks still lost."""
        wanted = {c for c in chunk_ids if c not in self.index.locations}
        if not wanted:
            return set()
        for path, st in self._unchanged_sources(wanted):
            with contextlib.suppress(OSError):
                for cid, piece in _file_chunks(path, st, self.cdc, self.put.secrets):
                    if cid in wanted and self.writer.store(cid, piece):
                        self.recovered.add(cid)
            refresh()
        self.writer.flush()
        return {c for c in wanted if c not in self.index.locations}

    def _unchanged_sources(self, wanted: set[bytes]) -> Iterator[tuple[bytes, os.stat_result]]:
        for dirpath, record in self.files.records():
            for fname, r in record.items():
                if len(r) < 5 or not wanted.intersection(r[4]):
                    continue
                path = os.path.join(dirpath, fname)
                try:
                    st = deep_path.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and lookup(record, fname, st) is not None:
                    yield path, st

    def files_with(self, lost: set[bytes]) -> tuple[list[str], int]:
        """Display paths of the files holding any of ``lost`` (at most MAX_NAMED_FILES), and how
        many more there are."""
        found = []
        for dirpath, record in self.files.records():
            for fname, r in record.items():
                if len(r) >= 5 and lost.intersection(r[4]):
                    found.append(display_path(os.path.join(dirpath, fname)))
        found.sort()
        return found[:MAX_NAMED_FILES], max(0, len(found) - MAX_NAMED_FILES)

    def close(self) -> None:
        self.writer.close()
        self.files.close()


def _file_chunks(
    path: bytes, st: os.stat_result, cdc: FastCDC, secrets: PutSecrets
) -> Iterator[tuple[bytes, bytes | memoryview]]:
    """(chunk id, data) of a regular file, cut exactly as a backup cuts it."""
    fd = deep_path.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        for piece in file_pieces(f, st.st_size, cdc):
            yield blob.chunk_id(secrets, piece), piece
