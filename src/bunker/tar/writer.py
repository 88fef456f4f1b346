"""Export a snapshot (or parts of it) as a POSIX pax archive, streamed.

Every item a tar format can carry goes into the archive: regular files (content), directories,
symlinks, hard links (the first name of an ``ino`` group as an ordinary member, every further
name as a hard-link member naming it, whatever the type), character and block devices, fifos,
numeric owners and their names, permission bits incl. setuid/setgid/sticky, mtime (and atime when
stored) with ns precision, xattrs (``SCHILY.xattr.<name>``, raw byte values), POSIX ACLs
(``SCHILY.acl.access``/``SCHILY.acl.default`` in the comma form with numeric ids that GNU tar and
bsdtar both read; the entries' user and group names are not carried) and inode flags
(``SCHILY.fflags`` with bsdtar's Linux names). Names are raw bytes (non-UTF-8 names go through
``surrogateescape``; tarfile then marks the header ``hdrcharset=BINARY``).

A sparse file (one with ``hole``) is written in GNU sparse format 1.0 (pax headers
``GNU.sparse.major/minor/name/realsize``, member data = the sparse map block then only the data
regions), which GNU tar and bsdtar extract with its holes; tools that do not know the format
extract ``GNUSparseFile.0/NAME`` holding the map and the data.

Not carried: unix sockets (no tar format holds them: they are reported), the ``m`` (no compression) inode flag (bsdtar
has no name for it) and xattrs whose name is not UTF-8 (pax keywords are UTF-8): both reported.

File data is never held whole in memory: each member's data is read through :class:`FileData`,
which fetches and decrypts one chunk at a time.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from bunker.errors import BunkerError
from bunker.restore.restorer import Restorer

ZEROS = bytes(1 << 20)

# FS_IOC_GETFLAGS bits -> the names bsdtar (libarchive) writes in SCHILY.fflags on Linux
FFLAG_NAMES = (
    (0x1, "secdel"),
    (0x2, "undel"),
    (0x4, "compress"),
    (0x8, "sync"),
    (0x10, "schg"),
    (0x20, "sappnd"),
    (0x40, "nodump"),
    (0x80, "noatime"),
    (0x4000, "journal-data"),
    (0x8000, "notail"),
    (0x10000, "dirsync"),
    (0x20000, "topdir"),
    (0x800000, "nocow"),
    (0x20000000, "projinherit"),
)

_TYPES = {
    "f": tarfile.REGTYPE,
    "d": tarfile.DIRTYPE,
    "l": tarfile.SYMTYPE,
    "c": tarfile.CHRTYPE,
    "b": tarfile.BLKTYPE,
    "p": tarfile.FIFOTYPE,
}


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def ns_text(ns: int) -> str:
    """A pax time value (decimal seconds with a 9-digit fraction) for a time in nanoseconds."""
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{sec}.{frac:09d}"


def acl_pax(entries: list[list[Any]]) -> str:
    """An ACL in the comma form with numeric ids (``user::rw-,user:1000:r--:1000,...``) that both
    GNU tar and bsdtar read. The qualifier is the id, not the stored name: GNU tar resolves the
    name field with acl_from_text and drops the whole ACL when one name is unknown on the
    extracting machine (a bare-metal restore has no users yet), while an id always works."""

    def perm(p: int) -> str:
        return ("r" if p & 4 else "-") + ("w" if p & 2 else "-") + ("x" if p & 1 else "-")

    parts = []
    for e in entries:
        if len(e) == 4:
            parts.append(f"{e[0]}:{e[2]}:{perm(e[1])}:{e[2]}")
        else:
            parts.append(f"{e[0]}::{perm(e[1])}")
    return ",".join(parts)


def fflags_pax(flags: int) -> tuple[str, int]:
    """(bsdtar's flag names, the bits that have no name there)."""
    names = [name for bit, name in FFLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in FFLAG_NAMES)
    return ",".join(names), rest


def data_regions(size: int, holes: list[int]) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of a file of ``size`` bytes with ``holes``
    ([offset, length, ...]); a file ending in a hole gets a last region (size, 0), as GNU tar
    writes it, so the map itself gives the size."""
    out: list[tuple[int, int]] = []
    pos = 0
    for i in range(0, len(holes) - 1, 2):
        off, length = holes[i], holes[i + 1]
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + length)
    if pos < size or not out or out[-1][0] + out[-1][1] < size:
        out.append((pos, size - pos) if pos < size else (size, 0))
    return out


def sparse_map_block(regions: list[tuple[int, int]]) -> bytes:
    """The sparse map that starts a GNU sparse 1.0 member's data: decimal numbers one per line
    (count, then offset and length of each region), padded with NULs to a 512-byte block."""
    text = f"{len(regions)}\n" + "".join(f"{o}\n{n}\n" for o, n in regions)
    raw = text.encode()
    return raw + bytes(-len(raw) % tarfile.BLOCKSIZE)


class FileData:
    """A file-like object giving a file's data in order: its chunks, fetched and decrypted one at a
    time, with the holes of a sparse file as zeros; always exactly ``size`` bytes. A chunk that
    cannot be read is given as zeros of its length and reported through ``problem``."""

    def __init__(
        self,
        entry: dict[str, Any],
        fetch: Callable[[bytes], bytes],
        raw_length: Callable[[bytes], int],
        problem: Callable[[str], None],
        sparse: bool = False,
    ) -> None:
        self._size = int(entry.get("sz", 0))
        self._chunks = list(entry.get("c", []))
        self._holes = list(entry.get("hole", []))
        self._fetch, self._raw_length, self._problem = fetch, raw_length, problem
        self._buf = memoryview(b"")
        if sparse:  # GNU sparse 1.0: the map block, then only the data regions
            regions = data_regions(self._size, self._holes)
            self.map_block = sparse_map_block(regions)
            self.length = len(self.map_block) + sum(n for _, n in regions)
            self._size = sum(n for _, n in regions)
            self._holes = []
            self._buf = memoryview(self.map_block)
        else:
            self.length = self._size
        self._pieces = self._generate()

    def _data(self) -> Iterator[bytes]:
        for cid in self._chunks:
            try:
                yield self._fetch(cid)
            except BunkerError as exc:
                self._problem(exc.message)
                yield bytes(self._raw_length(cid))

    def _generate(self) -> Iterator[bytes | memoryview]:
        data = self._data()
        pending = memoryview(b"")
        pos = 0
        holes = [(self._holes[i], self._holes[i + 1]) for i in range(0, len(self._holes) - 1, 2)]
        holes.append((self._size, 0))
        for off, length in holes:
            while pos < off:  # data up to the next hole
                if not pending:
                    nxt = next(data, None)
                    if nxt is None:
                        break
                    pending = memoryview(nxt)
                n = min(len(pending), off - pos)
                yield pending[:n]
                pending = pending[n:]
                pos += n
            while pos < off:  # data missing: zeros (the chunk list was shorter than the file)
                n = min(len(ZEROS), off - pos)
                yield ZEROS[:n]
                pos += n
            end = min(off + length, self._size)
            while pos < end:
                n = min(len(ZEROS), end - pos)
                yield ZEROS[:n]
                pos += n

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if not self._buf:
                nxt = next(self._pieces, None)
                if nxt is None:
                    break
                self._buf = memoryview(nxt)
            take = len(self._buf) if n < 0 else min(len(self._buf), n - len(out))
            out += self._buf[:take]
            self._buf = self._buf[take:]
        return bytes(out)


@dataclass
class ExportStats:
    members: int = 0
    files: int = 0
    hardlinks: int = 0
    bytes: int = 0
    sparse: int = 0
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not in the archive
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what) in it but incomplete


@dataclass
class TarExporter:
    restorer: Restorer  # for its tree reading (Restorer.tree / find); nothing is restored
    out: IO[bytes]
    stats: ExportStats = field(default_factory=ExportStats)

    def __post_init__(self) -> None:
        self._links: dict[int, str | None] = {}  # ino -> member name of the first name (None: left out)
        self._reader = self.restorer.reader

    def export(self, root: bytes, paths: list[str]) -> ExportStats:
        with tarfile.open(
            fileobj=self.out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
        ) as tar:
            for p in paths or ["/"]:
                comps = [c for c in p.encode("utf-8", "surrogateescape").split(b"/") if c]
                entry = self.restorer.find(root, p)
                self.restorer.budget.reset()
                self._walk(tar, b"/".join(comps), entry, top=not comps)
        return self.stats

    def _walk(self, tar: tarfile.TarFile, name: bytes, entry: dict[str, Any], top: bool) -> None:
        """Members for ``entry`` and everything below it. Trees are read through the restorer's
        budget (a cycle or more than the snapshot's signed statistics claim stops the export); a
        name that a directory lists twice is left out the second time, so no member can land
        below a member of another type."""
        stack: list[tuple[bytes, dict[str, Any], bool, int]] = [(name, entry, top, 0)]
        while stack:
            n, e, is_root, depth = stack.pop()
            if not is_root:
                self._member(tar, _s(n), e)
            if e["t"] == "d":
                children: list[tuple[bytes, dict[str, Any]]] = []
                seen: set[bytes] = set()
                for child in self.restorer.walk_tree(depth, e["st"], "/" + _s(n)):
                    path = (n + b"/" if n else b"") + child["n"]
                    if child["n"] in seen:
                        self.stats.problems.append(("/" + _s(path), "left out: its directory lists this name twice"))
                        continue
                    seen.add(child["n"])
                    children.append((path, child))
                for path, child in reversed(children):
                    stack.append((path, child, False, depth + 1))

    def _member(self, tar: tarfile.TarFile, name: str, e: dict[str, Any]) -> None:
        t = e["t"]
        shown = "/" + name
        first: str | None = None
        linked = False
        if "ino" in e and t != "d":
            if e["ino"] in self._links:
                first = self._links[e["ino"]]
                if first is None:  # the first name was left out (a socket): so are the others
                    self.stats.left_out.append((shown, "unix socket"))
                    return
                linked = True
            else:
                self._links[e["ino"]] = None if t == "s" else name
        if t == "s" or (t not in _TYPES):
            self.stats.left_out.append((shown, "unix socket" if t == "s" else f"unknown type {t!r}"))
            return
        ti = tarfile.TarInfo(name)
        ti.mode = int(e.get("m", 0)) & 0o7777
        ti.uid, ti.gid = int(e.get("u", 0)), int(e.get("g", 0))
        ti.uname, ti.gname = e.get("U") or "", e.get("G") or ""
        mt = int(e.get("mt", 0))
        ti.mtime = max(mt // 1_000_000_000, 0)
        pax: dict[str, str] = {"mtime": ns_text(mt)}
        if "at" in e:
            pax["atime"] = ns_text(int(e["at"]))
        if linked:
            assert first is not None
            ti.type = tarfile.LNKTYPE
            ti.linkname = first
            ti.pax_headers = pax
            tar.addfile(ti)
            self.stats.members += 1
            self.stats.hardlinks += 1
            return
        ti.type = _TYPES[t]
        if t == "l":
            ti.linkname = _s(e.get("lt", b""))
        if t in "cb" and "dev" in e:
            ti.devmajor, ti.devminor = int(e["dev"][0]), int(e["dev"][1])
        for xn, xv in sorted(e.get("x", {}).items()):
            try:
                key = xn.decode("utf-8")
            except UnicodeDecodeError:
                self.stats.problems.append((shown, f"xattr {_s(xn)!r} left out: its name is not UTF-8"))
                continue
            pax["SCHILY.xattr." + key] = _s(xv)
        acl = e.get("acl", {})
        if "a" in acl:
            pax["SCHILY.acl.access"] = acl_pax(acl["a"])
        if "d" in acl:
            pax["SCHILY.acl.default"] = acl_pax(acl["d"])
        if e.get("fl"):
            names, rest = fflags_pax(int(e["fl"]))
            if names:
                pax["SCHILY.fflags"] = names
            if rest:
                self.stats.problems.append((shown, f"inode flags {rest:#x} left out: tar has no name for them"))
        ti.pax_headers = pax
        self.stats.members += 1
        if t == "f":
            size = int(e.get("sz", 0))
            self.stats.files += 1
            self.stats.bytes += size
            sparse = bool(e.get("hole"))
            data = FileData(
                e, self._fetch, self._raw_length, lambda what: self.stats.problems.append((shown, what)), sparse
            )
            ti.size = data.length
            if sparse:  # GNU sparse format 1.0 (pax): GNU tar and bsdtar recreate the holes
                head, _, base = name.rpartition("/")
                ti.name = (head + "/" if head else "") + "GNUSparseFile.0/" + base
                pax.update(
                    {
                        "GNU.sparse.major": "1",
                        "GNU.sparse.minor": "0",
                        "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(size),
                    }
                )
                self.stats.sparse += 1
                ti.pax_headers = pax
            tar.addfile(ti, data)
        else:
            tar.addfile(ti)

    def _fetch(self, cid: bytes) -> bytes:
        return self._reader.fetch(self._reader.ref(cid))

    def _raw_length(self, cid: bytes) -> int:
        loc = self._reader.locations.get(cid)
        return int(loc.raw_length) if loc else 0
