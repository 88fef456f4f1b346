"""Witnesses that the newest snapshots were not withheld (docs/hierarchy.md, "Witnesses";
docs/format.md section 24, "Witness statement").

The storage can withhold or roll back the newest snapshots of a chain: nothing inside it tells.
Only something outside it can: the chain heads this machine remembers (backup/chain.py), and
what a node saw the repository of record hold (a direct delivery it wrote and read back, or a
record receipt from a ``record`` node). A node puts the latter into a *witness statement*
signed with its node key; `check` trusts one only when the node holds a certificate of the
repository that is not revoked, and only for that repository.

Each witnessed head (client certificate, sequence number, snapshot) is compared with the chain
the repository holds: a sequence number above the repository's newest is a deletion or a
rollback, another object at that place a replacement. A witnessed snapshot that was forgotten
(a retirement record in force names it) is no loss, whatever became of its envelope.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from bunker import encoding
from bunker.crypto.node_keys import NodeKeys
from bunker.crypto.sign import BadSignature
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.repo.check_report import CheckReport, utc
from bunker.repo.node_certs import node_certificates, trusted_node
from bunker.repo.objects import check_ref
from bunker.repo.repository import Repository

MAGIC_WITNESS = b"BKWS"  # never stored in a repository (docs/format.md section 24)
DOMAIN = b"bunker witness statement v1"
MAX_STATEMENT = 4 << 20
VIAS = ("direct", "record")

Chains = dict[str, dict[int, tuple[str, str]]]  # cert -> seq -> (snapshot, prev), as repo/check_snapshots.py


@dataclass(frozen=True)
class WitnessedHead:
    """The newest snapshot of one client that a node knows the repository of record holds, and
    how it knows: ``direct`` (it read the snapshot at its direct upstream ``source``: one it wrote
    and read back, or another client's newest there)
    or ``record`` (record receipt number ``receipt`` from node ``source``, id ``issuer``)."""

    cert: str  # clients/<hex>
    seq: int
    snapshot: str  # snapshots/<hex>
    via: str  # "direct" | "record"
    source: str  # the upstream's name (direct) or the issuing node's name (record)
    time: float  # when it was read back (direct) or the receipt was issued (record)
    issuer: str = ""  # record: the issuing node's id
    receipt: int = 0  # record: the receipt's number

    def to_body(self) -> dict[str, object]:
        return {
            "cert": self.cert,
            "seq": self.seq,
            "snapshot": self.snapshot,
            "via": self.via,
            "source": self.source,
            "time": self.time,
            "issuer": self.issuer,
            "receipt": self.receipt,
        }

    @classmethod
    def from_body(cls, b: object) -> WitnessedHead:
        m = encoding.expect_map(b, "cert", "seq", "snapshot", "via", "source", "time", "issuer", "receipt")
        via = encoding.field(m, "via", str)
        if via not in VIAS:
            raise encoding.FormatError(f"a witnessed head of unknown kind {via!r}")
        seq = encoding.field(m, "seq", int)
        if seq < 1:
            raise encoding.FormatError(f"a witnessed head with sequence number {seq}")
        return cls(
            cert=check_ref(m["cert"], "clients"),
            seq=seq,
            snapshot=check_ref(m["snapshot"], "snapshots"),
            via=via,
            source=encoding.field(m, "source", str)[:200],
            time=float(encoding.field(m, "time", (int, float))),
            issuer=encoding.field(m, "issuer", str)[:64],
            receipt=encoding.field(m, "receipt", int),
        )

    def describe(self) -> str:
        """How the node knows, for a message: "record receipt #3 from node hq, <date>"."""
        if self.via == "direct":
            return f"read at its direct upstream {self.source!r} {utc(self.time)}"
        return f"record receipt #{self.receipt} from node {self.source!r}, {utc(self.time)}"


@dataclass(frozen=True)
class Statement:
    """A verified witness statement."""

    node: str  # the node's name, from its certificate
    node_id: str
    repo_id: str
    time: float
    heads: tuple[WitnessedHead, ...]


def make_statement(keys: NodeKeys, repo_id: str, heads: Iterable[WitnessedHead]) -> bytes:
    """A witness statement of the node with ``keys`` about repository ``repo_id``."""
    body = encoding.pack(
        {
            "v": 1,
            "repo": repo_id,
            "node": keys.node_id,
            "time": time.time(),
            "heads": [h.to_body() for h in sorted(heads, key=lambda h: h.cert)],
        }
    )
    return MAGIC_WITNESS + encoding.pack({"body": body, "sig": keys.sign(DOMAIN, body)})


def read_statement(repo: Repository, data: bytes) -> Statement:
    """Verify a witness statement for ``repo``: its format, that it is for this repository,
    that its node holds a certificate of the repository that is not revoked, and the node's
    signature. Raises encoding.FormatError saying why it cannot be trusted."""
    if not data.startswith(MAGIC_WITNESS) or len(data) > MAX_STATEMENT:
        raise encoding.FormatError("it is not a witness statement (`bunker node witness` writes one)")
    try:
        outer = encoding.expect_map(encoding.unpack(data[len(MAGIC_WITNESS) :]), "body", "sig")
        body_bytes = encoding.field_bytes(outer, "body")
        sig = encoding.field_bytes(outer, "sig", 64)
        b = encoding.expect_map(encoding.unpack(body_bytes), "v", "repo", "node", "time", "heads")
        rid, node_id = encoding.field(b, "repo", str), encoding.field(b, "node", str)
        made = float(encoding.field(b, "time", (int, float)))
        version = encoding.field(b, "v", int)
    except encoding.FormatError as exc:
        raise encoding.FormatError(f"it is damaged or altered ({exc})") from None
    if version != 1:
        raise encoding.FormatError(f"it is of version {version}; this bunker reads version 1")
    other = f"it was made for repository {rid[:64]!r}, not this one ({repo.repo_id})"
    cert = trusted_node(repo, node_id)
    if cert is None:
        if rid != repo.repo_id:
            raise encoding.FormatError(other)
        revoked = [c.node for c in node_certificates(repo) if c.node_id == node_id]
        if revoked:
            raise encoding.FormatError(
                f"node {revoked[0]!r} ({node_id[:16]}) is revoked in this repository's config: its word counts for "
                "nothing"
            )
        raise encoding.FormatError(
            f"no certificate of node {node_id[:16]} is in this repository: the master key never certified the "
            "node that signed it (`bunker node list` shows the nodes it did)"
        )
    try:
        cert.public.verify(DOMAIN, body_bytes, sig)
    except BadSignature:
        raise encoding.FormatError(
            f"its signature does not verify: it was altered or damaged after node {cert.node!r} signed it, or "
            "another key signed it"
        ) from None
    if rid != repo.repo_id:
        raise encoding.FormatError(other)
    heads_raw = encoding.field(b, "heads", list)
    heads = tuple(WitnessedHead.from_body(h) for h in heads_raw)
    return Statement(cert.node, node_id, rid, made, heads)


# ---------------------------------------------------------------------------- using witnesses


@dataclass(frozen=True)
class Witness:
    """One witnessed chain head, from this machine (``node`` empty) or from a node's statement."""

    cert: str
    seq: int
    name: str  # snapshots/<hex>
    node: str = ""  # the node that saw the repository of record hold it
    source: str = ""  # how that node knows (WitnessedHead.describe)
    # this machine's head written to its local spool: (session, counter) of the run it holds.
    # Its delivery may have linked that run under another name (signed again), which is no
    # replacement; what this machine remembers of it may outlive the delivery (an old copy of
    # its state directory put back)
    spooled: tuple[str, int] | None = None


# a witness statement to read: where it comes from (a file, a node directory), and a function
# giving its bytes for a repository id (it may raise BunkerError or OSError)
Source = tuple[str, Callable[[str], bytes]]


def statements_witnesses(repo: Repository, report: CheckReport, sources: Iterable[Source]) -> list[Witness]:
    """The witnessed heads of every statement ``sources`` give that can be trusted; each one
    refused is reported as a problem naming where it came from and why."""
    out: list[Witness] = []
    for where, read in sources:
        try:
            st = read_statement(repo, read(repo.repo_id))
        except encoding.FormatError as exc:
            report.add(where, f"witness statement refused: {exc}; {_REFUSED_NEXT}", cause="witness")
            continue
        except BunkerError as exc:
            report.add(where, f"witness statement refused: {exc.message}; {_REFUSED_NEXT}", cause="witness")
            continue
        except OSError as exc:
            report.add(where, f"witness statement refused: cannot read it ({exc.strerror or exc})", cause="witness")
            continue
        report.counts["witness_statements"] += 1
        report.counts["witnessed_heads"] += len(st.heads)
        if not st.heads:
            report.add(
                where,
                f"node {st.node!r} has not seen the repository of record hold any snapshot yet (statement made "
                f"{utc(st.time)}): it witnesses nothing",
                "note",
            )
        out += [Witness(h.cert, h.seq, h.snapshot, st.node, h.describe()) for h in st.heads]
    return out


def _delivered(w: Witness, have: dict[int, tuple[str, str]], runs: Mapping[tuple[str, int], str]) -> bool:
    """Whether ``w``, a head this machine wrote to its spool, was delivered: its client's chain
    holds a snapshot of the same run (linked under another name, at its place or after it)."""
    if w.spooled is None:
        return False
    name = runs.get(w.spooled)
    return name is not None and any(n == name for seq, (n, _) in have.items() if seq >= w.seq)


_REFUSED_NEXT = (
    "nothing it says was used, so the newest snapshots were not compared with what that node saw; make a new "
    "statement with `bunker node witness DIR --out FILE` on a node certified for this repository (or name that "
    "node's directory with --witness)"
)


def judge(
    repo: Repository,
    report: CheckReport,
    chains: Chains,
    witnesses: Iterable[Witness],
    retired: set[str],
    waiting: Callable[[str, int, int, str, dict[int, tuple[str, str]]], bool],
    spool: str = "",
    runs: Mapping[tuple[str, int], str] | None = None,
) -> None:
    """Compare every witnessed head with the chains the repository holds. ``waiting(cert,
    newest, seq, name, chain)``: whether this machine's own snapshots above the repository's
    newest wait in its local spool ``spool`` (pending, not withheld). ``runs``: (session,
    counter) -> the trusted snapshot holding that run, for this machine's spooled heads."""
    seen: set[tuple[str, int, str]] = set()
    for w in witnesses:
        if (w.cert, w.seq, w.name) in seen:
            continue
        seen.add((w.cert, w.seq, w.name))
        have = chains.get(w.cert, {})
        newest = max(have) if have else 0
        who = _client(repo, w.cert)
        if w.seq in have:
            if have[w.seq][0] != w.name and not _delivered(w, have, runs or {}):
                held = have[w.seq][0]
                if w.node:
                    report.add(
                        w.name,
                        f"node {w.node!r} saw the repository hold {who}'s snapshot #{w.seq} as this object "
                        f"({w.source}); the repository holds another object there ({held}): it was replaced; "
                        f"{_next_step(w)}",
                    )
                else:
                    report.add(w.name, f"{who}'s snapshot #{w.seq} was replaced by another object; {_next_step(w)}")
            continue
        if w.seq < newest:
            continue  # a gap in the chain: the chain check names it
        if not w.node and waiting(w.cert, newest, w.seq, w.name, have):
            report.add(
                w.name,
                f"{who}: snapshots #{newest + 1}..#{w.seq} are not in the repository yet: they wait in this machine's "
                f"local spool {spool}; the next backup or `bunker forward` delivers them",
                "note",
            )
        elif w.name in retired:
            report.add(
                w.name,
                f"{who}'s snapshot #{w.seq} was forgotten (a retirement record in force names it), and its envelope is "
                "gone too: no backup is lost, but bunker keeps the envelopes of forgotten snapshots, so someone with "
                "access to the storage deleted it; nothing needs restoring, find out who deletes objects there",
                "warn",
            )
        else:
            said = (
                f"node {w.node!r} saw the repository hold {who}'s snapshot #{w.seq} ({w.source});"
                if w.node
                else f"{who} wrote snapshot #{w.seq} (this machine remembers it) but"
            )
            now = f"the repository's newest is #{newest}" if newest else "the repository holds none of its snapshots"
            report.add(
                w.name,
                f"{said} {now}: snapshots were deleted or the repository was rolled back; {_next_step(w)}",
            )


def _client(repo: Repository, cert: str) -> str:
    try:
        return f"client {repo.certificate(cert).client!r}"
    except (CorruptObject, ObjectMissing):
        return f"the client of {cert}"


def _next_step(w: Witness) -> str:
    where = f"from node {w.node!r}'s store (a node keeps snapshot objects)" if w.node else "from a mirror"
    if w.node:
        where = f"from a mirror or {where}"
    else:
        where += " (or from the node this client backs up through, if it has one)"
    return f"copy {w.name} and that client's snapshots after it back {where}, then run `bunker check` here again"
