"""`bunker check`'s snapshot part: trust, chains, pack and chunk sets, witnesses (docs/format.md
section 18).

Each snapshot must verify on its own and lie on a trusted chain (repo/trust.py); with the master
key its body must open under its envelope's binding. Per certificate the sequence numbers run
without gaps or forks; two envelopes holding one run mean a copy; every pack of a snapshot's
pack set (resolved through repack move records) must exist, and with a key every chunk of its
chunk set must be indexed in those packs. The chain heads this machine remembers, and those nodes
saw the repository of record hold (repo/witnesses.py), are witnesses that the newest snapshots
were not withheld; this machine's snapshots that wait in its local spool (the repository was
unreachable or refused writes) are pending, not withheld: a note.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.crypto.derive import PutSecrets
from bunker.crypto.keyfile import MasterKey
from bunker.errors import BunkerError, CorruptObject, ObjectMissing, StorageError
from bunker.repo import refs
from bunker.repo.agreed_copies import AgreedCopies
from bunker.repo.check_report import CheckReport, utc
from bunker.repo.holding_records import InTransit, holding_records
from bunker.repo.moves import PackMoves
from bunker.repo.objects import MAGIC_UNRETIRED
from bunker.repo.other_secret import NEXT_STEP, certificate_domains, snapshot_with_other_secret
from bunker.repo.records import Retirements
from bunker.repo.repository import Repository
from bunker.repo.retention import FUTURE_TOLERANCE, signed_time_in_future
from bunker.repo.snapshot import Envelope, ParsedSnapshot, open_body, parse_snapshot, path_set_id
from bunker.repo.trust import chain_trust
from bunker.repo.witnesses import Chains, Witness, judge


@dataclass(frozen=True)
class Pending:
    """This machine's snapshots that wait in its local spool (``where``) for `bunker forward`:
    written while the repository was unreachable or refused writes, so not in it yet."""

    where: str = ""
    chains: Chains = field(default_factory=dict)


@dataclass
class Fresh:
    """The repository as listed again at the end of a check (repo/check.py ``_settle``)."""

    packs: set[str]  # packs/<hex>
    agreed: AgreedCopies
    retired_names: list[str]
    vanished: set[str]  # bare pack names listed at the start and gone now


Found = tuple[str, str]  # (problem, level) as CheckReport.add takes them
# what a snapshot's sets miss: (problem, cause) as CheckReport.add takes them
Missing = list[tuple[str, str]]


class SnapshotChecks:
    """One check of every snapshot, reporting into ``report``."""

    def __init__(
        self,
        repo: Repository,
        report: CheckReport,
        get: Callable[[str], bytes | None],
        secrets_for: Callable[[str], PutSecrets | None],
        master: MasterKey | None,
        witnesses: list[Witness],
        stored: dict[str, float],
        pending: Pending | None = None,
    ) -> None:
        self.repo, self.report, self.get, self.secrets_for = repo, report, get, secrets_for
        self.master, self.witnesses, self.stored = master, witnesses, stored
        self.pending = pending or Pending()
        self._transit: InTransit | None = None  # nodes' holding records, read at the first gap

    def run(
        self,
        names: list[str],
        retired_names: list[str],
        packs: set[str],
        agreed: AgreedCopies,
        other_secret: Collection[str] = (),
        settle: Callable[[], Fresh] | None = None,
    ) -> dict[str, list[str]]:
        """``packs``: the listed pack names; ``agreed``: where the index entries that agree
        with the trailers place each chunk; ``other_secret``: packs written with another secret (repo/other_secret.py).
        ``settle``: the repository as listed again; what a snapshot misses is reported only if
        it still misses it then (a prune beside the check deletes what no snapshot needs).
        Returns which trusted, not retired snapshots name each of the ``other_secret`` packs."""
        retired = self._retired(retired_names)
        parsed, damaged_key = self._verified(names)
        # a revoked client's snapshots off the chain its revocation names, and format-1 snapshots
        # off the chains `bunker migrate` recorded (repo/trust.py)
        off_chain = chain_trust({n: s.env for n, s in parsed.items()}, self.repo.revoked, self.repo.chain.legacy)
        chains: Chains = defaultdict(dict)
        runs: dict[tuple[str, int], str] = {}  # (session, checkpoint) -> the snapshot holding it
        sets = _Sets(self, packs, agreed, other_secret)
        missing: dict[str, Missing] = {}  # snapshot -> what its sets miss, reported after settling
        live = []
        for n, snap in damaged_key.items():
            e = snap.env
            if n not in retired:
                self.report.add(
                    n,
                    f"snapshot #{e.seq} of client {e.client!r} was written with another secret: its signature holds, "
                    f"but its dedup domain {e.domain} is no certificate's, so the client's put key was damaged when "
                    f"it wrote it; nobody can restore it; {NEXT_STEP}",
                    cause="other-secret",
                )
            # an authentic link of its client's chain all the same: no gap where it stands
            if e.seq in chains[e.cert]:
                self.report.add(n, f"client {e.client!r} has two snapshots with sequence #{e.seq} (fork)")
            chains[e.cert][e.seq] = (n, e.prev)
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
            again = _Sets(self, fresh.packs, fresh.agreed, other_secret, count=False)
            for n in live:
                if n in retired:
                    missing.pop(n, None)  # forgotten while the check ran
                elif n in missing or (fresh.vanished and again.needs_any(parsed[n], fresh.vanished)):
                    missing[n] = again.check(n, parsed[n])
        for n, problems in missing.items():
            for problem, cause in problems:
                self.report.add(n, problem, cause=cause)
        self._chains(chains)
        judge(self.repo, self.report, chains, self.witnesses, retired, self._waiting, self.pending.where, runs)
        return sets.naming

    def _retired(self, names: list[str], quiet: set[str] | None = None) -> set[str]:
        """The retired snapshots: retirement records in force (not withdrawn by an unretire
        record). Invalid records in ``quiet`` were reported already."""
        records = Retirements()
        for n in names:
            data = self.get(n)
            if data is None:
                continue
            try:
                self.repo.read_retirement_record(n, data, records)
            except (encoding.FormatError, CorruptObject, ObjectMissing) as exc:
                if quiet is not None and n in quiet:
                    continue
                what = "unretire record" if data[:4] == MAGIC_UNRETIRED else "retirement record"
                self.report.add(
                    n,
                    f"{what} not valid: {exc}; it is ignored (the snapshot it names stays "
                    + ("retired if it was)" if what == "unretire record" else "listed)"),
                )
        return records.retired()

    def _verified(self, names: list[str]) -> tuple[dict[str, ParsedSnapshot], dict[str, ParsedSnapshot]]:
        """The snapshots that parse and verify on their own, and those written with another
        secret (others are reported)."""
        out, damaged_key = {}, {}
        domains: set[str] | None = None
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
                if domains is None:
                    domains = certificate_domains(self.repo)
                if snapshot_with_other_secret(self.repo, snap, domains):
                    damaged_key[n] = snap
                else:
                    self.report.add(n, f"snapshot not trusted: {problem}")
                continue
            out[n] = snap
        return out, damaged_key

    def _one(self, n: str, snap: ParsedSnapshot, chains: Chains, runs: dict[tuple[str, int], str]) -> None:
        r, e = self.report, snap.env
        if self.master is not None:
            try:
                body = open_body(snap, self.master.data_private)  # sealed to this envelope's writer and session?
            except encoding.FormatError as exc:
                r.add(n, f"{exc}; `restore` refuses it")
            else:
                self._path_set(n, e, body)
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

    def _path_set(self, n: str, e: Envelope, body: dict[str, Any]) -> None:
        """The envelope's path-set id must be the one of the paths sealed in its body: retention
        with a put key groups by it (docs/format.md section 13)."""
        secrets = self.secrets_for(e.domain)
        if not e.path_set or secrets is None:
            return
        paths = body.get("paths")
        if not (isinstance(paths, list) and all(isinstance(p, (str, bytes)) for p in paths)):
            self.report.add(n, "its body names no valid paths, so its path-set id cannot be confirmed")
        elif path_set_id(secrets, paths) != e.path_set:
            self.report.add(
                n,
                f"its path-set id {e.path_set} is not the one of the paths sealed in its body: `bunker forget` with a "
                f"put key would group it with other backups than its own (client {e.client!r} wrote it; run forget "
                "with --master-key, which groups by the sealed paths)",
            )

    def _chains(self, chains: Chains) -> None:
        for cert_name, chain in chains.items():
            client = self.repo.certificate(cert_name).client
            expected = 1
            for s in sorted(chain):
                name, prev = chain[s]
                if s > expected:
                    self.report.add(name, *self._gap(cert_name, client, expected, s, chain))
                expected = s + 1
                if s > 1 and (s - 1) in chain and chain[s - 1][0] != prev:
                    self.report.add(name, f"client {client!r}: snapshot #{s} does not link to #{s - 1} (chain altered)")

    def _gap(self, cert_name: str, client: str, first: int, after: int, chain: dict[int, tuple[str, str]]) -> Found:
        """(problem, level) of the gap #first..#after-1: damage, unless nodes' holding records say
        the snapshots are on their way up (repo/holding_records.py)."""
        if self._transit is None:
            self._transit = InTransit(holding_records(self.repo, self.get)[0])
        name, prev = chain[after]
        try:
            env = parse_snapshot(self.get(name) or b"").env
            written = min(env.time, self.stored.get(name, env.time))
        except encoding.FormatError:
            written = self.stored.get(name, 0.0)
        left = chain[first - 1][0] if first > 1 else ""
        level, problem = self._transit.explain(cert_name, client, first, after - 1, left, prev, written)
        return problem, level

    def _waiting(self, cert_name: str, newest: int, seq: int, head_name: str, have: dict[int, tuple[str, str]]) -> bool:
        """Whether the spool holds every snapshot from the repository's newest up to the
        remembered head, linked to the repository's newest: then they are pending, not withheld."""
        spooled = self.pending.chains.get(cert_name, {})
        if spooled.get(seq, ("", ""))[0] != head_name or any(s not in spooled for s in range(newest + 1, seq + 1)):
            return False
        base = have[newest][0] if newest else ""
        return spooled[newest + 1][1] == base


