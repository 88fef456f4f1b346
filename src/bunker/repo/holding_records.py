"""Holding records (``gc/<hash>``, magic ``BKHO``; docs/format.md section 24, docs/hierarchy.md
"A client that moves between nodes"): a node's signed statement "I hold these snapshots of these
clients and have not delivered them to my upstream U yet".

A client that moved from node A to node B leaves a gap in its chain at the repository of record:
B delivers the client's new snapshots while the older ones still wait on A (a link not carried
yet). A node writes a holding record whenever the set of snapshots it owes an upstream changes,
and sends it up *ahead of* the data it speaks for, so the top learns early what is on its way.
`bunker check` at the top reports a gap as *in transit* (a note) when every missing sequence
number is named by a valid record whose snapshots link to the gap's neighbours; a gap that no
record covers stays damage. A record never makes anything look present that is not: it only turns
the report of a gap it names into a note, and only while the note is young (a gap older than
``BUNKER_RECORD_WARN_DAYS``, measured from the client-signed time of the snapshot after it, is a
warning). The newest record of a node for an upstream supersedes its older ones; `bunker prune`
at the top removes superseded records, those whose snapshots have all arrived, and those that do
not verify.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.crypto.sign import BadSignature
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.repo.check_report import utc
from bunker.repo.node_certs import trusted_node
from bunker.repo.objects import MAGIC_HOLDING, check_ref
from bunker.repo.repository import Repository

DOMAIN = b"bunker holding record v1"
MAX_HOLDING = 8 << 20  # about 40 000 snapshots; a node owing more writes them in later records
MAX_UPSTREAM = 64

RECORD_WARN_ENV = "BUNKER_RECORD_WARN_DAYS"
DEFAULT_WARN_DAYS = 7.0


def warn_days() -> float:
    """N from ``BUNKER_RECORD_WARN_DAYS`` (days, may be fractional; default 7): how long a
    snapshot may wait below the repository of record before it is a warning."""
    text = os.environ.get(RECORD_WARN_ENV, "").strip()
    if not text:
        return DEFAULT_WARN_DAYS
    try:
        days = float(text)
        if not days >= 0:
            raise ValueError(text)
    except ValueError:
        raise BunkerError(
            f"{RECORD_WARN_ENV}={text!r} is not a number of days",
            f"set {RECORD_WARN_ENV} to a number such as 7 or 0.5, or unset it (default {DEFAULT_WARN_DAYS:g})",
            exit_code=ExitCode.USAGE,
        ) from None
    return days


@dataclass(frozen=True)
class Held:
    """One snapshot a node holds: its place in its client's chain, as its envelope says."""

    seq: int
    name: str  # snapshots/<hex>
    prev: str  # the envelope's previous snapshot ("" for #1)
    since: float  # when the node stored it (the node's clock)


@dataclass(frozen=True)
class HoldingRecord:
    name: str  # gc/<hex>
    node: str  # node id
    node_name: str  # from the node's certificate ("" when read unverified)
    upstream: str  # the node's name for the upstream it waits for
    time: float
    held: dict[str, tuple[Held, ...]]  # client certificate -> its snapshots the node holds

    @property
    def key(self) -> tuple[str, str]:
        """A newer record with the same key supersedes this one."""
        return self.node, self.upstream


def make_holding(
    keys: NodeKeys, repo_id: str, upstream: str, held: Mapping[str, Iterable[Held]], now: float | None = None
) -> bytes:
    """A record signed by ``keys``'s node: it holds ``held`` and has not delivered it to ``upstream``."""
    body = encoding.pack(
        {
            "repo": repo_id,
            "node": keys.node_id,
            "upstream": upstream,
            "time": time.time() if now is None else now,
            "held": {
                cert: [[h.seq, h.name, h.prev, h.since] for h in sorted(hs, key=lambda h: h.seq)]
                for cert, hs in sorted(held.items())
            },
        }
    )
    return MAGIC_HOLDING + encoding.pack({"body": body, "sig": keys.sign(DOMAIN, body)})


