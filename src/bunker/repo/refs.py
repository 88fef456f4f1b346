"""Reference objects (``refs/<hash>``): a snapshot's pack set and chunk set.

A set is a sorted list split into parts at content-defined boundaries (an item whose hash has
its low 11 bits zero ends a part), so an unchanged or slightly changed set re-uses almost all
parts: an unchanged snapshot costs almost nothing. The top object lists its parts.

Pack sets are plaintext (the keyless check needs them). Chunk-set parts are encrypted
deterministically (SIV-style, key from S_index) so equal parts stay equal objects.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import blake3

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.derive import PutSecrets, keyed_hash
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.location_arrays import ID
from bunker.repo.objects import MAGIC_REFS, check_ref, name_for

KIND_PACKSET = "packset"
KIND_CHUNKSET = "chunkset"
_BOUNDARY_MASK = (1 << 11) - 1


def _chunkset_key(secrets: PutSecrets) -> bytes:
    return keyed_hash(secrets.index_key, b"chunkset")


def _split(items: Sequence[bytes]) -> Iterator[list[bytes]]:
    """The parts of a set's sorted items: a part ends after an item whose hash has its low 11
    bits zero (content-defined, so one added item changes one part)."""
    return _split_blocks([items])


def _split_blocks(blocks: Iterable[Sequence[bytes]]) -> Iterator[list[bytes]]:
    """:func:`_split` of the items given in consecutive blocks (a part may span blocks): the
    ends are found in one pass over a block, and the parts are cut out of it by slices."""
    cur: list[bytes] = []
    any_part = False
    b3 = blake3.blake3
    low = _BOUNDARY_MASK >> 8
    for block in blocks:
        start = 0
        # the low 11 bits of the little-endian hash: its first byte and 3 bits of the second
        for end in [i + 1 for i, it in enumerate(block) if not (d := b3(it).digest(2))[0] and not d[1] & low]:
            cur.extend(block[start:end])
            yield cur
            any_part = True
            cur = []
            start = end
        cur.extend(block[start:])
    if cur or not any_part:
        yield cur


def _obj(body: dict[str, object]) -> bytes:
    return MAGIC_REFS + encoding.pack(body)


def build_packset(pack_names: Iterable[str]) -> dict[str, bytes]:
    """Objects (name -> bytes) of a pack set; the top object's name is ``top_name(result)``."""
    items = sorted(set(pack_names))
    out: dict[str, bytes] = {}
    parts = []
    for part in _split([p.encode() for p in items]):
        data = _obj({"kind": KIND_PACKSET + "-part", "items": [p.decode() for p in part]})
        name = name_for("refs", data)
        out[name] = data
        parts.append(name)
    top = _obj({"kind": KIND_PACKSET, "parts": parts, "count": len(items)})
    out[name_for("refs", top)] = top
    out["top"] = top
    return out


@dataclass(frozen=True)
class PartLayout:
    """A built chunk set's parts: the last id of each, a digest of each one's ids (blake3 of
    them end to end, 16 bytes) and its object name. With it, a set that differs in a few ids
    is built again without cutting and encrypting the parts it shares (:func:`rebuild_chunkset`)."""

    ends: list[bytes]
    digests: list[bytes]
    names: list[str]


def build_chunkset(chunk_ids: Iterable[bytes] | ChunkIdSet, secrets: PutSecrets) -> dict[str, bytes]:
    """Objects of a chunk set (see :func:`build_packset`). A :class:`ChunkIdSet` is read in
    order without a bytes object per id held at once (10 M ids)."""
    return build_chunkset_layout(chunk_ids, secrets)[0]


def build_chunkset_layout(
    chunk_ids: Iterable[bytes] | ChunkIdSet, secrets: PutSecrets
) -> tuple[dict[str, bytes], PartLayout]:
    """:func:`build_chunkset` and the layout of its parts."""
    if isinstance(chunk_ids, ChunkIdSet):
        count = len(chunk_ids)
        blocks: Iterable[Sequence[bytes]] = chunk_ids.blocks()
    else:
        listed = sorted(set(chunk_ids))
        count, blocks = len(listed), [listed]
    key = _chunkset_key(secrets)
    out: dict[str, bytes] = {}
    layout = PartLayout([], [], [])
    for part in _split_blocks(blocks):
        _add_part(out, layout, part, key, secrets)
    _add_top(out, layout, count, secrets)
    return out, layout


def _add_part(out: dict[str, bytes], layout: PartLayout, part: list[bytes], key: bytes, secrets: PutSecrets) -> None:
    plain = b"".join(part)
    ct = aead.encrypt_deterministic(key, plain, secrets.domain_id.encode())
    data = _obj({"kind": KIND_CHUNKSET + "-part", "domain": secrets.domain_id, "ct": ct})
    name = name_for("refs", data)
    out[name] = data
    layout.names.append(name)
    layout.ends.append(part[-1] if part else b"")
    layout.digests.append(blake3.blake3(plain).digest(16))


def _add_top(out: dict[str, bytes], layout: PartLayout, count: int, secrets: PutSecrets) -> None:
    top = _obj({"kind": KIND_CHUNKSET, "domain": secrets.domain_id, "parts": layout.names, "count": count})
    out[name_for("refs", top)] = top
    out["top"] = top


