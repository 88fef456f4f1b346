"""The client's view of the index: every chunk of its dedup domain and where it is stored.

Decrypted index objects are cached as files in the client's cache directory (index objects are
immutable, so a cached copy never goes stale; one that disappeared from the repository is
dropped). The cache can always be rebuilt from the repository with the put key. A cache
directory that cannot be written (a full disk) only costs speed: the index is read from the
repository, and ``cache_problem`` says why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import NamedTuple

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import BadSignature, verify
from bunker.errors import CorruptObject, ObjectMissing
from bunker.private_files import private_dirs, write_private_file
from bunker.repo.blob_reader import read_trailer
from bunker.repo.index import Location, LocationMap, decrypt_index, parse_index_frame
from bunker.repo.location_arrays import ID, LocationColumns, LocationRow, check_columns
from bunker.repo.objects import MAGIC_INDEX, MAX_SIGNED_OBJECT, is_hash_name
from bunker.repo.pack import fetch_footer
from bunker.repo.repository import Repository


class IndexCache:
    """chunk id -> Location for one dedup domain, trusted writers only."""

    def __init__(
        self,
        repo: Repository,
        secrets: PutSecrets,
        cache_dir: str | None,
        *,
        for_dedup: bool = True,
        absent_packs: Iterable[str] = (),
        only_packs: Iterable[str] | None = None,
        listed_packs: Iterable[str] | None = None,
    ) -> None:
        """``for_dedup``: skip what revoked clients wrote (a client never dedups against it);
        readers (restore, check) pass False so a revocation never hides good older data.
        ``absent_packs``: packs to treat as gone (vanished or condemned): their chunks are not
        located, so a writer stores them again. ``only_packs``: locate chunks only in these (a
        snapshot's pack set: where a chunk is stored twice, the copy its snapshot names).
        ``listed_packs``: the packs a listing showed before ``load``; entries of index objects
        that name other packs are not loaded (a pack deleted after the index object was written,
        whose entry a rewrite missed, or one too fresh for the listing: stored again, never
        deduplicated against). Entries added later (this session's own packs) are kept."""
        self.for_dedup = for_dedup
        self.absent_packs = frozenset(absent_packs)
        self.only_packs = frozenset(only_packs) if only_packs is not None else None
        self.listed_packs = frozenset(listed_packs) if listed_packs is not None else None
        self.repo = repo
        self.secrets = secrets
        self.cache_dir = os.path.join(cache_dir, "index") if cache_dir else None
        self.locations = LocationMap()
        self.objects: set[str] = set()
        self.problems: list[str] = []
        self.cache_problem = ""  # why the cache directory is not written (the index still loads)
        self.unindexed: list[tuple[str, list[tuple[bytes, Location]]]] = []  # found by add_unindexed_packs
        # every pack an added entry names: also those whose every chunk another pack holds too
        # (``locations`` keeps one location per chunk), which prune must see to condemn them
        self.named_packs: set[str] = set()

    def __contains__(self, cid: bytes) -> bool:
        return cid in self.locations

    def __len__(self) -> int:
        return len(self.locations)

    def get(self, cid: bytes) -> Location | None:
        return self.locations.get(cid)

    def load(self) -> IndexCache:
        """Read every index object of the repository (cached ones from disk)."""
        revoked = self.repo.revoked if self.for_dedup else {}
        sizes = {i.name: i.size for i in self.repo.backend.list("index/")}
        names = list(sizes)
        # a spool (the repository unreachable) lists only what this client wrote offline: the
        # cached index objects stay valid and in use, so dedup keeps working offline
        partial = self.repo.backend.capabilities().partial
        cached: set[str] = set()
        if self.cache_dir:
            try:
                private_dirs(self.cache_dir)
                cached = set(os.listdir(self.cache_dir))
            except OSError as exc:
                self._uncached(exc)
                self.cache_dir = None  # nothing to read either
        if self.cache_dir:
            listed = {n.split("/", 1)[1] for n in names}
            if partial:
                names += [f"index/{leaf}" for leaf in sorted(cached - listed) if is_hash_name(f"index/{leaf}")]
            else:
                for stale in cached - listed:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.cache_dir, stale))
        # Two passes (LocationMap.bulk_load): the first reads, checks and caches every index
        # object and keeps only what sorting needs; the second reads the cached copies again
        # and places each entry in the final arrays. An object that could not be cached is kept
        # in memory between the passes. The cache holds every object whole with its signer, so
        # readers use it too, and a writer revoked after its objects were cached is skipped.
        plan: list[tuple[str, CachedIndex | None]] = []

        def first() -> Iterator[LocationColumns]:
            for name in names:
                leaf = name.split("/", 1)[1]
                got = self._read_cached(leaf) if leaf in cached else None
                kept = None
                if got is None:
                    if sizes.get(name, 0) > MAX_SIGNED_OBJECT:  # never fetched: no index object is near this
                        self.problems.append(
                            f"{name}: {sizes[name]} bytes, larger than any signed object may be "
                            f"({MAX_SIGNED_OBJECT}): not read"
                        )
                        continue
                    got = self._fetch(name)
                    if got is None:
                        continue
                    if not (self.cache_dir and self._store_cached(leaf, got)):
                        kept = got
                columns = self._usable(got, revoked)
                plan.append((leaf, kept))
                self.named_packs.update(columns.used_packs())
                self.objects.add(name)
                yield columns

        def again() -> Iterator[LocationColumns]:
            for leaf, kept in plan:
                got = kept if kept is not None else self._read_cached(leaf)
                if got is None:
                    raise encoding.FormatError(f"index cache file {leaf} vanished while the index was loaded")
                yield self._usable(got, revoked)

        try:
            self.locations.bulk_load(first(), again)
        except encoding.FormatError:
            # a cache file changed between the passes (another run of this client rewrote it,
            # a disk error): load once more in one pass, from the repository where needed
            batches = []
            for leaf, kept in plan:
                got = kept if kept is not None else self._read_cached(leaf)
                if got is None:
                    got = self._fetch(f"index/{leaf}") or CachedIndex("", LocationColumns.from_entries([]))
                batches.append(self._usable(got, revoked))
            self.locations = LocationMap()
            self.locations.bulk_load(batches, lambda: batches)
        return self

    def _read_cached(self, leaf: str) -> CachedIndex | None:
        """The cached copy of index object ``leaf``, or None (none, unreadable, another format)."""
        if not self.cache_dir:
            return None
        try:
            with open(os.path.join(self.cache_dir, leaf), "rb") as f:
                return _decode_cached(f.read())
        except (OSError, encoding.FormatError):
            return None

    def _usable(self, got: CachedIndex, revoked: Container[str]) -> LocationColumns:
        """The entries of an index object this index takes: none of a revoked writer's for
        dedup (``revoked``), of listed packs (see __init__), and of packs it takes at all
        (:meth:`_takes`)."""
        columns = got.columns
        if got.signer in revoked:
            return columns.select(lambda _pack: False)  # clients do not dedup against revoked writers
        if self.listed_packs is not None:
            columns = columns.select(self.listed_packs.__contains__)
        return columns.select(self._takes)

    def _takes(self, pack: str) -> bool:
        """Whether entries of ``pack`` are located: not absent, and among the only packs."""
        return pack not in self.absent_packs and (self.only_packs is None or pack in self.only_packs)

    def _fetch(self, name: str) -> CachedIndex | None:
        """Index object ``name`` from the repository, verified and decrypted (no entries when it
        is another dedup domain's); None when it is gone or damaged (in ``problems``)."""
        try:
            data = self.repo.get_object(name)
        except ObjectMissing:
            # listed, then gone: a prune rewrote it, and it writes the index object that keeps
            # its entries before it deletes this one (docs/format.md section 15). That newer
            # object came after the listing, so this run only misses its entries for dedup
            # (what they locate is stored once more). Not damage: `bunker check` finds that.
            return None
        try:
            obj = parse_index_frame(data)
            if obj.body["domain"] != self.secrets.domain_id:
                return CachedIndex("", LocationColumns.from_entries([]))  # another dedup domain: not ours to use
            cert = self.repo.certificate(obj.signer)
            verify(cert.verify_key, MAGIC_INDEX, obj.body_bytes, obj.sig)
            return CachedIndex(obj.signer, decrypt_index(obj, self.secrets))
        except (CorruptObject, ObjectMissing, encoding.FormatError, BadSignature) as exc:
            self.problems.append(f"{name}: {exc}")
            return None

    def _store_cached(self, leaf: str, got: CachedIndex) -> bool:
        """Write the cached copy of index object ``leaf``; False if it could not be written."""
        assert self.cache_dir
        if self.cache_problem:
            return False  # no room: read from the repository next time
        try:
            # a cache: rebuilt from the repository when lost, so not fsynced
            write_private_file(os.path.join(self.cache_dir, leaf), _encode_cached(got), durable=False)
        except OSError as exc:
            self._uncached(exc)
            return False
        return True

    def _uncached(self, exc: OSError) -> None:
        """Stop writing the cache directory: index objects not cached are read from the
        repository on every run."""
        self.cache_problem = (
            f"the index cache {self.cache_dir} cannot be written ({exc.strerror or exc}): index objects are read "
            "from the repository on every run (slower); free space on that disk (or make it writable)"
        )

    def add(self, entries: Iterable[tuple[bytes, LocationRow]]) -> None:
        """Add entries (first location wins: equal chunks in two packs are both valid)."""
        if self.absent_packs or self.only_packs is not None:
            entries = [(cid, loc) for cid, loc in entries if self._takes(loc[0])]
        entries = entries if isinstance(entries, list) else list(entries)
        self.named_packs.update({loc[0] for _, loc in entries})
        self.locations.update(entries)

    def add_pack(self, pack: str, rows: Sequence[tuple[bytes, int, int, int]]) -> None:
        """:meth:`add` of the blobs ``rows`` (chunk id, offset, length, raw length) of one pack."""
        if self._takes(pack):
            self.named_packs.add(pack)
            self.locations.add_pack(pack, rows)

    def add_unindexed_packs(self, only_writer: str | None = None, listed: Iterable[str] | None = None) -> int:
        """Add the blobs of every pack of this domain that no index object names, read from the
        packs' own trailers (indexes are only a cache of them). Returns how many packs were read.
        ``only_writer``: only packs whose footer names this certificate as signer (other packs
        cost one small range read each). ``listed``: the pack names a listing showed (else the
        packs are listed here)."""
        indexed = set(self.named_packs)
        revoked = self.repo.revoked if self.for_dedup else {}
        if listed is None:
            listed = [info.name.split("/", 1)[1] for info in self.repo.backend.list("packs/")]
        n = 0
        for pack in listed:
            if pack in indexed or pack in self.absent_packs:
                continue
            try:
                if only_writer is not None and fetch_footer(self.repo.backend, f"packs/{pack}").signer != only_writer:
                    continue
                blobs, _, writer = read_trailer(self.repo, pack, self.secrets)
            except (CorruptObject, ObjectMissing, encoding.FormatError):
                continue  # another domain's pack, or damaged: check reports it
            if writer in revoked:
                continue
            entries = [(b.chunk_id, Location(pack, b.offset, b.length, b.raw_length)) for b in blobs]
            self.add(entries)
            self.unindexed.append((pack, entries))
            n += 1
        return n

    def cover(self, chunk_ids: Sequence[bytes]) -> tuple[int, int]:
        """Make sure every chunk of ``chunk_ids`` is located, reading unindexed packs' trailers
        if needed. Returns (chunks that were not indexed, chunks still not found)."""
        missing = self.locations.missing(chunk_ids)  # vectorized: a snapshot's whole chunk set
        if not missing:
            return 0, 0
        self.add_unindexed_packs()
        return len(missing), sum(1 for c in missing if c not in self.locations)

    def record_written(
        self, name: str, entries: Sequence[tuple[bytes, LocationRow]] | LocationColumns, signer: str
    ) -> None:
        """Note an index object this client just wrote, signed by certificate ``signer`` (so
        the next load need not fetch it)."""
        self.objects.add(name)
        if self.cache_dir:
            columns = entries if isinstance(entries, LocationColumns) else LocationColumns.from_entries(entries)
            self._store_cached(name.split("/", 1)[1], CachedIndex(signer, columns))


