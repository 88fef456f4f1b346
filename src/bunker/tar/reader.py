"""`bunker backup --tar FILE|-`: a tar/pax stream (plain or compressed) as the backup source.

The archive is read once, in order, with :mod:`tarfile` in streaming mode (``r|*``), so it can
come from a pipe. Each regular member's data goes through the same chunker and session writer
as a standard-input backup (never held whole in memory); the directory tree is built in memory
from the member paths and stored bottom-up at the end. The snapshot's root tree holds the
archive's paths as they are (``etc/passwd`` becomes ``/etc/passwd`` in the snapshot).

Metadata is kept as the archive has it (this is the inverse of tar_export.py): permission bits,
uid/gid and user/group names, mtime (pax fractional seconds, ns), atime and ctime when present,
symlink targets, hard links (``LNKTYPE`` members: every name gets the complete entry and one
``ino`` group; ``nl`` = the number of names in the archive), devices, fifos, xattrs
(``SCHILY.xattr.*``, or bsdtar's ``LIBARCHIVE.xattr.*``), POSIX ACLs (``SCHILY.acl.access`` /
``SCHILY.acl.default`` in the comma form) and inode flags (``SCHILY.fflags`` names).

Directories the archive does not list itself (implicit parents) get mode 0755, the owner of
their first member and the time of the backup. Sparse members (old GNU, pax GNU sparse 0.x and
1.0: what tarfile gives as ``TarInfo.sparse``) keep their holes: only the data regions are
stored, and the gaps between them become ``hole``. Members with an absolute path
or a ``..`` component are refused one by one (an ``err`` event); a later member with the same
path replaces an earlier one (as tar extraction does). A damaged or truncated archive ends the
run with an error and no snapshot.

Every member's entry is held to the tree rules readers apply (tree.fit_entry, FORMAT.md section
14) before it is placed: what a tree cannot hold (an id beyond 32 bits, a time beyond the years
1677 to 2262, an oversized xattr ...) is clamped or left out, or the member is left out, with one
``err`` event naming the member.
"""

from __future__ import annotations

import base64
import grp
import os
import pwd
import sys
import tarfile
import time
import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO, Self, cast

from bunker.backup.archiver import Archiver, ArchiveResult
from bunker.encoding import FormatError
from bunker.errors import BunkerError, ExitCode
from bunker.repo.tree import OVERFLOW_ID, fit_entry, name_problem
from bunker.tar.writer import FFLAG_NAMES

_FLAG_BITS = {name: bit for bit, name in FFLAG_NAMES}
_ACL_TAGS = {"u": "user", "user": "user", "g": "group", "group": "group", "m": "mask", "mask": "mask"}
_ACL_TAGS.update({"o": "other", "other": "other"})
_ACL_ORDER = {"user": 0, "group": 2, "mask": 4, "other": 5}


@dataclass
class _Node:
    entry: dict[str, Any]
    children: dict[bytes, _Node] = field(default_factory=dict)
    implicit: bool = False


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def pax_ns(text: str) -> int | None:
    """A pax time value (decimal seconds, maybe fractional and negative) in nanoseconds; None
    when it is not a finite number. A value beyond 10^1000 s comes back as ±10^1010 ns
    (fit_entry stores the nearest time in range either way) rather than as an int of millions
    of digits."""
    try:
        d = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        return None
    if not d.is_finite():
        return None
    if d.adjusted() > 1000:
        return 10**1010 if d > 0 else -(10**1010)
    return int(d * 1_000_000_000)


def _pax_count(text: str) -> bool:
    s = text.strip()
    return s.isascii() and s.isdigit()


_PAX_COUNTS = ("size", "uid", "gid", "GNU.sparse.size", "GNU.sparse.realsize")
_PAX_TIMES = ("mtime", "atime", "ctime")
# a block that is not a header, or half of one (not an end-of-archive block or the end of the input)
_BAD_HEADER = (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)  # type: ignore[attr-defined]


