"""``bunker compare A B``: what one copy of a repository holds and the other does not, keyless.

Objects are compared by name and size (a hash name is the BLAKE3 of the bytes, docs/format.md
section 5; `bunker check --keyless` at each copy proves the bytes). Snapshots are read and
verified in each copy on its own (docs/format.md section 18): per client certificate, the chain
head each copy holds; a copy whose newest snapshots of a client are missing is named, since it
is behind or withholds them. A snapshot that fails verification in a copy is reported as
untrusted and never counted as equal. ``sessions/`` is ignored (leases belong to one storage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.repo.mirror_sync import EXAMPLES, listing, open_copy
from bunker.repo.repository import Repository
from bunker.storage.backend import FIXED_NAMES, Backend
from bunker.storage.prefixes import HASH_NAMED

SIDES = ("a", "b")


@dataclass(frozen=True)
class Head:
    """The newest trusted snapshot of one certificate's chain in one copy."""

    seq: int
    name: str


@dataclass
class Chain:
    """One client certificate's chain in both copies."""

    cert: str
    client: str
    heads: dict[str, Head | None] = field(default_factory=dict)  # side -> head
    seqs: dict[str, dict[int, str]] = field(default_factory=dict)  # side -> seq -> snapshot name


@dataclass
class CompareReport:
    urls: dict[str, str] = field(default_factory=dict)
    repo_id: str = ""
    chains: list[Chain] = field(default_factory=list)
    only: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # side -> prefix -> names only there
    sizes_differ: list[str] = field(default_factory=list)
    untrusted: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # side -> (snapshot, why)
    findings: list[str] = field(default_factory=list)  # one sentence per difference that matters

    @property
    def same(self) -> bool:
        """The copies hold the same objects and every snapshot verifies in both."""
        return not (
            any(ns for side in self.only.values() for ns in side.values())
            or self.sizes_differ
            or any(self.untrusted.values())
        )

    def to_json(self) -> dict[str, object]:
        return {
            "a": self.urls.get("a", ""),
            "b": self.urls.get("b", ""),
            "repository": self.repo_id,
            "same": self.same,
            "chains": [
                {
                    "cert": c.cert,
                    "client": c.client,
                    **{s: ({"seq": h.seq, "snapshot": h.name} if (h := c.heads.get(s)) else None) for s in SIDES},
                }
                for c in self.chains
            ],
            "only": {
                s: {p: {"count": len(ns), "examples": ns[:EXAMPLES]} for p, ns in sorted(self.only[s].items()) if ns}
                for s in SIDES
            },
            "snapshots_only": {s: self.only[s].get("snapshots", []) for s in SIDES},
            "sizes_differ": self.sizes_differ,
            "untrusted": {s: [{"snapshot": n, "why": w} for n, w in self.untrusted[s]] for s in SIDES},
            "findings": self.findings,
        }


def compare(a: Backend, b: Backend) -> CompareReport:
    """Compare two copies of one repository (raises BunkerError, exit DIFFERENT, when they are
    copies of two different repositories)."""
    repos = {"a": open_copy(a, "A"), "b": open_copy(b, "B")}
    backends = {"a": a, "b": b}
    r = CompareReport(urls={s: backends[s].url for s in SIDES}, repo_id=repos["a"].repo_id)
    if repos["b"].repo_id != repos["a"].repo_id:
        raise BunkerError(
            f"{a.url} and {b.url} are two different repositories ({repos['a'].repo_id[:16]}… and "
            f"{repos['b'].repo_id[:16]}…), not two copies of one",
            "compare a repository with its own mirror; `bunker check --keyless --expect ID` shows which one has the "
            "id on your key",
            exit_code=ExitCode.DIFFERENT,
        )
    names = {s: listing(backends[s], HASH_NAMED) for s in SIDES}
    for s, o in (("a", "b"), ("b", "a")):
        r.only[s] = {p: sorted(set(names[s][p]) - set(names[o][p])) for p in HASH_NAMED}
        for n in FIXED_NAMES:
            if backends[s].stat(n) is not None and backends[o].stat(n) is None:
                r.only[s].setdefault("(fixed)", []).append(n)
    r.sizes_differ = sorted(
        n for p in HASH_NAMED for n, size in names["a"][p].items() if names["b"][p].get(n, size) != size
    )
    chains: dict[str, Chain] = {}
    for s in SIDES:
        r.untrusted[s] = _read_chains(s, repos[s], chains)
    r.chains = sorted(chains.values(), key=lambda c: (c.client, c.cert))
    _findings(r, names)
    return r


