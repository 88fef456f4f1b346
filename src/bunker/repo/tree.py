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

:func:`check_entry` holds section 14's rules for one entry, for both sides: readers apply it to
every entry they decode, writers (through :func:`fit_entry`) to every entry before they store it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError, CorruptObject, ExitCode

TYPES = ("f", "d", "l", "c", "b", "p", "s")
# The most bytes one tree may encode to (FORMAT.md section 14): a directory of a million entries
# (~140 B each) or a file of 7 million chunks (34 B per chunk id) fits; readers refuse more
# before decompressing, writers never write more.
MAX_TREE = 256 << 20
XATTR_NAME_MAX, XATTR_VALUE_MAX = 255, 65536  # Linux's own limits (XATTR_NAME_MAX, XATTR_SIZE_MAX)
# what a writer stores for a uid or gid that does not fit in 32 bits: Linux's overflow id, the
# one it shows itself for an id it cannot map (nobody, nogroup); never 0, never the owner's
OVERFLOW_ID = 65534
# keys every reader checks on its fast path; an entry with any other key gets the full check
_COMMON = frozenset(("n", "t", "m", "u", "g", "U", "G", "mt", "ct", "sz", "c", "st", "lt"))
_PLAIN_TYPES = ("f", "d", "l", "p", "s")  # devices need dev: the full check
_DOTS = (b".", b"..")
_U32 = (1 << 32) - 1
_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1
_ACL_TAGS = ("user", "group", "mask", "other")
_ACL_ACCESS, _ACL_DEFAULT = b"system.posix_acl_access", b"system.posix_acl_default"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def encode_tree(entries: list[dict[str, Any]]) -> bytes:
    """Canonical bytes of a directory's entries (sorted by name, keys sorted).

    Entry values are scalars or lists of scalars; the only maps below an entry, ``x`` and
    ``acl``, are sorted here. This avoids the generic (recursive, slower) canonicalization on
    the hot path: most entries have neither.
    """
    ordered = [
        _sorted_keys(e if "x" not in e and "acl" not in e else _sort_maps(e)) for e in sorted(entries, key=_name)
    ]
    return encoding.pack_ordered({"e": ordered, "v": 1})


# an entry's keys in the order they were added -> the same keys sorted: a backup makes entries
# of a handful of key sets, each in one order, so most entries are reordered without a sort
_KEY_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _sorted_keys(e: dict[str, Any]) -> dict[str, Any]:
    keys = tuple(e)
    order = _KEY_ORDERS.get(keys)
    if order is None:
        order = tuple(sorted(keys))
        if len(_KEY_ORDERS) < 4096:  # (entries of untrusted trees may bring any key set)
            _KEY_ORDERS[keys] = order
    return {k: e[k] for k in order}


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


def _text_ok(v: Any) -> bool:
    """A user, group or ACL name: text that encodes as UTF-8 (a msgpack str) and has no NUL (the C
    library cannot look such a name up)."""
    if type(v) is not str or "\0" in v:
        return False
    if v.isascii():
        return True
    try:
        v.encode()
    except UnicodeEncodeError:  # a name decoded with surrogateescape from bytes that are not UTF-8
        return False
    return True


def _show(b: bytes) -> str:
    s = b.decode("utf-8", "backslashreplace")
    return s if len(s) <= 60 else s[:57] + "..."


def _time_text(v: Any) -> str:
    """A time in ns as seconds, with its year when that means something."""
    if type(v) is not int:
        return repr(v)
    secs = Decimal(v).scaleb(-9).normalize()
    try:
        year = (_EPOCH + datetime.timedelta(seconds=int(secs))).year
    except OverflowError:
        return f"{secs:g} s"
    return f"{secs:f} s (the year {year})"


def name_problem(n: Any) -> str | None:
    """Why ``n`` cannot name a tree entry (None when it can)."""
    if type(n) is not bytes or not n:
        return f"an empty or missing name {n!r}"
    if b"/" in n or b"\0" in n:
        return f"the name {n!r} has '/' or NUL"
    if n in _DOTS:
        return f"the name {n!r}"
    return None


