"""verify: with the put key only, confirm that local files' current content is stored.

For each file: chunk it as a backup would, compute chunk ids, and require each id in the index
(in a pack of a non-revoked writer: the index view already drops revoked writers). Files whose
metadata differs from what the files cache recorded at the last backup are listed as changed,
files it never saw as new. With ``read_data`` each chunk's convergent key is derived from the
local data, the stored blob fetched and decrypted and compared byte for byte: this proves the
repository really holds the content, without any password.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from bunker.backup import files_cache as fc
from bunker.backup.chunker import file_pieces, make_cdc
from bunker.crypto.derive import keyed_hash
from bunker.fs import deep_path
from bunker.repo import blob
from bunker.repo.blob_reader import read_trailer
from bunker.repo.index_cache import IndexCache
from bunker.repo.pack import BlobEntry
from bunker.repo.repository import Repository
from bunker.runlog import display_path


@dataclass
class VerifyReport:
    stored: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    chunks_compared: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable


class Verifier:
    def __init__(self, repo: Repository, index: IndexCache, files_cache: fc.FilesCache, read_data: bool) -> None:
        self.repo = repo
        self.index = index
        self.secrets = index.secrets
        self.cache = files_cache
        self.read_data = read_data
        self.cdc = make_cdc(repo.config.chunker, self.secrets)
        self._trailers: dict[str, dict[bytes, BlobEntry]] = {}
        self.report = VerifyReport()

    def run(self, paths: list[str]) -> VerifyReport:
        """Verify the regular files at or below ``paths``."""
        deep_path.forget()  # directories cached by an earlier run in this process may be gone
        for p in paths:
            top = os.fsencode(os.path.abspath(p))
            try:
                st = deep_path.lstat(top)
            except OSError as exc:
                self.report.unreadable.append((display_path(top), exc.strerror or str(exc)))
                continue
            if stat.S_ISDIR(st.st_mode):
                # below the named directory nothing is followed: a symlink planted in place of a
                # directory on the way fails that item instead of leading elsewhere
                with deep_path.confined(top):
                    self._walk(top)
            else:
                parent, name = os.path.split(top)
                self._file(top, name, st, self.cache.load_dir(parent))
        return self.report

    def _walk(self, top: bytes) -> None:
        """Each directory's files in name order, then its subdirectories (like os.walk, which
        cannot reach paths longer than PATH_MAX); symlinks are not followed, neither as items
        nor in place of a directory on the way (``top`` is confined, see deep_path)."""
        stack = [top]
        while stack:
            dirpath = stack.pop()
            try:
                names = sorted(deep_path.listdir(dirpath))
            except OSError as exc:
                self.report.unreadable.append((display_path(dirpath), exc.strerror or str(exc)))
                continue
            record = self.cache.load_dir(dirpath)
            subdirs = []
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = deep_path.lstat(path)
                except OSError as exc:
                    self.report.unreadable.append((display_path(path), exc.strerror or str(exc)))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(path)
                else:
                    self._file(path, name, st, record)
            stack += reversed(subdirs)

    def _file(self, path: bytes, name: bytes, st: os.stat_result, record: fc.DirRecord) -> None:
        if not stat.S_ISREG(st.st_mode):
            return
        shown = display_path(path)
        if name not in record:
            self.report.new.append(shown)
        elif fc.lookup(record, name, st) is None:
            self.report.changed.append(shown)
        try:
            # the data regions of a sparse file, holes left out, exactly as a backup reads it
            fd = deep_path.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                for piece in file_pieces(f, st.st_size, self.cdc):
                    self.report.bytes += len(piece)
                    cid = blob.chunk_id(self.secrets, piece)
                    loc = self.index.get(cid)
                    if loc is None:
                        self.report.missing.append((shown, "not stored: its current content is not in the repository"))
                        return
                    if self.read_data:
                        why = self._compare(cid, piece, loc.pack)
                        if why:
                            self.report.missing.append((shown, why))
                            return
        except OSError as exc:
            self.report.unreadable.append((shown, exc.strerror or str(exc)))
            return
        self.report.stored.append(shown)

    def _compare(self, cid: bytes, piece: bytes | memoryview, pack: str) -> str:
        entries = self._trailers.get(pack)
        if entries is None:
            try:
                blobs, _, _ = read_trailer(self.repo, pack, self.secrets)
            except Exception as exc:  # noqa: BLE001 - reported per file
                return f"its pack {pack[:16]}… is not readable: {exc}"
            entries = self._trailers[pack] = {b.chunk_id: b for b in blobs}
        entry = entries.get(cid)
        if entry is None:
            return f"pack {pack[:16]}… does not hold a chunk the index places there"
        k_blob = keyed_hash(self.secrets.blob_key, piece)  # the convergent key, from local data
        try:
            stored = blob.decrypt_blob(
                k_blob, cid, self.repo.backend.get(f"packs/{pack}", entry.offset, entry.length), entry.raw_length
            )
        except Exception as exc:  # noqa: BLE001
            return f"stored copy does not decrypt with the key of the local content: {exc}"
        self.report.chunks_compared += 1
        if stored != piece:
            return "stored copy differs from the local content"
        return ""