def _entry(value: object) -> Held:
    if not isinstance(value, list) or len(value) != 4:
        raise encoding.FormatError("a held snapshot is [seq, name, prev, since]")
    seq, name, prev, since = value
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise encoding.FormatError(f"bad sequence number {seq!r}")
    check_ref(name, "snapshots")
    if not isinstance(prev, str) or (seq == 1) != (prev == ""):
        raise encoding.FormatError(f"snapshot #{seq} has a bad previous snapshot {prev!r}")
    if prev:
        check_ref(prev, "snapshots")
    if not isinstance(since, (int, float)) or isinstance(since, bool):
        raise encoding.FormatError("bad time")
    return Held(seq, name, prev, float(since))


def parse_holding(name: str, data: bytes) -> tuple[HoldingRecord, str, bytes, bytes]:
    """(the record as it says, its repository id, body, signature): nothing verified."""
    if not data.startswith(MAGIC_HOLDING) or len(data) > MAX_HOLDING:
        raise encoding.FormatError("not a holding record")
    outer = encoding.expect_map(encoding.unpack(data[len(MAGIC_HOLDING) :]), "body", "sig")
    body_bytes = encoding.field_bytes(outer, "body")
    b = encoding.expect_map(encoding.unpack(body_bytes), "repo", "node", "upstream", "time", "held")
    upstream = encoding.field(b, "upstream", str)
    if not 0 < len(upstream) <= MAX_UPSTREAM:
        raise encoding.FormatError("bad upstream name")
    held: dict[str, tuple[Held, ...]] = {}
    for cert, entries in encoding.field(b, "held", dict).items():
        check_ref(cert, "clients")
        if not isinstance(entries, list):
            raise encoding.FormatError("held snapshots are a list")
        held[cert] = tuple(_entry(e) for e in entries)  # a fork the node holds names one number twice
    record = HoldingRecord(
        name,
        encoding.field(b, "node", str),
        "",
        upstream,
        float(encoding.field(b, "time", (int, float))),
        held,
    )
    return record, encoding.field(b, "repo", str), body_bytes, encoding.field_bytes(outer, "sig", 64)


def read_holding(repo: Repository, name: str, data: bytes) -> HoldingRecord:
    """Verify a holding record: of this repository, signed by a node that holds a certificate of
    it that is not revoked. Raises FormatError."""
    record, repo_id, body, sig = parse_holding(name, data)
    if repo_id != repo.repo_id:
        raise encoding.FormatError("a holding record of another repository")
    cert = trusted_node(repo, record.node)
    if cert is None:
        raise encoding.FormatError(
            f"node {record.node[:16]} holds no certificate of this repository that is not revoked"
        )
    try:
        cert.public.verify(DOMAIN, body, sig)
    except BadSignature:
        raise encoding.FormatError(f"its signature does not verify with node {cert.node!r}'s key") from None
    return HoldingRecord(name, record.node, cert.node, record.upstream, record.time, record.held)


def holding_records(
    repo: Repository, get: Callable[[str], bytes | None] | None = None
) -> tuple[list[HoldingRecord], list[str]]:
    """The valid holding records in ``gc/``, and the names of those that do not verify (`check`
    names them; `bunker prune` removes them). ``get``: how to read an object (None: gone)."""
    valid: list[HoldingRecord] = []
    invalid: list[str] = []
    for info in repo.backend.list("gc/"):
        try:
            data = get(info.name) if get is not None else repo.get_object(info.name)
        except (CorruptObject, ObjectMissing):
            continue
        if data is None or not data.startswith(MAGIC_HOLDING):
            continue
        try:
            valid.append(read_holding(repo, info.name, data))
        except encoding.FormatError:
            invalid.append(info.name)
    return valid, invalid


def newest_holdings(records: Iterable[HoldingRecord]) -> tuple[list[HoldingRecord], list[HoldingRecord]]:
    """The newest record of each (node, upstream), and the superseded ones."""
    newest: dict[tuple[str, str], HoldingRecord] = {}
    older: list[HoldingRecord] = []
    for r in records:
        have = newest.get(r.key)
        if have is None or (r.time, r.name) > (have.time, have.name):
            if have is not None:
                older.append(have)
            newest[r.key] = r
        else:
            older.append(r)
    return list(newest.values()), older


