"""Trees: one directory's entries as canonical msgpack, stored as a blob in a metadata pack.

Entries are sorted by raw name bytes and encoded canonically, so an unchanged directory gives
the same bytes, the same chunk id, and is stored once.

Entry keys (absent when not applicable)::

    n  name (bytes)            t  type: f file, d dir, l symlink, c chardev, b blockdev,
    m  permission bits (07777)       p fifo, s socket
    u g  uid gid               U G  user and group names
    mt ct at  mtime, ctime, atime in ns
    sz size                    c  chunk ids (files)     st  subtree id (dirs)
    lt link target (bytes)     x  xattrs {name: value}  acl, fl, hole, dev, ino, nl: later use
"""

from __future__ import annotations

from typing import Any

from bunker import encoding

TYPES = ("f", "d", "l", "c", "b", "p", "s")
MAX_TREE = 256 << 20


def encode_tree(entries: list[dict[str, Any]]) -> bytes:
    """Canonical bytes of a directory's entries (sorted by name, keys sorted).

    Entry values are scalars or lists of scalars; a map-valued field (like ``x``) must already
    have sorted keys. This avoids the generic (recursive, slower) canonicalization on the hot path.
    """
    ordered = [dict(sorted(e.items())) for e in sorted(entries, key=_name)]
    return encoding.pack_ordered({"e": ordered, "v": 1})


def _name(e: dict[str, Any]) -> bytes:
    n: bytes = e["n"]
    return n


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
        if e.get("t") not in TYPES:
            raise encoding.FormatError(f"tree entry {name!r} has an unknown type")
        for k in ("m", "u", "g", "mt", "ct", "sz"):
            if k in e and type(e[k]) is not int:
                raise encoding.FormatError(f"tree entry {name!r} field {k} is not an integer")
        chunks = e.get("c", [])
        if not isinstance(chunks, list) or not all(isinstance(c, bytes) and len(c) == 32 for c in chunks):
            raise encoding.FormatError(f"tree entry {name!r} has bad chunk ids")
        if e["t"] == "d" and not (isinstance(e.get("st"), bytes) and len(e["st"]) == 32):
            raise encoding.FormatError(f"directory entry {name!r} has no subtree")
        if e["t"] == "l" and not isinstance(e.get("lt"), bytes):
            raise encoding.FormatError(f"symlink entry {name!r} has no target")
    return entries
