"""Move records: which packs a repack replaced, and by which (docs/format.md section 15).

A snapshot's pack set is signed and never changes, so after prune repacks a pack that is mostly
garbage, the snapshots that name the old pack still name it. A move record (``gc/<hash>``, magic
``BKMV``, signed by a prune-capable certificate or the master key) says: the live blobs of pack
``P`` are now in packs ``N1, N2, ...``. Everything that reads a pack set resolves it through the
move records (marking, check, restore), so it finds the chunks in their new packs.

A move record also condemns its old packs: a new session treats them as absent, and a later
prune deletes them under the same rules as a condemnation (grace period, no older session
alive), and only once every chunk that a snapshot naming them needs is in the new packs. The
record stays while a live snapshot's pack set still names one of its old packs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.sign import SigningKey
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.objects import MAGIC_MOVED, check_ref, make_signed, parse_signed
from bunker.repo.repository import Repository


def make_move_record(moves: dict[str, list[str]], signer: SigningKey, cert: str) -> bytes:
    """A signed record: for each old pack, the packs that now hold its live blobs."""
    body = {"moves": [[old, sorted(new)] for old, new in sorted(moves.items())], "time": time.time()}
    return make_signed(MAGIC_MOVED, body, signer, cert)


def _pack_name(value: object) -> str:
    return check_ref(f"packs/{value}" if isinstance(value, str) else value, "packs")[6:]


def parse_move_record(data: bytes) -> dict[str, tuple[str, ...]]:
    """The moves of a record (old pack -> new packs); the caller verifies the signer."""
    obj = parse_signed(data, MAGIC_MOVED)
    out: dict[str, tuple[str, ...]] = {}
    for item in encoding.field(obj.body, "moves", list):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
            raise encoding.FormatError("bad move entry")
        old = _pack_name(item[0])
        if old in out:
            raise encoding.FormatError(f"pack {old[:12]} is moved twice in one record")
        out[old] = tuple(_pack_name(n) for n in item[1])
    return out


@dataclass(frozen=True)
class MoveRecord:
    """A valid move record and when the storage stored it."""

    name: str
    moves: dict[str, tuple[str, ...]]
    stored: float


def move_records(repo: Repository) -> list[MoveRecord]:
    """Every valid move record (signed by the master key or a non-revoked prune-capable client;
    others are ignored: `bunker check` reports them)."""
    out = []
    for info in repo.backend.list("gc/"):
        try:
            data = repo.get_object(info.name)
            if data[:4] != MAGIC_MOVED:
                continue  # a condemnation record
            repo.verify_pruner(parse_signed(data, MAGIC_MOVED), "move packs")
            moves = parse_move_record(data)
        except (encoding.FormatError, CorruptObject, ObjectMissing):
            continue
        out.append(MoveRecord(info.name, moves, info.mtime))
    return out


class PackMoves:
    """All valid move records of a repository, resolved: where the live blobs of a pack went."""

    def __init__(self, records: Iterable[MoveRecord]) -> None:
        self.records = list(records)
        self.targets: dict[str, set[str]] = {}
        for rec in self.records:
            for old, new in rec.moves.items():
                self.targets.setdefault(old, set()).update(new)

    @classmethod
    def load(cls, repo: Repository) -> PackMoves:
        return cls(move_records(repo))

    def sources(self) -> set[str]:
        """Every pack that a repack replaced (condemned: new sessions treat it as absent)."""
        return set(self.targets)

    def resolve(self, packs: Iterable[str]) -> set[str]:
        """``packs`` plus every pack their live blobs were moved to, transitively."""
        out = set(packs)
        todo = [p for p in out if p in self.targets]
        while todo:
            for n in self.targets.get(todo.pop(), ()):
                if n not in out:
                    out.add(n)
                    if n in self.targets:
                        todo.append(n)
        return out

    def covered(self, pack: str, existing: set[str]) -> bool:
        """True if a missing ``pack`` was repacked and every pack its blobs went to exists (or was
        itself repacked and is covered in turn)."""
        seen: set[str] = set()
        todo = [pack]
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            if p in existing and p != pack:
                continue
            if p not in self.targets:
                return False
            todo.extend(self.targets[p])
        return True