def xattr_problem(name: Any, value: Any) -> str | None:
    """Why an extended attribute cannot be stored in ``x`` (None when it can)."""
    if type(name) is not bytes or not name or b"\0" in name:
        return f"extended attribute name {name!r} is empty or has NUL"
    if len(name) > XATTR_NAME_MAX:
        return f"extended attribute {_show(name)}: its name is {len(name)} bytes (at most {XATTR_NAME_MAX})"
    if name in (_ACL_ACCESS, _ACL_DEFAULT):
        return f"{name.decode()} as an extended attribute (an ACL belongs in acl)"
    if type(value) is not bytes:
        return f"extended attribute {_show(name)}: its value is not bytes"
    if len(value) > XATTR_VALUE_MAX:
        return f"extended attribute {_show(name)}: its value is {len(value)} bytes (at most {XATTR_VALUE_MAX})"
    return None


def _acl_entry_problem(a: Any) -> str | None:
    if type(a) is not list or len(a) not in (2, 4) or a[0] not in _ACL_TAGS or not _int(a[1], 0, 7):
        return f"bad ACL entry {a!r}"
    if len(a) == 4:
        if a[0] not in ("user", "group") or not _text_ok(a[3]):
            return f"bad named ACL entry {a!r}"
        if not _int(a[2], 0, _U32 - 1):
            return f"ACL entry {a[0]}:{a[3]} has the id {a[2]!r} (a named entry's id is 0 to 2^32 - 2)"
    return None


def _acl_shape_problem(entries: list[Any]) -> str | None:
    """The entries as a whole (each entry already valid)."""
    if not entries:
        return "an empty ACL"
    base = [a[0] for a in entries if len(a) == 2]
    named = len(entries) - len(base)
    if sorted(base) != sorted(["user", "group", "other"] + (["mask"] if "mask" in base or named else [])):
        return "ACL needs one owner, group and other entry, and a mask with named entries"
    return None


def _acl_problems(acl: Any, t: Any) -> list[str]:
    if type(acl) is not dict or not acl or not set(acl) <= {"a", "d"}:
        return ["acl is not a map of a and/or d"]
    if t == "l":
        return ["an ACL on a symlink"]
    out = ["a default ACL on a non-directory"] if "d" in acl and t != "d" else []
    for entries in acl.values():
        if type(entries) is not list:
            out.append("ACL is not a list of entries")
            continue
        bad = [p for p in map(_acl_entry_problem, entries) if p]
        out += bad or [p for p in (_acl_shape_problem(entries),) if p]
    return out


def _holes_problem(e: dict[str, Any]) -> str | None:
    holes, size = e["hole"], e.get("sz")
    if e.get("t") != "f" or type(size) is not int or type(holes) is not list or len(holes) % 2:
        return "hole map on a non-file, without size, or of odd length"
    pos = 0
    for i in range(0, len(holes), 2):
        off, length = holes[i], holes[i + 1]
        if not _int(off) or not _int(length, 1) or off < pos or off + length > size or (i and off == pos):
            return "holes out of order, overlapping, adjacent or past the end"
        pos = off + length
    return None


def _fast_ok(e: dict[str, Any]) -> bool:
    """True for an entry of only the common keys with every value in range: most entries. It
    accepts nothing that entry_problems would refuse; anything else gets the full check. Every
    entry a backup stores and every entry a restore reads comes through here: it is written for
    speed (~1 µs)."""
    get = e.get
    n, t = get("n"), get("t")
    if type(n) is not bytes or not n or b"/" in n or b"\0" in n or n in _DOTS or t not in _PLAIN_TYPES:
        return False
    if not e.keys() <= _COMMON or ("u" in e) != ("g" in e):
        return False
    m, u, g, mt, ct, sz = get("m", 0), get("u", 0), get("g", 0), get("mt", 0), get("ct", 0), get("sz", 0)
    if not (
        type(m) is type(u) is type(g) is type(mt) is type(ct) is type(sz) is int
        and (m | u | g | sz) >= 0  # none negative
        and m <= 0o7777
        and (u | g) <= _U32
        and sz <= _NS_MAX
        and _NS_MIN <= mt <= _NS_MAX
        and _NS_MIN <= ct <= _NS_MAX
    ):
        return False
    un, gn = get("U", ""), get("G", "")
    if not (type(un) is type(gn) is str and un.isascii() and gn.isascii() and "\0" not in un and "\0" not in gn):
        return False
    c = get("c")
    if c is not None:
        if type(c) is not list:
            return False
        for x in c:
            if type(x) is not bytes or len(x) != 32:
                return False
    if t == "d":
        st = get("st")
        return type(st) is bytes and len(st) == 32
    if t == "l":
        lt = get("lt")
        return type(lt) is bytes and bool(lt) and b"\0" not in lt
    return True