class _CheckedTarInfo(tarfile.TarInfo):
    """A member whose pax number records are checked before tarfile applies them, and whose
    archive never ends silently at a damaged header.

    tarfile turns a pax number it cannot parse into 0 (uid 0 is root), takes a negative size as
    is (every later header is then read from the wrong place) and ends the archive without a
    word at a header that is not one. Here such a record is ignored and kept in ``refused`` (the
    ustar header's value stays; the importer reports it), and a bad header ends the run as a
    damaged archive.
    """

    refused: dict[str, str] = {}  # noqa: RUF012 - replaced per member, never changed in place

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None:
        refused = {k: pax_headers[k] for k in _PAX_COUNTS if k in pax_headers and not _pax_count(pax_headers[k])}
        refused.update((k, pax_headers[k]) for k in _PAX_TIMES if k in pax_headers and pax_ns(pax_headers[k]) is None)
        for k in refused:
            # removed from the caller's own dict: tarfile places the next header by its "size"
            del pax_headers[k]
        if refused:
            self.refused = refused
        super()._apply_pax_info(pax_headers, encoding, errors)  # type: ignore[misc]

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tar)
        except _BAD_HEADER as exc:
            if tar.offset == 0:
                raise  # tarfile's own "not a tar archive"
            raise tarfile.ReadError(f"damaged header at byte {tar.offset}: {exc}") from None


def parse_acl(text: str) -> tuple[list[list[Any]], list[str]]:
    """The comma form (``user::rw-,user:alice:r--:1000,group::r--,mask::r--,other::---``; the
    id field is optional, abbreviated tags too) as FORMAT.md's ACL entries, and problems."""
    entries: list[list[Any]] = []
    problems: list[str] = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        f = part.split(":")
        tag = _ACL_TAGS.get(f[0])
        if tag is None or len(f) < 3:
            problems.append(f"ACL entry {part!r} not understood")
            continue
        qual, perms = f[1], f[2]
        perm = (4 if "r" in perms else 0) | (2 if "w" in perms else 0) | (1 if "x" in perms else 0)
        if not qual or tag in ("mask", "other"):
            entries.append([tag, perm])
            continue
        ident: int | None = None
        if len(f) > 3 and f[3].isdigit():
            ident = int(f[3])
        elif qual.isdigit():
            ident = int(qual)
        else:
            try:
                ident = pwd.getpwnam(qual).pw_uid if tag == "user" else grp.getgrnam(qual).gr_gid
            except KeyError:
                problems.append(f"ACL entry {part!r} left out: no id and {qual!r} is unknown here")
                continue
        entries.append([tag, perm, ident, "" if qual.isdigit() else qual])
    entries.sort(key=lambda e: (_ACL_ORDER[e[0]] + (1 if len(e) == 4 else 0), e[2] if len(e) == 4 else -1))
    return entries, problems


def parse_fflags(text: str) -> tuple[int, list[str]]:
    bits, unknown = 0, []
    for name in text.replace(" ", ",").split(","):
        if name:
            if name in _FLAG_BITS:
                bits |= _FLAG_BITS[name]
            else:
                unknown.append(name)
    return bits, unknown


def clean_path(name: str) -> list[bytes] | None:
    """The path's components, or None when it is absolute or has a ``..`` component."""
    if name.startswith("/"):
        return None
    comps = [_b(c) for c in name.split("/") if c and c != "."]
    if any(c == b".." for c in comps):
        return None
    return comps


def sparse_holes(size: int, regions: Any) -> list[int]:
    """The ``hole`` list ([offset, length, ...]) of a file of ``size`` bytes with these data regions."""
    holes: list[int] = []
    pos = 0
    for off, length in [*sorted(regions), (size, 0)]:
        if off > pos:
            if holes and holes[-2] + holes[-1] == pos:
                holes[-1] += off - pos
            else:
                holes += [pos, off - pos]
        pos = max(pos, off + length)
    return holes


