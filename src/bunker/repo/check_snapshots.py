"""`bunker check`'s snapshot part: trust, chains, pack and chunk sets, witnesses (docs/format.md
section 18).

Each snapshot must verify on its own and lie on a trusted chain (repo/trust.py); with the master
key its body must open under its envelope's binding. Per certificate the sequence numbers run
without gaps or forks; two envelopes holding one run mean a copy; every pack of a snapshot's
pack set (resolved through repack move records) must exist, and with a key every chunk of its
chunk set must be indexed in those packs. The chain heads this machine remembers are witnesses
that the newest snapshots were not withheld.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, CorruptObject, ObjectMissing, StorageError
from bunker.repo import refs
from bunker.repo.check_report import CheckReport, utc
from bunker.repo.moves import PackMoves
from bunker.repo.repository import Repository
from bunker.repo.retention import FUTURE_TOLERANCE, signed_time_in_future
from bunker.repo.snapshot import ParsedSnapshot, open_body, parse_snapshot
from bunker.repo.trust import chain_trust

Chains = dict[str, dict[int, tuple[str, str]]]  # cert -> seq -> (snapshot, prev)


@dataclass
class Fresh:
    """The repository as listed again at the end of a check (repo/check.py ``_settle``)."""

    packs: set[str]  # packs/<hex>
    locations: dict[bytes, str]
    also_in: dict[bytes, set[str]]
    retired_names: list[str]
    vanished: set[str]  # bare pack names listed at the start and gone now


class SnapshotChecks:
    """One check of every snapshot, reporting into ``report``."""

    def __init__(
        self,
        repo: Repository,
        report: CheckReport,
        get: Callable[[str], bytes | None],
        secrets_for: Callable[[str], PutSecrets | None],
        master: MasterKey | None,
        heads: list[tuple[str, int, str]],
        stored: dict[str, float],
    ) -> None:
        self.repo, self.report, self.get, self.secrets_for = repo, report, get, secrets_for
        self.master, self.heads, self.stored = master, heads, stored

    def run(
        self,
        names: list[str],
        retired_names: list[str],
        packs: set[str],
        locations: dict[bytes, str],
        also_in: dict[bytes, set[str]],
        settle: Callable[[], Fresh] | None = None,
    ) -> None:
        """``packs``: the listed pack names; ``locations``: chunk id -> pack of the index
        entries that agree with the trailers; ``also_in``: further packs holding a chunk.
        ``settle``: the repository as listed again; what a snapshot misses is reported only if
        it still misses it then (a prune beside the check deletes what no snapshot needs)."""
        retired = self._retired(retired_names)
        parsed = self._verified(names)
        # a revoked client's snapshots off the chain its revocation names, and format-1 snapshots
        # off the chains `bunker migrate` recorded (repo/trust.py)
        off_chain = chain_trust({n: s.env for n, s in parsed.items()}, self.repo.revoked, self.repo.chain.legacy)
        chains: Chains = defaultdict(dict)
        runs: dict[tuple[str, int], str] = {}  # (session, checkpoint) -> the snapshot holding it
        sets = _Sets(self, packs, locations, also_in)
        missing: dict[str, list[str]] = {}  # snapshot -> what its sets miss, reported after settling
        live = []
        for n, snap in parsed.items():
            if n in off_chain:
                # format-1 leftovers (e.g. the branch of a fork the administrator did not pick) are
                # known since the migration; anything else off a trusted chain is a forgery or a
                # revoked key still at work
                self.report.add(n, f"snapshot not trusted: {off_chain[n]}", "warn" if snap.env.version < 2 else "err")
                continue
            self._one(n, snap, chains, runs)
            if n not in retired:
                live.append(n)
                found = sets.check(n, snap)
                if found:
                    missing[n] = found
        if settle is not None:
            fresh = settle()
            retired |= self._retired(fresh.retired_names, quiet=set(retired_names))
            again = _Sets(self, fresh.packs, fresh.locations, fresh.also_in, count=False)
            for n in live:
                if n in retired:
                    missing.pop(n, None)  # forgotten while the check ran
                elif n in missing or (fresh.vanished and again.needs_any(parsed[n], fresh.vanished)):
                    missing[n] = again.check(n, parsed[n])
        for n, problems in missing.items():
            for problem in problems:
                self.report.add(n, problem)
        self._chains(chains)
        self._witnesses(chains)

    def _retired(self, names: list[str], quiet: set[str] | None = None) -> set[str]:
        """The snapshots the retirement records ``names`` retire (records in ``quiet`` were
        reported already)."""
        out: set[str] = set()
        for n in names:
            data = self.get(n)
            if data is None:
                continue
            try:
                out.add(self.repo.verify_retirement(data))
            except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
                if quiet is None or n not in quiet:
                    self.report.add(
                        n, f"retirement record not valid: {exc}; it is ignored (the snapshot it names stays listed)"
                    )
        return out

    def _verified(self, names: list[str]) -> dict[str, ParsedSnapshot]:
        """The snapshots that parse and verify on their own (others are reported)."""
        out = {}
        for n in names:
            data = self.get(n)
            if data is None:
                continue
            try:
                snap = parse_snapshot(data)
            except encoding.FormatError as exc:
                self.report.add(n, f"malformed snapshot: {exc}")
                continue
            trusted, problem = self.repo.verify_snapshot_signature(snap)
            if not trusted:
                self.report.add(n, f"snapshot not trusted: {problem}")
                continue
            out[n] = snap
        return out

    def _one(self, n: str, snap: ParsedSnapshot, chains: Chains, runs: dict[tuple[str, int], str]) -> None:
        r, e = self.report, snap.env
        if self.master is not None:
            try:
                open_body(snap, self.master.data_private)  # sealed to this envelope's writer and session?
            except encoding.FormatError as exc:
                r.add(n, f"{exc}; `restore` refuses it")
        if e.session:
            first = runs.setdefault((e.session, e.counter), n)
            if first != n:
                # keylessly the copy cannot be told from the original: name the one stored later
                older, newer = sorted((first, n), key=lambda x: (self.stored.get(x, 0.0), x))
                r.add(newer, f"it holds the same run (session {e.session}) as {older}: it was copied")
        stored = self.stored.get(n, 0.0)
        if signed_time_in_future(e.time, stored):
            r.add(
                n,
                f"its signed time {utc(e.time)} is more than {FUTURE_TOLERANCE // 60} minutes after the storage "
                f"stored it ({utc(stored)}): client {e.client!r} has a wrong clock or the time is forged. "
                "`bunker forget` uses the storage's time for it; fix that machine's clock (NTP)",
                "warn",
            )
        if e.seq in chains[e.cert]:
            r.add(n, f"client {e.client!r} has two snapshots with sequence #{e.seq} (fork)")
        chains[e.cert][e.seq] = (n, e.prev)

    def _chains(self, chains: Chains) -> None:
        for cert_name, chain in chains.items():
            client = self.repo.certificate(cert_name).client
            expected = 1
            for s in sorted(chain):
                name, prev = chain[s]
                if s > expected:
                    self.report.add(
                        name, f"client {client!r}: snapshots #{expected}..#{s - 1} are missing (deleted or withheld)"
                    )
                expected = s + 1
                if s > 1 and (s - 1) in chain and chain[s - 1][0] != prev:
                    self.report.add(name, f"client {client!r}: snapshot #{s} does not link to #{s - 1} (chain altered)")

    def _witnesses(self, chains: Chains) -> None:
        for cert_name, seq, head_name in self.heads:
            have = chains.get(cert_name, {})
            newest = max(have) if have else 0
            try:
                who = f"client {self.repo.certificate(cert_name).client!r}"
            except (CorruptObject, ObjectMissing):
                who = f"the client of {cert_name}"
            if seq > newest:
                self.report.add(
                    head_name,
                    f"{who} wrote snapshot #{seq} (this machine remembers it) but the repository's newest is "
                    f"#{newest}: snapshots were deleted or the repository was rolled back",
                )
            elif seq in have and have[seq][0] != head_name:
                self.report.add(head_name, f"{who}'s snapshot #{seq} was replaced by another object")


class _Sets:
    """The pack set and chunk set of each snapshot against what is stored."""

    def __init__(
        self,
        checks: SnapshotChecks,
        packs: set[str],
        locations: dict[bytes, str],
        also_in: dict[bytes, set[str]],
        count: bool = True,
    ) -> None:
        self.c, self.packs, self.locations, self.also_in = checks, packs, locations, also_in
        self.count = count  # the second look (after settling) does not count chunks again
        self.existing = {p.split("/", 1)[1] for p in packs}
        self.moves = PackMoves.load(checks.repo)  # a repacked pack's blobs are in the packs it moved to

    def fetch(self, name: str) -> bytes:
        data = self.c.get(name)
        if data is None:
            raise ObjectMissing(name)
        return data

    def needs_any(self, snap: ParsedSnapshot, packs: set[str]) -> bool:
        """True if the resolved pack set of ``snap`` names any of ``packs`` (or cannot be read)."""
        try:
            return bool(self.moves.resolve(refs.read_set(snap.env.packset, self.fetch)) & packs)
        except StorageError:
            raise
        except (BunkerError, encoding.FormatError):
            return True

    def check(self, n: str, snap: ParsedSnapshot) -> list[str]:
        """What snapshot ``n`` misses of its pack set and chunk set ([] when nothing)."""
        e = snap.env
        out: list[str] = []
        try:
            pset = refs.read_set(e.packset, self.fetch)
        except StorageError:
            raise
        except (BunkerError, encoding.FormatError) as exc:
            return [f"pack set {e.packset} unreadable: {exc}"]
        missing = [p for p in pset if f"packs/{p}" not in self.packs and not self.moves.covered(p, self.existing)]
        resolved = set(self.moves.resolve(pset))
        if missing:
            out.append(f"needs {len(missing)} pack(s) that are missing, e.g. packs/{missing[0]}")
        secrets = self.c.secrets_for(e.domain)
        try:
            top = refs.parse_refs(self.fetch(e.chunkset))
            if top.get("kind") != "chunkset" or top.get("domain") != e.domain:
                # its chunks are another domain's: an envelope wrapped around data that is not its client's
                return [*out, f"its chunk set {e.chunkset} is not a chunk set of its dedup domain {e.domain}"]
            if secrets is None:
                for part in top.get("parts", []):  # type: ignore[attr-defined]
                    self.fetch(part)
        except StorageError:
            raise
        except (BunkerError, encoding.FormatError) as exc:
            return [*out, f"chunk set {e.chunkset} incomplete: {exc}"]
        if secrets is None:
            return out
        try:
            cset = refs.read_set(e.chunkset, self.fetch, secrets)
        except StorageError:
            raise
        except (BunkerError, encoding.FormatError) as exc:
            return [*out, f"chunk set {e.chunkset} unreadable: {exc}"]
        lost = [
            c for c in cset if self.locations.get(c) not in resolved and not self.also_in.get(c, set()) & resolved
        ]
        if lost and (e.complete or len(lost) > e.stats.get("chunks_lost", 0)):
            # an incomplete snapshot declares how many chunks it lacks (forward could not
            # store them again): those are known, not damage
            out.append(
                f"{len(lost)} of its {len(cset)} chunks are not indexed in its packs (e.g. {lost[0].hex()[:16]}); "
                "if the packs are intact, `bunker index rebuild` re-indexes them from their trailers",
            )
        if self.count:
            self.c.report.counts["snapshot_chunks"] += len(cset)
        return out
