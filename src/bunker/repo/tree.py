"""Trees: one directory's entries as canonical msgpack, stored as a blob in a metadata pack.

Entries are sorted by raw name bytes and encoded canonically, so an unchanged directory gives
the same bytes, the same chunk id, and is stored once.

Entry keys (absent when not applicable; FORMAT.md section 14 defines them)::

    n  name (bytes)            t  type: f file, d dir, l symlink, c chardev, b blockdev,
    m  permission bits (07777)       p fifo, s socket
    u g  uid gid               U G  user and group names
    mt ct at  mtime, ctime, atime in ns
    sz size                    c  chunk ids (files)     st  subtree id (dirs)
    lt link target (bytes)     dev  [major, minor] (devices)
    x  xattrs {raw name: raw value}, sorted by name
    acl  {"a": access entries, "d": default entries}; entry [tag, perm] or [tag, perm, id, name]
    fl  inode flags (chattr bits)       hole  [offset, length, ...] of a sparse file's holes
    ino nl  hard links: link group and the inode's link count
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, CorruptObject, ExitCode

TYPES = ("f", "d", "l", "c", "b", "p", "s")
# The most bytes one tree may encode to (FORMAT.md section 14): a directory of a million entries
# (~140 B each) or a file of 7 million chunks (34 B per chunk id) fits; readers refuse more
# before decompressing, writers never write more.
MAX_TREE = 256 << 20
_INTS = ("m", "u", "g", "mt", "ct", "sz")
# keys every reader checks on its fast path; an entry with any other key gets the full check
_COMMON = frozenset(("n", "t", "m", "u", "g", "U", "G", "mt", "ct", "sz", "c", "st", "lt"))
_U32 = (1 << 32) - 1
_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1
_ACL_TAGS = ("user", "group", "mask", "other")
_ACL_ACCESS, _ACL_DEFAULT = b"system.posix_acl_access", b"system.posix_acl_default"


def encode_tree(entries: list[dict[str, Any]]) -> bytes:
    """Canonical bytes of a directory's entries (sorted by name, keys sorted).

    Entry values are scalars or lists of scalars; the only maps below an entry, ``x`` and
    ``acl``, are sorted here. This avoids the generic (recursive, slower) canonicalization on
    the hot path: most entries have neither.
    """
    ordered = [
        dict(sorted((e if "x" not in e and "acl" not in e else _sort_maps(e)).items()))
        for e in sorted(entries, key=_name)
    ]
    return encoding.pack_ordered({"e": ordered, "v": 1})


def _sort_maps(e: dict[str, Any]) -> dict[str, Any]:
    e = dict(e)
    if "x" in e:
        e["x"] = dict(sorted(e["x"].items()))
    if "acl" in e:
        e["acl"] = dict(sorted(e["acl"].items()))
    return e


def _name(e: dict[str, Any]) -> bytes:
    n: bytes = e["n"]
    return n


def _int(v: Any, lo: int = 0, hi: int = (1 << 64) - 1) -> bool:
    return type(v) is int and lo <= v <= hi


def decode_tree(data: bytes) -> list[dict[str, Any]]:
    """Decode and validate a tree; raise FormatError on anything malformed."""
    m = encoding.expect_map(encoding.unpack(data), "v", "e")
    if m["v"] != 1:
        raise encoding.FormatError(f"tree version {m['v']!r} is not supported")
    entries: list[dict[str, Any]] = encoding.field(m, "e", list)
    for e in entries:
        if not isinstance(e, dict):
            raise encoding.FormatError("tree entry is not a map")
        name = e.get("n")
        if not isinstance(name, bytes) or not name or b"/" in name or name in (b".", b"..") or b"\x00" in name:
            raise encoding.FormatError(f"tree entry has an unsafe name {name!r}")
        t = e.get("t")
        if t not in TYPES:
            raise encoding.FormatError(f"tree entry {name!r} has an unknown type")
        for k in _INTS:
            if k in e and type(e[k]) is not int:
                raise encoding.FormatError(f"tree entry {name!r} field {k} is not an integer")
        chunks = e.get("c", [])
        if not isinstance(chunks, list) or not all(isinstance(c, bytes) and len(c) == 32 for c in chunks):
            raise encoding.FormatError(f"tree entry {name!r} has bad chunk ids")
        if t == "d" and not (isinstance(e.get("st"), bytes) and len(e["st"]) == 32):
            raise encoding.FormatError(f"directory entry {name!r} has no subtree")
        if t == "l" and not isinstance(e.get("lt"), bytes):
            raise encoding.FormatError(f"symlink entry {name!r} has no target")
        if not isinstance(e.get("U", ""), str) or not isinstance(e.get("G", ""), str):
            raise encoding.FormatError(f"tree entry {name!r} has a user or group name that is not a string")
        in_range = (
            0 <= e.get("m", 0) <= 0o7777
            and 0 <= e.get("u", 0) <= _U32
            and 0 <= e.get("g", 0) <= _U32
            and _NS_MIN <= e.get("mt", 0) <= _NS_MAX
            and _NS_MIN <= e.get("ct", 0) <= _NS_MAX
            and 0 <= e.get("sz", 0) <= _NS_MAX
        )
        if not in_range or not e.keys() <= _COMMON or t in "cb":
            _check_rare(e, name, t)  # most entries never get here
    return entries


def _check_rare(e: dict[str, Any], name: bytes, t: str) -> None:
    def bad(what: str) -> encoding.FormatError:
        return encoding.FormatError(f"tree entry {name!r}: {what}")

    if "m" in e and not _int(e["m"], 0, 0o7777):
        raise bad("permission bits out of range")
    for k in ("u", "g"):
        if k in e and not _int(e[k], 0, _U32):
            raise bad(f"{k} is not a 32-bit id")
    for k in ("fl", "ino", "nl", "at"):
        if k in e and type(e[k]) is not int:
            raise bad(f"field {k} is not an integer")
    for k in ("mt", "ct", "at"):
        if k in e and not _int(e[k], _NS_MIN, _NS_MAX):
            raise bad(f"{k} is out of range")
    if "sz" in e and not _int(e["sz"], 0, _NS_MAX):
        raise bad("size out of range")
    if t in "cb":
        dev = e.get("dev")
        if not (isinstance(dev, list) and len(dev) == 2 and all(_int(d, 0, _U32) for d in dev)):
            raise bad("device without [major, minor]")
    if "x" in e:
        x = e["x"]
        if not isinstance(x, dict):
            raise bad("x is not a map")
        for k, v in x.items():
            if not isinstance(k, bytes) or not k or b"\x00" in k or len(k) > 255:
                raise bad(f"bad xattr name {k!r}")
            if k in (_ACL_ACCESS, _ACL_DEFAULT):
                raise bad("an ACL stored as an xattr (it belongs in acl)")
            if not isinstance(v, bytes) or len(v) > 65536:
                raise bad(f"bad value of xattr {k!r}")
    if "acl" in e:
        acl = e["acl"]
        if not isinstance(acl, dict) or not acl or not set(acl) <= {"a", "d"}:
            raise bad("acl is not a map of a and/or d")
        if "d" in acl and t != "d":
            raise bad("a default ACL on a non-directory")
        if t == "l":
            raise bad("an ACL on a symlink")
        for entries in acl.values():
            _check_acl(entries, bad)
    if "fl" in e and (not _int(e["fl"], 0, _U32) or t not in "fd"):
        raise bad("inode flags out of range or on an item that has none")
    if "hole" in e:
        _check_holes(e, bad)
    if "ino" in e or "nl" in e:
        if t == "d":
            raise bad("a hard-linked directory")
        if not _int(e.get("ino"), 0) or not _int(e.get("nl"), 1, _U32):
            raise bad("ino and nl must come together, ino >= 0, nl >= 1")


def _check_acl(entries: Any, bad: Any) -> None:
    if not isinstance(entries, list) or not entries:
        raise bad("ACL is not a list of entries")
    base = []
    for a in entries:
        if not isinstance(a, list) or len(a) not in (2, 4) or a[0] not in _ACL_TAGS or not _int(a[1], 0, 7):
            raise bad(f"bad ACL entry {a!r}")
        if len(a) == 4:
            if a[0] not in ("user", "group") or not _int(a[2], 0, _U32 - 1) or not isinstance(a[3], str):
                raise bad(f"bad named ACL entry {a!r}")
        else:
            base.append(a[0])
    named = len(entries) - len(base)
    if sorted(base) != sorted(["user", "group", "other"] + (["mask"] if "mask" in base or named else [])):
        raise bad("ACL needs one owner, group and other entry, and a mask with named entries")


def _check_holes(e: dict[str, Any], bad: Any) -> None:
    holes = e["hole"]
    size = e.get("sz")
    if e["t"] != "f" or type(size) is not int or not isinstance(holes, list) or len(holes) % 2:
        raise bad("hole map on a non-file, without size, or of odd length")
    pos = 0
    for i in range(0, len(holes), 2):
        off, length = holes[i], holes[i + 1]
        if not _int(off) or not _int(length, 1) or off < pos or off + length > size or (i and off == pos):
            raise bad("holes out of order, overlapping, adjacent or past the end")
        pos = off + length


# ------------------------------------------------------------------------------ walking trees


class TreeCycle(CorruptObject):
    """A tree that lists itself below itself: never followed (FORMAT.md section 14)."""

    def __init__(self, tid: bytes, where: str) -> None:
        super().__init__(
            f"tree {tid.hex()[:16]}",
            f"it appears again below itself at {where} (a cycle: not followed)",
        )


class TreeOverBudget(BunkerError):
    """A walk found more than the snapshot's signed statistics claim: the walk stops."""

    exit_code = ExitCode.INTEGRITY