def _read_chains(side: str, repo: Repository, chains: dict[str, Chain]) -> list[tuple[str, str]]:
    """Add one copy's trusted snapshots to ``chains``; return its untrusted ones with why."""
    untrusted = sorted(repo.damaged_snapshots().items())
    try:
        records = repo.snapshots()
    except ObjectMissing:
        records = []
    for rec in records:
        env = rec.snap.env
        if not rec.trusted:
            untrusted.append((rec.name, rec.problem))
            continue
        chain = chains.get(env.cert)
        if chain is None:
            chain = chains[env.cert] = Chain(env.cert, env.client)
        chain.seqs.setdefault(side, {})[env.seq] = rec.name
        head = chain.heads.get(side)
        if head is None or env.seq > head.seq:
            chain.heads[side] = Head(env.seq, rec.name)
    return sorted(untrusted)


def _findings(r: CompareReport, names: dict[str, dict[str, dict[str, int]]]) -> None:
    """Sentences for what matters most: a copy missing a client's newest snapshots first."""
    label = {"a": "A", "b": "B"}
    for c in r.chains:
        for s, o in (("a", "b"), ("b", "a")):
            mine, theirs = c.heads.get(s), c.heads.get(o)
            if mine is None or (theirs is not None and theirs.seq >= mine.seq):
                continue
            have = c.seqs.get(o, {})
            lacking = [q for q in sorted(c.seqs.get(s, {})) if q > (theirs.seq if theirs else 0) and q not in have]
            if not lacking:
                continue
            who, newest = label[o], lacking[-1]
            where = c.seqs[s][newest]
            if len(lacking) == 1:
                what, pronoun = f"newest snapshot #{newest} ({where})", "it"
            else:
                what, pronoun = f"newest snapshots #{lacking[0]}..#{newest} (the newest: {where})", "them"
            upto = f"up to #{theirs.seq}" if theirs else "none of them"
            r.findings.append(
                f"{who} lacks client {c.client!r}'s {what}: {who} is behind or withheld {pronoun} "
                f"({label[s]} holds up to #{mine.seq}, {who} {upto})"
            )
    for s in SIDES:
        for name, why in r.untrusted[s]:
            r.findings.append(f"{label[s]}'s {name} is untrusted ({why}): not counted as equal")
        for p in HASH_NAMED:
            ns = r.only[s][p]
            if ns and p != "snapshots":
                r.findings.append(f"{len(ns)} object(s) of {p}/ only in {label[s]} (e.g. {ns[0]})")
        snaps = [n for n in r.only[s]["snapshots"] if not any(n in f for f in r.findings)]
        if snaps:
            r.findings.append(f"{len(snaps)} other snapshot(s) only in {label[s]} (e.g. {snaps[0]})")
        fixed = r.only[s].get("(fixed)", [])
        if fixed:
            r.findings.append(f"{', '.join(fixed)} only in {label[s]}")
    for n in r.sizes_differ:
        r.findings.append(
            f"{n} has {names['a'][n.split('/', 1)[0]][n]} bytes in A and {names['b'][n.split('/', 1)[0]][n]} in B: "
            "one copy is damaged (`bunker check --keyless` at each tells which)"
        )