def rebuild_chunkset(
    chunk_ids: ChunkIdSet, secrets: PutSecrets, old: PartLayout
) -> tuple[dict[str, bytes], PartLayout, list[str]] | None:
    """The chunk set of ``chunk_ids`` built as :func:`build_chunkset` builds it (the same parts,
    the same names), re-using the parts of an earlier set of ``old`` layout that it shares:
    (the objects of the new parts and the top, the layout, the names of the parts re-used: they
    must be in the repository). None for an empty set.

    Why it is the same set: a part ends after each id whose hash is a boundary (a property of the
    id alone), and at the set's end. An old part whose ids are all still here (its digest over
    the ids between the previous part's last id and its own matches) and whose previous part's
    last id is here too (the boundary it starts after) is cut the same way again; the ids
    between such parts are cut afresh. The last part is kept only when no id follows it."""
    ids = chunk_ids.sorted_ids()
    buf = b"".join(ids) if isinstance(ids, tuple) else ids.tobytes()
    n = len(buf) // ID
    if not n or not old.names or not len(old.names) == len(old.ends) == len(old.digests):
        return None

    def at(k: int) -> bytes:
        return buf[k * ID : (k + 1) * ID]

    pos = []  # where each old part's last id is in the new set (-1: not there)
    for end in old.ends:
        k = bisect.bisect_left(range(n), end, key=at) if len(end) == ID else n
        pos.append(k if k < n and at(k) == end else -1)
    m = len(old.names)
    clean = []
    for i in range(m):
        start = pos[i - 1] + 1 if i else 0
        stop = pos[i] + 1
        kept = stop > 0 and (i == 0 or pos[i - 1] >= 0) and (i < m - 1 or stop == n)
        clean.append(kept and blake3.blake3(buf[start * ID : stop * ID]).digest(16) == old.digests[i])
    key = _chunkset_key(secrets)
    out: dict[str, bytes] = {}
    layout = PartLayout([], [], [])
    reused: list[str] = []
    start, i = 0, 0
    while i < m:
        if clean[i]:
            layout.names.append(old.names[i])
            layout.ends.append(old.ends[i])
            layout.digests.append(old.digests[i])
            reused.append(old.names[i])
            start, i = pos[i] + 1, i + 1
            continue
        j = i
        while j < m and not clean[j]:
            j += 1
        stop = pos[j - 1] + 1 if j < m else n  # a clean part after: its start is found
        if stop > start:
            items = buf[start * ID : stop * ID]
            for part in _split([items[k : k + ID] for k in range(0, len(items), ID)]):
                _add_part(out, layout, part, key, secrets)
        start, i = stop, j
    _add_top(out, layout, n, secrets)
    return out, layout, reused


def top_name(objects: dict[str, bytes]) -> str:
    """Name of the top object of a set built by build_packset/build_chunkset."""
    return name_for("refs", objects["top"])


def parse_refs(data: bytes) -> dict[str, object]:
    """Decode a reference object (top or part) and validate its shape."""
    if data[:4] != MAGIC_REFS:
        raise encoding.FormatError("not a reference object")
    m = encoding.expect_map(encoding.unpack(data[4:]), "kind")
    kind = m["kind"]
    if kind in (KIND_PACKSET, KIND_CHUNKSET):
        for p in encoding.field(m, "parts", list):
            check_ref(p, "refs")
        encoding.field(m, "count", int)
    elif kind == KIND_PACKSET + "-part":
        for p in encoding.field(m, "items", list):
            check_ref(f"packs/{p}", "packs")
    elif kind == KIND_CHUNKSET + "-part":
        encoding.field_bytes(m, "ct")
    else:
        raise encoding.FormatError(f"unknown reference kind {kind!r}")
    return m


def read_set(top: str, fetch: Callable[[str], bytes], secrets: PutSecrets | None = None) -> list[Any]:
    """Read a whole set: pack names (hex) for a pack set, chunk ids for a chunk set (needs S)."""
    m = parse_refs(fetch(top))
    out: list[Any] = []
    for part_name in m["parts"]:  # type: ignore[attr-defined]
        if m["kind"] == KIND_CHUNKSET:
            if secrets is None:
                raise encoding.FormatError("a chunk set needs the put key")
            plain = read_chunkset_part(part_name, fetch, secrets)
            out.extend(plain[i : i + 32] for i in range(0, len(plain), 32))
            continue
        part = parse_refs(fetch(part_name))
        if part["kind"] != KIND_PACKSET + "-part":
            raise encoding.FormatError(f"part {part_name} does not belong to a {m['kind']}")
        out.extend(part["items"])  # type: ignore[arg-type]
    return out


def chunkset_parts(top: str, fetch: Callable[[str], bytes]) -> list[str]:
    """The names of a chunk set's parts (read each with :func:`read_chunkset_part`)."""
    m = parse_refs(fetch(top))
    if m["kind"] != KIND_CHUNKSET:
        raise encoding.FormatError(f"{top} is not a chunk set")
    parts: list[str] = m["parts"]  # type: ignore[assignment]
    return parts


def read_chunkset_part(name: str, fetch: Callable[[str], bytes], secrets: PutSecrets) -> bytes:
    """The chunk ids of one chunk set part, 32 bytes each, end to end."""
    part = parse_refs(fetch(name))
    if part["kind"] != KIND_CHUNKSET + "-part":
        raise encoding.FormatError(f"part {name} does not belong to a {KIND_CHUNKSET}")
    try:
        plain = aead.decrypt(_chunkset_key(secrets), part["ct"], secrets.domain_id.encode())  # type: ignore[arg-type]
    except aead.DecryptionFailed:
        raise encoding.FormatError(f"chunk set part {name} does not decrypt") from None
    if len(plain) % 32:
        raise encoding.FormatError(f"chunk set part {name} has a bad length")
    return plain
