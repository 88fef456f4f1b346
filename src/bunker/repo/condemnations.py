"""Condemnation records (``gc/``, magic ``BKGC``; docs/format.md section 15): the packs a prune
condemned, which every new session treats as absent. Apart from gc.py so that a backup, which
only reads them, does not import the prune's machinery (and numpy with it)."""

from __future__ import annotations

from dataclasses import dataclass

from bunker import encoding
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.moves import PackMoves
from bunker.repo.objects import MAGIC_GC, parse_signed
from bunker.repo.records import parse_condemnation
from bunker.repo.repository import Repository


@dataclass(frozen=True)
class Condemnation:
    """A valid ``gc/`` record: its packs, and when the storage stored it."""

    name: str
    packs: tuple[str, ...]
    stored: float


def condemnations(repo: Repository) -> list[Condemnation]:
    """Every ``gc/`` record signed by the master key or a client allowed to prune (others are
    ignored: a forged record could only make clients store data again; check reports it)."""
    out = []
    for info in repo.backend.list("gc/"):
        try:
            data = repo.get_object(info.name)
            if data[:4] != MAGIC_GC:
                continue  # a move record (repo/moves.py)
            repo.verify_pruner(parse_signed(data, MAGIC_GC), "condemn packs")
            packs = parse_condemnation(data)
        except (encoding.FormatError, CorruptObject, ObjectMissing):
            continue
        out.append(Condemnation(info.name, tuple(packs), info.mtime))
    return out


def condemned_packs(repo: Repository) -> set[str]:
    """Packs a new session must treat as absent: those of condemnation records, and those a
    repack replaced."""
    return {p for c in condemnations(repo) for p in c.packs} | PackMoves.load(repo).sources()


@dataclass(frozen=True)
class ListedPacks:
    """What a session that names existing packs (a delivery from the spool) may rely on: the
    packs a listing showed, and those of them a record condemns, which it must treat as absent
    (docs/format.md section 15: a prune may delete them while it runs)."""

    listed: frozenset[str]
    condemned: frozenset[str]

    @classmethod
    def read(cls, repo: Repository) -> ListedPacks:
        """Read after the session's lease: the records first, then the listing. A record removed
        in between had its packs deleted before it went (repo/gc.py), so the listing no longer
        shows them; a record stored after the lease waits for the session."""
        condemned = condemned_packs(repo)
        listed = frozenset(i.name.split("/", 1)[1] for i in repo.backend.list("packs/"))
        return cls(listed, frozenset(condemned & listed))

    def usable(self, pack: str) -> bool:
        """Whether a new object may name ``pack``: it is there and no prune may delete it."""
        return pack in self.listed and pack not in self.condemned