def entry_problems(e: dict[str, Any]) -> list[tuple[str, str]]:
    """Every way a tree entry breaks FORMAT.md section 14's rules, as (key, what is wrong)."""
    out: list[tuple[str, str]] = []
    t = e.get("t")
    why = name_problem(e.get("n"))
    if why:
        out.append(("n", why))
    if t not in TYPES:
        out.append(("t", f"unknown type {t!r}"))
    if "m" in e and not _int(e["m"], 0, 0o7777):
        out.append(("m", f"permission bits {e['m']!r} out of range"))
    for k, what in (("u", "uid"), ("g", "gid")):
        if k in e and not _int(e[k], 0, _U32):
            out.append((k, f"{what} {e[k]!r} is not a 32-bit id"))
    if ("u" in e) != ("g" in e):
        out.append(("g" if "u" in e else "u", "uid and gid must come together"))
    for k, what in (("U", "user"), ("G", "group")):
        if k in e and not _text_ok(e[k]):
            out.append((k, f"{what} name {e[k]!r} is not UTF-8 text without NUL"))
    for k, what in (("mt", "mtime"), ("ct", "ctime"), ("at", "atime")):
        if k in e and not _int(e[k], _NS_MIN, _NS_MAX):
            out.append((k, f"{what} {_time_text(e[k])} is outside the times a tree holds (1677-09-21 to 2262-04-11)"))
    if "sz" in e and not _int(e["sz"], 0, _NS_MAX):
        out.append(("sz", f"size {e['sz']!r} out of range (0 to 2^63 - 1)"))
    c = e.get("c", [])
    if type(c) is not list or not all(type(x) is bytes and len(x) == 32 for x in c):
        out.append(("c", "bad chunk ids"))
    if t == "d" and not (type(e.get("st")) is bytes and len(e["st"]) == 32):
        out.append(("st", "a directory without a subtree"))
    if t == "l":
        lt = e.get("lt")
        if type(lt) is not bytes or not lt or b"\0" in lt:
            out.append(("lt", f"symlink target {lt!r} is missing, empty or has NUL"))
    if t in ("c", "b"):
        dev = e.get("dev")
        if not (type(dev) is list and len(dev) == 2 and all(_int(d, 0, _U32) for d in dev)):
            out.append(("dev", f"device numbers {dev!r} are not [major, minor] of 0 to 2^32 - 1"))
    if "x" in e:
        x = e["x"]
        if type(x) is not dict:
            out.append(("x", "x is not a map"))
        else:
            out += [("x", p) for p in (xattr_problem(k, v) for k, v in x.items()) if p]
    if "acl" in e:
        out += [("acl", p) for p in _acl_problems(e["acl"], t)]
    if "fl" in e and (not _int(e["fl"], 0, _U32) or t not in ("f", "d")):
        out.append(("fl", "inode flags out of range or on an item that has none"))
    if "hole" in e:
        why = _holes_problem(e)
        if why:
            out.append(("hole", why))
    if "ino" in e or "nl" in e:
        if t == "d":
            out.append(("ino", "a hard-linked directory"))
        elif not _int(e.get("ino"), 0) or not _int(e.get("nl"), 1, _U32):
            out.append(("ino", "ino and nl must come together, ino >= 0, nl >= 1"))
    return out