def spent_holdings(repo: Repository, listed: set[str], places: set[tuple[str, int]]) -> list[str]:
    """The holding records a prune at the top removes: superseded ones, those whose every snapshot
    is here (``listed``) or whose chain place another snapshot here takes (``places``:
    (certificate, sequence number)), and those that do not verify (they cover nothing)."""
    valid, invalid = holding_records(repo)
    newest, older = newest_holdings(valid)
    spent = [
        r.name
        for r in newest
        if all(h.name in listed or (cert, h.seq) in places for cert, hs in r.held.items() for h in hs)
    ]
    return sorted([*invalid, *(r.name for r in older), *spent])


class InTransit:
    """What the newest valid holding records say of the gaps in the chains (read once per check)."""

    def __init__(self, records: Iterable[HoldingRecord], now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        newest, _ = newest_holdings(records)
        self.claims: dict[tuple[str, int], list[tuple[Held, HoldingRecord]]] = {}
        for r in sorted(newest, key=lambda r: -r.time):  # the freshest word on a snapshot first
            for cert, hs in r.held.items():
                for h in hs:
                    self.claims.setdefault((cert, h.seq), []).append((h, r))

    def explain(
        self, cert: str, client: str, first: int, last: int, left: str, right_prev: str, written: float
    ) -> tuple[str, str]:
        """(level, text) of the gap #first..#last in ``cert``'s chain: a note (a warning once old)
        when records cover it — each missing snapshot named, each linking to the one before it
        (``left``, the snapshot before the gap; "" when the gap starts at #1), and the snapshot
        after the gap linking to the last (``right_prev``) — else damage. ``written``: when the
        snapshot after the gap was written (the missing ones are older)."""
        what = f"snapshot #{first} is" if first == last else f"snapshots #{first}..#{last} are"
        chosen: list[tuple[Held, HoldingRecord]] = []
        prev = left
        for seq in range(first, last + 1):
            fit = next((c for c in self.claims.get((cert, seq), []) if c[0].prev == prev), None)
            if fit is None:
                break
            chosen.append(fit)
            prev = fit[0].name
        if len(chosen) < last - first + 1 or prev != right_prev:
            damage = f"client {client!r}: snapshots #{first}..#{last} are missing (deleted or withheld)"
            named = sorted({r.node_name for s in range(first, last + 1) for _, r in self.claims.get((cert, s), [])})
            if named:
                damage += (
                    f"; holding records of node {', '.join(repr(n) for n in named)} name snapshots there, but they "
                    "do not cover the gap or do not link to the snapshots around it, so they are not believed"
                )
            return "err", damage
        days = warn_days()
        holders = _holders(chosen)
        if self.now - written <= days * 86400:
            return "note", f"client {client!r}: {what} in transit: {holders}"
        return "warn", (
            f"client {client!r}: {what} still not here, {(self.now - written) / 86400:.1f} days after the client "
            f"wrote the snapshot that follows them ({utc(written)}): {holders}. If that node holds them, its link "
            "does not move: run `bunker node status` on it and carry or reconnect the link; if it does not, they "
            f"are lost and exist nowhere else. {RECORD_WARN_ENV} sets how many days are allowed (now {days:g})"
        )


def _holders(chosen: list[tuple[Held, HoldingRecord]]) -> str:
    """Who holds a gap's snapshots, as "node 'a' holds them since ... (waiting for its upstream
    'u')": one part per run of consecutive snapshots named by one record."""
    runs: list[list[tuple[Held, HoldingRecord]]] = []
    for c in chosen:
        if runs and runs[-1][-1][1] is c[1]:
            runs[-1].append(c)
        else:
            runs.append([c])
    parts = []
    for run in runs:
        r = run[0][1]
        since = utc(min(h.since for h, _ in run))
        if len(runs) == 1:
            what = "them" if len(run) > 1 else "it"
        else:
            what = f"#{run[0][0].seq}" + (f"..#{run[-1][0].seq}" if len(run) > 1 else "")
        parts.append(f"node {r.node_name!r} holds {what} since {since} (waiting for its upstream {r.upstream!r})")
    return "; ".join(parts)
