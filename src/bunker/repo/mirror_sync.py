"""Mirrors: copy a repository's objects to another copy without any key (``bunker sync``).

Every hash-named object is checked against its name before it is written (docs/format.md
section 5: the name is the BLAKE3 of the stored bytes), so a mirror never takes in an altered
object; one that fails is refused and named. ``sessions/`` is never copied (leases belong to the
storage they were written to, and a copied one would hold back GC there). The fixed names
``RECOVERY.md`` and ``FORMAT.md`` are not copied but written anew from the verified config, as
every backup does (docs/format.md section 21).

Copy order keeps the mirror consistent for a reader at every moment (docs/format.md section
17: an object only names objects stored before it): configs and certificates first, then packs,
then index and reference objects, then the records that explain a pack's or a snapshot's absence
(``gc/`` condemnations and moves, ``retired/``), then snapshots. The records come before the
snapshots because a snapshot retired at the source, or one whose packs a repack replaced, is
complete only together with them. A killed sync is resumed by running it again: it lists the
mirror and copies only what is missing there (or there with another size).

``--prune`` deletes from the mirror only what signed records justify: see ``prune_mirror``
(repo/mirror_prune.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bunker import encoding
from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.repo.config import parse_config
from bunker.repo.objects import content_hash
from bunker.repo.repository import Repository
from bunker.storage.backend import Backend
from bunker.storage.prefixes import HASH_NAMED

# the copy phases, in order; each phase ends before the next starts (see the module docstring)
PHASES: tuple[tuple[str, ...], ...] = (
    ("config", "clients", "nodes"),
    ("packs",),
    ("index", "refs"),
    ("gc", "retired"),
    ("snapshots",),
)
# hash-named prefixes no phase names (status/ and policy/) go last
PHASES = (*PHASES, tuple(p for p in HASH_NAMED if not any(p in ph for ph in PHASES)))
# the source is listed so that whatever a listed object names is listed too, even while backups
# write there: an object is listed before the objects it names (which were stored before it)
LIST_ORDER = ("status", "policy", "retired", "snapshots", "refs", "index", "gc", "packs", "nodes", "clients", "config")
assert sorted(LIST_ORDER) == sorted(HASH_NAMED)

DEFAULT_JOBS = 4
EXAMPLES = 5  # names shown per prefix in a report where there may be thousands


@dataclass(frozen=True)
class Refusal:
    """An object of the source that was not copied, and why."""

    name: str
    why: str


@dataclass
class SyncProgress:
    """Counters a display reads while the copy runs (updated under ``lock``)."""

    objects_total: int = 0
    bytes_total: int = 0
    objects_done: int = 0
    bytes_done: int = 0
    phase: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class SyncReport:
    """What one sync did (or would do, with ``dry_run``)."""

    source: str = ""
    target: str = ""
    repo_id: str = ""
    dry_run: bool = False
    copied: dict[str, int] = field(default_factory=dict)  # prefix -> objects copied
    copied_bytes: int = 0
    skipped: int = 0  # already in the mirror with the right size
    repaired: list[str] = field(default_factory=list)  # in the mirror with another size: copied again
    refused: list[Refusal] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)  # listed at the source, gone when read (a prune there)
    extra: dict[str, list[str]] = field(default_factory=dict)  # prefix -> names the mirror has, the source not
    documents: list[str] = field(default_factory=list)  # RECOVERY.md / FORMAT.md written

    @property
    def copied_objects(self) -> int:
        return sum(self.copied.values())

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "target": self.target,
            "repository": self.repo_id,
            "dry_run": self.dry_run,
            "copied": self.copied_objects,
            "copied_per_prefix": dict(sorted(self.copied.items())),
            "copied_bytes": self.copied_bytes,
            "skipped": self.skipped,
            "repaired": self.repaired,
            "refused": [{"object": r.name, "why": r.why} for r in self.refused],
            "vanished": self.vanished,
            "kept": {p: {"count": len(ns), "examples": ns[:EXAMPLES]} for p, ns in sorted(self.extra.items())},
            "documents": self.documents,
        }


def listing(backend: Backend, prefixes: Iterable[str]) -> dict[str, dict[str, int]]:
    """prefix -> {name: size} of every object under ``prefixes`` (in the order given)."""
    return {p: {i.name: i.size for i in backend.list(p + "/")} for p in prefixes}


def open_copy(backend: Backend, what: str) -> Repository:
    """The repository in ``backend`` (``what``: the argument that named it, e.g. SRC), opened
    keyless. This machine's config floor is neither checked nor raised (repo/repository.py): a
    mirror may be behind, and a comparison says so."""
    try:
        return Repository.open(backend, floor=False)
    except BunkerError as exc:
        if exc.exit_code != ExitCode.NO_REPOSITORY:
            raise
        raise BunkerError(
            f"{what} {backend.url} holds no bunker repository: nothing was copied or compared",
            f"check the {what} argument: it names a repository (a path or URL, as --repo takes it)",
            exit_code=ExitCode.NO_REPOSITORY,
        ) from None


def refuse_foreign(dst: Backend, repo_id: str) -> None:
    """Refuse a mirror that holds the config of another repository: mixing two repositories'
    objects in one place would make both unreadable as one."""
    for info in dst.list("config/"):
        try:
            other = parse_config(dst.get(info.name)).repo_id
        except (encoding.FormatError, ObjectMissing):
            continue  # damaged: the sync copies the source's configs beside it; check reports it
        if other != repo_id:
            raise BunkerError(
                f"{dst.url} holds another repository ({other[:16]}…, not {repo_id[:16]}…): nothing was copied",
                "give as the mirror an empty place or a mirror of this same repository",
                exit_code=ExitCode.BAD_REPOSITORY,
            )


class Syncer:
    """Copy what ``dst`` lacks from ``src`` (both opened backends), verified by name."""

    def __init__(
        self,
        src: Backend,
        dst: Backend,
        *,
        jobs: int = DEFAULT_JOBS,
        dry_run: bool = False,
        progress: SyncProgress | None = None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.jobs = max(1, jobs)
        self.dry_run = dry_run
        self.progress = progress or SyncProgress()
        self.report = SyncReport(source=src.url, target=dst.url, dry_run=dry_run)
        self._lock = threading.Lock()
        self.repo: Repository | None = None
        self.src_names: dict[str, dict[str, int]] = {}
        self.dst_names: dict[str, dict[str, int]] = {}

    def run(self) -> SyncReport:
        """Copy phase by phase (PHASES); return the report. Raises BunkerError when the source
        holds no repository or the mirror holds another one."""
        repo = self.repo = open_copy(self.src, "SRC")
        self.report.repo_id = repo.repo_id
        refuse_foreign(self.dst, repo.repo_id)
        self.src_names = listing(self.src, LIST_ORDER)
        self.dst_names = listing(self.dst, HASH_NAMED)
        todo: list[list[tuple[str, int, bool]]] = []  # per phase: (name, size, repair)
        for phase in PHASES:
            items = []
            for p in phase:
                there = self.dst_names[p]
                for name, size in sorted(self.src_names[p].items()):
                    if there.get(name) == size:
                        self.report.skipped += 1
                    else:
                        items.append((name, size, name in there))
            todo.append(items)
        with self.progress.lock:
            self.progress.objects_total = sum(len(t) for t in todo)
            self.progress.bytes_total = sum(s for t in todo for _, s, _ in t)
        for phase, items in zip(PHASES, todo, strict=True):
            with self.progress.lock:
                self.progress.phase = "/ ".join(phase) + "/"
            self._copy_all(items)
            if phase == PHASES[0] and not self.dry_run:
                self._documents(repo)
        for p in HASH_NAMED:
            extra = sorted(set(self.dst_names[p]) - set(self.src_names[p]))
            if extra:
                self.report.extra[p] = extra
        self.report.refused.sort(key=lambda r: r.name)
        self.report.repaired.sort()
        self.report.vanished.sort()
        return self.report

    def _documents(self, repo: Repository) -> None:
        """RECOVERY.md and FORMAT.md of the mirror, from the verified config (never the source's
        copies: they are plaintext anyone with access to the source could have edited)."""
        before = {n: self.dst.stat(n) for n in ("RECOVERY.md", "FORMAT.md")}
        repo.with_backend(self.dst).write_documents()
        self.report.documents = [n for n, info in before.items() if info != self.dst.stat(n)]

    def _copy_all(self, items: list[tuple[str, int, bool]]) -> None:
        if not items:
            return
        if self.dry_run:
            for name, size, repair in items:
                self._done(name, size, repair)
            return
        # each worker holds one object's bytes at a time, so memory stays within jobs x the
        # largest object (a pack: packs.target, 16 MiB by default, docs/format.md section 8)
        pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="bunker-sync")
        try:
            for _ in pool.map(lambda item: self._copy(*item), items):
                pass
        finally:
            # on an error or an interrupt, the objects not started yet are dropped (not copied
            # on before the command can stop); those in progress finish whole
            pool.shutdown(wait=True, cancel_futures=True)

    def _copy(self, name: str, size: int, repair: bool) -> None:
        try:
            data = self.src.get(name)
        except ObjectMissing:
            with self._lock:
                self.report.vanished.append(name)
            return
        leaf = name.split("/", 1)[1]
        if content_hash(data) != leaf:
            why = (
                f"its bytes at the source ({len(data)} bytes) do not match its name: the source's copy is altered, "
                "truncated or rotted, so it was not copied and the mirror keeps what it had; run `bunker check "
                f"--keyless` at {self.src.url}, and put back a good copy of {name} there from another mirror or "
                "backup of the repository"
            )
            with self._lock:
                self.report.refused.append(Refusal(name, why))
            return
        # a repair overwrites the mirror's copy of another size (its bytes cannot match the name);
        # a new object is written only if still absent (another sync may have written it meanwhile)
        self.dst.put(name, data, if_absent=not repair)
        self._done(name, len(data), repair)

    def _done(self, name: str, size: int, repair: bool) -> None:
        prefix = name.split("/", 1)[0]
        with self._lock:
            self.report.copied[prefix] = self.report.copied.get(prefix, 0) + 1
            self.report.copied_bytes += size
            if repair:
                self.report.repaired.append(name)
        with self.progress.lock:
            self.progress.objects_done += 1
            self.progress.bytes_done += size


def sync(
    src: Backend,
    dst: Backend,
    *,
    jobs: int = DEFAULT_JOBS,
    dry_run: bool = False,
    progress: SyncProgress | None = None,
) -> Syncer:
    """Run one sync and return the Syncer (its ``report``, and the listings ``prune_mirror``
    reuses)."""
    syncer = Syncer(src, dst, jobs=jobs, dry_run=dry_run, progress=progress)
    syncer.run()
    return syncer