def check_entry(e: Any) -> None:
    """Raise FormatError when a tree entry breaks FORMAT.md section 14's rules.

    The one rule for both sides: every reader (restore, ls, export-tar, check --read-data)
    applies it to every entry it decodes, and every writer to every entry before it stores it
    (through :func:`fit_entry`), so a tree that was written always reads back.
    """
    if type(e) is not dict:
        raise encoding.FormatError("tree entry is not a map")
    if _fast_ok(e):
        return
    problems = entry_problems(e)
    if problems:
        raise encoding.FormatError(f"tree entry {e.get('n')!r}: {problems[0][1]}")


def decode_tree(data: bytes) -> list[dict[str, Any]]:
    """Decode and validate a tree (every entry with :func:`check_entry`); raise FormatError on
    anything malformed."""
    m = encoding.expect_map(encoding.unpack(data), "v", "e")
    if m["v"] != 1:
        raise encoding.FormatError(f"tree version {m['v']!r} is not supported")
    entries: list[dict[str, Any]] = encoding.field(m, "e", list)
    for e in entries:
        check_entry(e)
    return entries


# what the entry is without (it cannot be stored at all when one of these breaks the rules)
_ESSENTIAL = frozenset(("n", "t", "sz", "c", "st", "lt", "dev", "hole"))


def fit_entry(e: dict[str, Any]) -> list[str]:
    """Make a writer's entry keep the rules of :func:`check_entry` before it is stored: an id
    that does not fit becomes ``OVERFLOW_ID``, a time out of range the nearest one in range, a
    name that is not text ``""``; an extended attribute, ACL entry, ACL, inode flags or hard-link
    pair that breaks a rule is left out. Changes ``e`` in place and returns what was changed, in
    words (empty when nothing was); raises FormatError when the entry cannot be stored at all
    (its name, type, size, chunks, subtree, symlink target, device numbers or holes).
    """
    if _fast_ok(e):
        return []
    problems = entry_problems(e)
    for key, why in problems:
        if key in _ESSENTIAL:
            raise encoding.FormatError(why)
    changes: list[str] = []
    for key in dict.fromkeys(k for k, _ in problems):
        whys = [w for k, w in problems if k == key]
        if key in ("u", "g"):
            e[key] = OVERFLOW_ID
            changes += [f"{w}: stored as {OVERFLOW_ID}" for w in whys]
        elif key in ("mt", "ct", "at") and type(e[key]) is int:
            e[key] = min(max(e[key], _NS_MIN), _NS_MAX)
            changes += [f"{w}: stored as the nearest such time" for w in whys]
        elif key in ("U", "G"):
            e[key] = ""
            changes += [f"{w}: left out" for w in whys]
        elif key == "x" and type(e["x"]) is dict:
            e["x"] = {k: v for k, v in e["x"].items() if xattr_problem(k, v) is None}
            if not e["x"]:
                del e["x"]
            changes += [f"{w}: left out" for w in whys]
        elif key == "acl":
            changes += _fit_acl(e)
        else:
            e.pop(key, None)
            if key == "ino":
                e.pop("nl", None)
            changes += [f"{w}: left out" for w in whys]
    check_entry(e)  # what readers will apply; never fails after the changes above
    return changes


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

def _fit_acl(e: dict[str, Any]) -> list[str]:
    acl, t = e.pop("acl"), e.get("t")
    if type(acl) is not dict or not acl or t == "l":
        return [f"{p}: left out" for p in _acl_problems(acl, t)]
    changes, kept = [], {}
    for key, entries in acl.items():
        what = "default ACL" if key == "d" else "ACL"
        if key not in ("a", "d") or (key == "d" and t != "d") or type(entries) is not list:
            changes.append(f"{what} {key!r} not valid for this item: left out")
            continue
        good = [a for a in entries if _acl_entry_problem(a) is None]
        changes += [f"{p}: left out" for p in (_acl_entry_problem(a) for a in entries) if p]
        shape = _acl_shape_problem(good)
        if shape:
            changes.append(f"{shape}: the {what} is left out")
        else:
            kept[key] = good
    if kept:
        e["acl"] = kept
    return changes