class CachedIndex(NamedTuple):
    """An index object as the cache keeps it: its signer's certificate name (empty for another
    dedup domain's object, which has no entries for this one) and all its entries."""

    signer: str
    columns: LocationColumns


# columns and signer; files of older formats (rows; columns without the signer, of which a
# revoked writer's were kept empty) are read again from the repository
_CACHE_MAGIC = b"BKIX3\n"


def _encode_cached(got: CachedIndex) -> bytes:
    c = got.columns
    pack, cols = c.little_endian()
    return _CACHE_MAGIC + encoding.pack(
        {"signer": got.signer, "packs": c.packs, "ids": c.ids, "pack": pack, "cols": cols}
    )


def _decode_cached(data: bytes) -> CachedIndex:
    if not data.startswith(_CACHE_MAGIC):
        raise encoding.FormatError("index cache file of another format")
    m = encoding.expect_map(encoding.unpack(data[len(_CACHE_MAGIC) :]), "signer", "packs", "ids", "pack", "cols")
    signer = encoding.field(m, "signer", str)
    packs = encoding.field(m, "packs", list)
    ids, pack, cols = (encoding.field_bytes(m, k) for k in ("ids", "pack", "cols"))
    n = len(ids) // ID
    if len(ids) != n * ID or len(pack) != 4 * n or len(cols) != 24 * n or not all(isinstance(p, str) for p in packs):
        raise encoding.FormatError("bad index cache file")
    columns = LocationColumns.from_little_endian(ids, packs, pack, cols)
    check_columns(columns)  # (a damaged file: FormatError, and the object is fetched again)
    return CachedIndex(signer, columns)