class _Regions:
    """The data regions of a sparse member, one after the other (forward seeks only: a stream)."""

    def __init__(self, f: Any, regions: Any) -> None:
        # the unbuffered member file: its seek only moves its position (the buffered one asks the
        # stream whether it is seekable, which a pipe's _Stream cannot answer); reading then skips
        # forward in the stream, and a hole is never read
        self.f = getattr(f, "raw", f)
        self.left = [(o, n) for o, n in sorted(regions) if n > 0]
        self.pos = 0  # bytes still to read of the current region

    def readinto(self, b: memoryview) -> int:
        while self.pos == 0:
            if not self.left:
                return 0
            off, self.pos = self.left.pop(0)
            self.f.seek(off)
        n = int(self.f.readinto(b[: min(len(b), self.pos)]))
        if n <= 0:
            raise tarfile.ReadError("unexpected end of data")
        self.pos -= n
        return n


class _Input:
    """The archive's bytes as tarfile reads them. tarfile skips a member's data by reading it,
    and once the input has ended it goes on "reading" whatever size a header claims (2^70 bytes
    take forever); reading on after the end is refused, which ends the run as a truncated
    archive."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.reads_at_end = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if not b and n:
            self.reads_at_end += 1
            if self.reads_at_end > 8:
                raise tarfile.ReadError("unexpected end of data")
        return b


class TarImport:
    def __init__(self, archiver: Archiver, label: str) -> None:
        self.a = archiver
        self.label = label
        self.root = _Node({})
        self.now = time.time_ns()
        self.next_ino = 1
        self.unfit: list[str] = []  # what the current member's entry could not keep

    def warn(self, path: bytes, message: str) -> None:
        self.a.log.add("warn", "tar-metadata", message, path)

    def refuse(self, path: bytes, code: str, message: str) -> None:
        self.a.log.add("err", code, message, path)
        self.a.stats["errors"] += 1

    def meta(self, m: tarfile.TarInfo, path: bytes, kind: str) -> dict[str, Any]:
        pax = m.pax_headers
        mt = pax_ns(pax["mtime"]) if "mtime" in pax else None
        if mt is None:
            mt = int(m.mtime) * 1_000_000_000
        e: dict[str, Any] = {
            "t": kind,
            "m": m.mode & 0o7777,
            "u": m.uid,
            "g": m.gid,
            "U": m.uname or "",
            "G": m.gname or "",
            "mt": mt,
            "ct": (pax_ns(pax["ctime"]) if "ctime" in pax else None) or mt,
        }
        if "atime" in pax:
            at = pax_ns(pax["atime"])
            if at is not None:
                e["at"] = at
        x: dict[bytes, bytes] = {}
        for key, value in pax.items():
            if key.startswith("LIBARCHIVE.xattr."):
                try:
                    xn = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
                    x.setdefault(xn, base64.b64decode(value + "=" * (-len(value) % 4)))
                except ValueError:
                    self.warn(path, f"xattr record {key!r} not understood; left out")
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                x[_b(key[len("SCHILY.xattr.") :])] = _b(value)
        for n in (b"system.posix_acl_access", b"system.posix_acl_default"):
            x.pop(n, None)
        if x:
            e["x"] = dict(sorted(x.items()))
        acl: dict[str, list[list[Any]]] = {}
        for key, short in (("SCHILY.acl.access", "a"), ("SCHILY.acl.default", "d")):
            if pax.get(key):
                entries, problems = parse_acl(pax[key])
                for p in problems:
                    self.warn(path, p)
                if short == "d" or any(len(en) == 4 or en[0] == "mask" for en in entries):
                    acl[short] = entries
        if acl:
            e["acl"] = acl
        if pax.get("SCHILY.fflags") and kind in ("f", "d"):
            bits, unknown = parse_fflags(pax["SCHILY.fflags"])
            if unknown:
                self.warn(path, f"inode flags {','.join(unknown)} not known; left out")
            if bits:
                e["fl"] = bits
        for key, raw in getattr(m, "refused", {}).items():
            if key in ("uid", "gid"):  # never the ustar header's value: it is 0 (root) when the id did not fit
                e[key[0]] = OVERFLOW_ID
                self.unfit.append(f"pax {key} {raw!r} is not a number: stored as {OVERFLOW_ID}")
            elif key == "mtime":
                self.unfit.append(f"pax mtime {raw!r} is not a number: the ustar header's time is kept")
            elif key in _PAX_TIMES:
                self.unfit.append(f"pax {key} {raw!r} is not a number: left out")
            else:
                self.unfit.append(f"pax {key} {raw!r} is not a size: the ustar header's size {m.size} is used")
        return e

    def place(self, comps: list[bytes], entry: dict[str, Any]) -> _Node:
        node = self.root
        for c in comps[:-1]:
            child = node.children.get(c)
            if child is None or child.entry.get("t") != "d":
                owner = {k: entry[k] for k in ("u", "g", "U", "G")}
                child = _Node({"t": "d", "m": 0o755, **owner, "mt": self.now, "ct": self.now}, implicit=True)
                node.children[c] = child
            node = child
        old = node.children.get(comps[-1])
        new = _Node(entry)
        if old is not None and old.entry.get("t") == "d" and entry.get("t") == "d":
            new.children = old.children
        node.children[comps[-1]] = new
        return new

    def find(self, comps: list[bytes]) -> _Node | None:
        node: _Node | None = self.root
        for c in comps:
            node = node.children.get(c) if node is not None else None
        return node

    def fit(self, path: bytes, name: bytes, e: dict[str, Any]) -> bool:
        """Hold the member's entry (named ``name``) to the tree rules readers apply
        (tree.fit_entry); report what was changed or dropped as one err event. False: the member
        is left out."""
        whole = dict(e, n=name)
        if e["t"] == "d":
            whole["st"] = bytes(32)  # stands in for the subtree, stored at the end
        try:
            self.unfit += fit_entry(whole)
        except FormatError as exc:
            self.refuse(path, "tar-bad-metadata", f"member left out: {'; '.join([*self.unfit, str(exc)])}")
            return False
        del whole["n"]
        whole.pop("st", None)
        e.clear()
        e.update(whole)
        if self.unfit:
            self.refuse(
                path,
                "tar-bad-metadata",
                f"{'; '.join(self.unfit)} (metadata a backup cannot hold); the rest of the member is stored",
            )
            self.unfit = []
        return True

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        comps = clean_path(m.name)
        shown = _b(m.name)
        self.unfit = []
        if m.size < 0:  # tarfile has looked for the next header in the wrong place
            raise tarfile.ReadError(f"member {m.name!r} has a negative size")
        if comps is None:
            self.refuse(shown, "tar-unsafe-path", "absolute path or '..' in the archive: member refused")
            return
        why = next(filter(None, map(name_problem, comps)), None)
        if why:
            self.refuse(shown, "tar-unsafe-path", f"{why}: member refused")
            return
        if not comps:
            return  # "." : the root itself
        if m.islnk():
            target = clean_path(m.linkname)
            node = self.find(target) if target else None
            if node is None or node is self.root or node.entry.get("t") == "d":
                self.refuse(shown, "tar-bad-link", f"hard link to {m.linkname!r}, not an earlier member: refused")
                return
            first = node.entry
            if "ino" not in first:
                first["ino"] = self.next_ino
                self.next_ino += 1
            e = dict(first)  # the complete entry: every name can be restored alone
            self.place(comps, e)
            if e["t"] == "f":
                self.a.stats["files"] += 1
            return
        if m.isreg():
            e = self.meta(m, shown, "f")
            e["sz"] = m.size
            if m.sparse:  # only the data regions are stored; the rest are holes (FORMAT.md 14)
                holes = sparse_holes(m.size, m.sparse)
                if holes:
                    e["hole"] = holes
            if not self.fit(shown, comps[-1], e):  # before the data is read: a member left out stores none
                return
            f = tar.extractfile(m)
            assert f is not None
            if m.sparse:
                chunks, _ = self.a.store_stream(_Regions(f, m.sparse))
                size = m.size
            else:
                chunks, size = self.a.store_stream(cast(BinaryIO, f))
            e["sz"], e["c"] = size, chunks
            self.a.chunk_ids.update(chunks)
            self.a.stats["files"] += 1
            self.a.stats["files_new"] += 1
            self.a.stats["bytes"] += size
            self.a.progress.files += 1
        elif m.isdir():
            e = self.meta(m, shown, "d")
            self.a.stats["dirs"] += 1
        elif m.issym():
            e = self.meta(m, shown, "l")
            e["lt"] = _b(m.linkname)
        elif m.ischr() or m.isblk():
            e = self.meta(m, shown, "c" if m.ischr() else "b")
            e["dev"] = [m.devmajor, m.devminor]
        elif m.isfifo():
            e = self.meta(m, shown, "p")
        else:
            self.refuse(shown, "tar-unknown-type", f"member type {m.type!r} not supported: left out")
            return
        if not self.fit(shown, comps[-1], e):
            return
        self.a.progress.current = shown
        self.place(comps, e)
        self.a._maybe_tick()

    def store(self) -> bytes:
        """Store the trees bottom-up (iteratively: depth is unbounded); return the root tree id."""
        order: list[_Node] = []
        names: dict[int, list[dict[str, Any]]] = {}  # ino -> the entries still in the tree
        stack = [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            for c in node.children.values():
                if c.entry.get("t") == "d":
                    stack.append(c)
                elif "ino" in c.entry:
                    names.setdefault(c.entry["ino"], []).append(c.entry)
        for group in names.values():  # nl: the names in the archive (a replaced name is not one)
            for e in group:
                if len(group) > 1:
                    e["nl"] = len(group)
                else:
                    del e["ino"]
        tid = b""
        for node in reversed(order):
            entries = []
            for name, child in sorted(node.children.items()):
                e = dict(child.entry, n=name)
                if e.get("t") == "d":
                    e.pop("ino", None)
                    e.pop("nl", None)
                    e["st"] = child.entry["st"]
                entries.append(e)
            tid = self.a._store_tree(entries)
            node.entry["st"] = tid
            if node.implicit:
                self.a.stats["dirs"] += 1
        return tid

    def run(self, f: BinaryIO) -> bytes:
        try:
            with tarfile.open(
                fileobj=cast(BinaryIO, _Input(f)),
                mode="r|*",
                encoding="utf-8",
                errors="surrogateescape",
                tarinfo=_CheckedTarInfo,
            ) as tar:
                for m in tar:
                    self.member(tar, m)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise BunkerError(
                f"cannot read the tar archive {self.label}: {exc}",
                "the archive is damaged, truncated or not a tar archive; no snapshot was written",
                exit_code=ExitCode.FATAL,
            ) from exc
        return self.store()


def tar_entries(archiver: Archiver, source: str, f: BinaryIO | None = None) -> ArchiveResult:
    """Back up the tar archive ``source`` (a file, or ``-``: ``f`` or standard input)."""
    t0 = time.monotonic()
    try:
        if source == "-":
            root = TarImport(archiver, "from standard input").run(f or sys.stdin.buffer)
        else:
            try:
                src = open(os.fsencode(source), "rb")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise BunkerError(
                    f"cannot open the tar archive {source}: {exc.strerror}", "check the path", exit_code=ExitCode.FATAL
                ) from exc
            with src:
                root = TarImport(archiver, source).run(src)
    finally:
        archiver._pool.shutdown(wait=True)
        archiver._small_pool.shutdown()
    archiver.stats["duration_ms"] = int((time.monotonic() - t0) * 1000)
    archiver.stats.update(archiver.chunks.tree_stats(root))
    return ArchiveResult(root, archiver.chunk_ids, archiver.stats)