class TreeBudget:
    """What one walk of a snapshot's trees may visit (FORMAT.md section 14, "Walking trees").

    Every tree the walk reads is passed to :meth:`enter` (with its depth below the walk's first
    tree) and its entries to :meth:`count`. A tree id that is already on the path from the
    walk's first tree down to it is a cycle (:class:`TreeCycle`, a damaged directory); more
    entries, or more bytes of files, than the snapshot's signed ``entries`` and
    ``entry_bytes`` statistics claim stop the walk (:class:`TreeOverBudget`). A snapshot
    written before those statistics existed gets the cycle rule only. One budget per walk:
    :meth:`reset` before walking another path of the same snapshot."""

    def __init__(self, snapshot: str = "", stats: Mapping[str, int] | None = None) -> None:
        stats = stats or {}
        self.snapshot = snapshot
        self.max_entries = stats.get("entries")
        self.max_bytes = stats.get("entry_bytes")
        self.reset()

    def reset(self) -> None:
        self.entries = 0
        self.bytes = 0
        self._path: list[bytes] = []
        self._on_path: set[bytes] = set()

    def enter(self, depth: int, tid: bytes, where: str) -> None:
        """The walk is about to read tree ``tid`` at ``depth`` (0 for its first tree), shown as
        ``where``; raises TreeCycle if it is its own ancestor."""
        path, on_path = self._path, self._on_path
        while len(path) > depth:
            on_path.discard(path.pop())
        if tid in on_path:
            raise TreeCycle(tid, where)
        path.append(tid)
        on_path.add(tid)

    def count(self, entries: list[dict[str, Any]], where: str) -> None:
        """Count a tree's entries (and its files' sizes); raises TreeOverBudget past the claims."""
        self.entries += len(entries)
        self.bytes += sum(e.get("sz", 0) for e in entries if e["t"] == "f")
        over = []
        if self.max_entries is not None and self.entries > self.max_entries:
            over.append(f"{self.max_entries} tree entries, but the walk met {self.entries} by {where}")
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            over.append(f"{self.max_bytes} bytes of files, but the walk met {self.bytes} by {where}")
        if over:
            raise TreeOverBudget(
                f"snapshot {self.snapshot} is damaged: its signed statistics claim "
                + "; and ".join(over)
                + ". Its trees name more than its writer signed for (a forged or corrupted snapshot), so the walk "
                "stopped there",
                "restore, list or export another snapshot (`bunker snapshots` lists them) and run `bunker check "
                "--read-data`; the client that signed this snapshot wrote it so: find out why before trusting its "
                "other snapshots",
            )