class _Sets:
    """The pack set and chunk set of each snapshot against what is stored."""

    def __init__(
        self,
        checks: SnapshotChecks,
        packs: set[str],
        agreed: AgreedCopies,
        other_secret: Collection[str],
        count: bool = True,
    ) -> None:
        self.c, self.packs, self.agreed = checks, packs, agreed
        self.count = count  # the second look (after settling) does not count chunks nor naming again
        self.other_secret = other_secret
        self.naming: dict[str, list[str]] = {}  # pack written with another secret -> snapshots naming it
        self.existing = {p.split("/", 1)[1] for p in packs}
        self.moves = PackMoves.load(checks.repo)  # a repacked pack's blobs are in the packs it moved to
        # (dedup domain, pack set, chunk set part) -> (its chunks, how many are lost, the first)
        self.parts_seen: dict[tuple[str, str, str], tuple[int, int, bytes]] = {}

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

    def check(self, n: str, snap: ParsedSnapshot) -> Missing:
        """What snapshot ``n`` misses of its pack set and chunk set ([] when nothing)."""
        e = snap.env
        out: Missing = []
        try:
            pset = refs.read_set(e.packset, self.fetch)
        except StorageError:
            raise
        except (BunkerError, encoding.FormatError) as exc:
            return [(f"pack set {e.packset} unreadable: {exc}", "damage")]
        missing = [p for p in pset if f"packs/{p}" not in self.packs and not self.moves.covered(p, self.existing)]
        resolved = set(self.moves.resolve(pset))
        foreign = sorted(p for p in resolved if p in self.other_secret)
        if self.count:
            for p in foreign:
                self.naming.setdefault(p, []).append(n)
        if missing:
            out.append((f"needs {len(missing)} pack(s) that are missing, e.g. packs/{missing[0]}", "damage"))
        secrets = self.c.secrets_for(e.domain)
        try:
            top = refs.parse_refs(self.fetch(e.chunkset))
            if top.get("kind") != "chunkset" or top.get("domain") != e.domain:
                # its chunks are another domain's: an envelope wrapped around data that is not its client's
                wrong = f"its chunk set {e.chunkset} is not a chunk set of its dedup domain {e.domain}"
                return [*out, (wrong, "damage")]
            if secrets is None:
                for part in top.get("parts", []):  # type: ignore[attr-defined]
                    self.fetch(part)
        except StorageError:
            raise
        except (BunkerError, encoding.FormatError) as exc:
            return [*out, (f"chunk set {e.chunkset} incomplete: {exc}", "damage")]
        if secrets is None:
            return out
        # part by part: a snapshot of 10 M chunks is never a list of 10 M ids
        chunks = lost = 0
        first_lost = b""
        missing_in: Callable[[bytes], tuple[int, bytes]] | None = None
        try:
            for part in refs.chunkset_parts(e.chunkset, self.fetch):
                # the snapshots of an unchanged source share their chunk set's parts and pack
                # set: each such part is looked up once (a check of daily backups checked every
                # part of every snapshot again)
                key = (e.domain, e.packset, part)
                seen = self.parts_seen.get(key)
                if seen is None:
                    ids = refs.read_chunkset_part(part, self.fetch, secrets)
                    missing_in = missing_in or self.agreed.missing_in(resolved)
                    seen = self.parts_seen[key] = (len(ids) // 32, *missing_in(ids))
                part_chunks, part_lost, first = seen
                chunks += part_chunks
                lost += part_lost
                first_lost = first_lost or first
        except StorageError:
            raise
        except (BunkerError, encoding.FormatError) as exc:
            return [*out, (f"chunk set {e.chunkset} unreadable: {exc}", "damage")]
        if lost and (e.complete or lost > e.stats.get("chunks_lost", 0)):
            # an incomplete snapshot declares how many chunks it lacks (forward could not
            # store them again): those are known, not damage
            if foreign:
                # a backup after a damaged key's run trusted that run's chunk ids (a files cache
                # kept per certificate, before it was kept per secret)
                out.append(
                    (
                        f"{lost} of its {chunks} chunks are not indexed in its packs (e.g. "
                        f"{first_lost.hex()[:16]}): it names {len(foreign)} pack(s) written with another secret (e.g. "
                        f"packs/{foreign[0]}), so the files whose data is there cannot be restored from it; the next "
                        "backup with a good put key stores them again",
                        "other-secret",
                    )
                )
            else:
                out.append(
                    (
                        f"{lost} of its {chunks} chunks are not indexed in its packs (e.g. "
                        f"{first_lost.hex()[:16]}); if the packs are intact, `bunker index rebuild` re-indexes them "
                        "from their trailers",
                        "damage",
                    )
                )
        if self.count:
            self.c.report.counts["snapshot_chunks"] += chunks
        return out
