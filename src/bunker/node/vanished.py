"""Spooled snapshots that need packs which vanished upstream while this machine was offline.

An offline run deduplicates against the packs it last saw upstream. If a prune removed some of
them meanwhile (an offline session can outlive any grace period, docs/format.md section 15), forwarding the
snapshot as it is would deliver holes. A pack a prune condemned counts as vanished too: the
forwarding session treats it as absent like any session, since a prune may delete it while the
snapshot goes up. Instead, under the forwarding lease:

1. the chunks that lived only in vanished packs are copied from condemned packs that are still
   there (their ciphertext, wrapped keys and sealed group keys as they are, as a repack copies:
   no key is needed), and the rest is stored again from the source files, where the files cache
   shows a file unchanged since it was backed up;
2. what cannot be recovered makes the snapshot *incomplete* (level err), naming the affected
   files (from the files cache; lost directory listings are counted);
3. the snapshot gets a new pack set and is signed again when it is linked into the chain
   (node/deliver.py: it was never published, so nobody holds the old name), and the client's
   chain head follows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pyfastcdc import FastCDC

from bunker.backup.chunker import file_pieces, make_cdc
from bunker.backup.client_dirs import client_cache
from bunker.backup.files_cache import FilesCache, lookup
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import PutKey
from bunker.errors import CorruptObject, ObjectMissing
from bunker.fs import deep_path
from bunker.repo import blob, refs
from bunker.repo.certs import Certificate
from bunker.repo.condemnations import ListedPacks
from bunker.repo.index import Location, make_index
from bunker.repo.index_cache import IndexCache
from bunker.repo.repack import PackCopier, read_source
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.snapshot import Envelope
from bunker.runlog import LEVELS, display_path

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


class VanishedRepair:
    """Repairs spooled snapshots of ``cert`` whose packs vanished upstream or were condemned
    there (``packs``: read after the caller's lease). ``refresh`` keeps the caller's lease alive."""

    def __init__(
        self,
        repo: Repository,
        put: PutKey,
        cert: Certificate,
        packs: ListedPacks,
        refresh: Callable[[], None] = lambda: None,
    ) -> None:
        self.repo, self.put, self.cert, self.packs, self.refresh = repo, put, cert, packs, refresh
        self._recovery: _Recovery | None = None

    def repair(self, name: str, env: Envelope) -> tuple[Envelope, Repaired | None]:
        """The envelope ``env`` (of spooled snapshot ``name``) with a pack set of packs that are
        upstream, after storing again what it can; what was repaired (None: nothing vanished).
        The caller signs it again."""
        packs = refs.read_set(env.packset, self.repo.get_object)
        vanished = sorted(p for p in packs if not self.packs.usable(p))
        if not vanished:
            return env, None
        fix = Repaired(name, name, vanished_packs=len(vanished))
        stats = dict(env.stats)
        level, complete = env.level, env.complete
        if self._recovery is None:
            self._recovery = _Recovery(self.repo, self.put, self.cert, self.packs)
        recovery = self._recovery
        chunk_ids = refs.read_set(env.chunkset, self.repo.get_object, self.put.secrets)
        condemned = [p for p in vanished if p in self.packs.listed]
        lost = recovery.recover(chunk_ids, condemned, self.refresh)
        locs = recovery.index.locations
        packset_objs = refs.build_packset({locs[c].pack for c in chunk_ids if c in locs})
        for obj_name, data in packset_objs.items():
            if obj_name != "top":
                self.repo.put_object("refs", data)
        fix.recovered_chunks = len(recovery.recovered & set(chunk_ids))
        fix.lost_chunks = len(lost)
        stats["chunks_recovered"] = fix.recovered_chunks
        if lost:
            complete = False
            level = max(level, "err", key=LEVELS.index)
            stats["chunks_lost"] = len(lost)
            fix.files, fix.more_files = recovery.files_with(lost)
        repaired = dataclasses.replace(
            env, packset=refs.top_name(packset_objs), complete=complete, level=level, stats=stats
        )
        return repaired, fix

    def close(self) -> None:
        if self._recovery is not None:
            self._recovery.close()


class _Recovery:
    """The index view of the usable packs, a writer for what is stored again, and the files
    cache to find and name source files."""

    def __init__(self, repo: Repository, put: PutKey, cert: Certificate, packs: ListedPacks) -> None:
        self.repo, self.put, self.cert = repo, put, cert
        cache_dir = client_cache(repo, put)
        self.index = IndexCache(
            repo, put.secrets, None, absent_packs=packs.condemned, listed_packs=packs.listed
        ).load()
        self.writer = SessionWriter(repo, put, cert.name, self.index)
        path = os.path.join(cache_dir, "files.sqlite")
        self.files = FilesCache(path if os.path.exists(path) else None)
        self.cdc = make_cdc(repo.config.chunker, put.secrets)
        self.recovered: set[bytes] = set()

    def recover(self, chunk_ids: list[bytes], condemned: list[str], refresh: Callable[[], None]) -> set[bytes]:
        """Store again what of ``chunk_ids`` is not located: copied from the ``condemned`` packs
        that still hold it, else from unchanged source files; return the chunks still lost."""
        wanted = {c for c in chunk_ids if c not in self.index.locations}
        if not wanted:
            return set()
        for pack in condemned:
            if wanted:
                wanted -= self._copy(pack, wanted)
                refresh()
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

    def _copy(self, pack: str, wanted: set[bytes]) -> set[bytes]:
        """Copy the blobs of ``wanted`` that condemned ``pack`` holds into a new pack signed by
        this client, and index it; returns the chunks copied. Nothing when the pack went
        meanwhile, does not verify, or its writer was revoked (repo/repack.py)."""
        try:
            src = read_source(self.repo, pack, self.put.secrets, wanted)
        except (CorruptObject, ObjectMissing):
            return set()
        if not src.groups:
            return set()
        copier = PackCopier(src.kind, self.put.secrets, self.put.client_key, self.cert.name)
        for sealed, blobs in src.groups:
            fresh = [(e, d) for e, d in blobs if e.chunk_id not in copier.chunk_ids]
            if fresh:
                copier.add_group(sealed, fresh)
        name, data = copier.finish()
        self.repo.backend.put(f"packs/{name}", data)
        entries = [(cid, Location(name, off, ln, raw)) for cid, off, ln, raw in copier.entries]
        self.repo.put_object("index", make_index(entries, self.put.secrets, self.put.client_key, self.cert.name))
        self.index.add(entries)
        self.recovered |= copier.chunk_ids
        return copier.chunk_ids

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
