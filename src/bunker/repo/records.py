"""Small signed records: session leases (``sessions/``), retirement and its withdrawal
(``retired/``) and GC condemnation (``gc/``). Issue 2 writes leases; prune and GC use the others.

A retirement is withdrawn only by a signed *unretire* record that names it (``bunker unforget``),
never by deleting it: a deletion cannot be told from a storage operator's (docs/format.md
section 15).

Leases are named ``sessions/<session id>.<counter>``: a refresh writes a new object (counter+1)
and deletes the old one; a lease's age is judged by the storage's own time for the object.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.crypto.sign import SigningKey
from bunker.repo.objects import (
    MAGIC_GC,
    MAGIC_RETIRED,
    MAGIC_SESSION,
    MAGIC_UNRETIRED,
    check_ref,
    make_signed,
    parse_signed,
)

LEASE_SECONDS = 15 * 60
LEASE_VERSION = 2


@dataclass(frozen=True)
class ChainBase:
    """The head of the signer's chain a session started from: the sequence number and name of
    the newest snapshot it would extend (0 and "" for an empty chain)."""

    seq: int
    prev: str

    def to_body(self) -> dict[str, Any]:
        return {"seq": self.seq, "prev": self.prev}


def lease_name(session: str, counter: int) -> str:
    return f"sessions/{session}.{counter}"


def new_session_id() -> str:
    return os.urandom(12).hex()


def make_lease(
    session: str,
    counter: int,
    client: str,
    kind: str,
    signer: SigningKey,
    cert: str,
    checkpoint: dict[str, Any] | None = None,
    base: ChainBase | None = None,
    claim: dict[str, Any] | None = None,
) -> tuple[str, bytes]:
    """A lease object (name, bytes) valid LEASE_SECONDS after the storage stored it; a backup's
    lease may carry its latest checkpoint (what it finished so far, see backup/checkpoint.py).
    The body names its session and counter (the object's name must agree) and the chain head the
    session started from, so a copy put back under another name, or a checkpoint of a run that
    started before a newer snapshot, is refused (docs/format.md section 15). ``claim``: the lease
    claims a sequence number of its signer's chain (repo/claims.py)."""
    body: dict[str, Any] = {
        "v": LEASE_VERSION,
        "session": session,
        "counter": counter,
        "client": client,
        "kind": kind,
        "expires_after": LEASE_SECONDS,
        "written": time.time(),
        "checkpoint": checkpoint,
        "base": (base or ChainBase(0, "")).to_body(),
    }
    if claim is not None:
        body["claim"] = claim
    return lease_name(session, counter), make_signed(MAGIC_SESSION, body, signer, cert)


def parse_lease(data: bytes, name: str | None = None) -> tuple[dict[str, Any], str]:
    """(body, signer certificate name) of a lease; the caller verifies the signature. With
    ``name``, a format-2 lease must name itself (session and counter): a copy put back under
    another name is refused."""
    obj = parse_signed(data, MAGIC_SESSION)
    session = encoding.field(obj.body, "session", str)
    encoding.field(obj.body, "expires_after", int)
    if obj.body.get("v", 1) >= LEASE_VERSION:
        counter = encoding.field(obj.body, "counter", int)
        base = encoding.expect_map(encoding.field(obj.body, "base", dict), "seq", "prev")
        encoding.field(base, "seq", int)
        if encoding.field(base, "prev", str):
            check_ref(base["prev"], "snapshots")
        if name is not None and name != lease_name(session, counter):
            raise encoding.FormatError(
                f"it names itself {lease_name(session, counter)}: a lease copied or replayed under another name"
            )
    return obj.body, obj.signer


def lease_base(body: dict[str, Any]) -> ChainBase | None:
    """The chain head a format-2 lease's session started from (None in older leases)."""
    if body.get("v", 1) < LEASE_VERSION:
        return None
    return ChainBase(int(body["base"]["seq"]), str(body["base"]["prev"]))


def make_retirement(snapshot: str, reason: str, signer: SigningKey, cert: str) -> bytes:
    """A signed record that ``snapshot`` was forgotten by prune (needs the prune capability)."""
    return make_signed(MAGIC_RETIRED, {"snapshot": snapshot, "reason": reason, "time": time.time()}, signer, cert)


def parse_retirement(data: bytes) -> tuple[str, str]:
    """(snapshot name, signer certificate) of a retirement record; the caller verifies."""
    obj = parse_signed(data, MAGIC_RETIRED)
    return check_ref(obj.body.get("snapshot"), "snapshots"), obj.signer


def make_unretirement(retirement: str, snapshot: str, reason: str, signer: SigningKey, cert: str) -> bytes:
    """A signed record withdrawing the retirement record ``retirement`` of ``snapshot``
    (``bunker unforget``; the same signers as a retirement)."""
    body = {"retirement": retirement, "snapshot": snapshot, "reason": reason, "time": time.time()}
    return make_signed(MAGIC_UNRETIRED, body, signer, cert)


def parse_unretirement(data: bytes) -> tuple[str, str, str]:
    """(retirement record name, snapshot name, signer certificate) of an unretire record; the
    caller verifies."""
    obj = parse_signed(data, MAGIC_UNRETIRED)
    retirement = check_ref(obj.body.get("retirement"), "retired")
    return retirement, check_ref(obj.body.get("snapshot"), "snapshots"), obj.signer


@dataclass
class Retirements:
    """The valid records under ``retired/`` and what they say together. A snapshot is retired
    while a valid retirement record names it that no valid unretire record withdraws (one that
    names that record and the same snapshot); records that do not verify count for nothing."""

    records: dict[str, str] = field(default_factory=dict)  # retirement record -> snapshot
    withdrawals: dict[str, tuple[str, str]] = field(default_factory=dict)  # unretire record -> (retirement, snapshot)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (record, why it is ignored)

    def withdrawn(self) -> set[str]:
        """The retirement records a valid unretire record withdraws."""
        return {r for r, snap in self.withdrawals.values() if self.records.get(r) == snap}

    def active(self) -> dict[str, list[str]]:
        """Retired snapshot -> the retirement records in force for it."""
        gone = self.withdrawn()
        out: dict[str, list[str]] = {}
        for rec, snap in sorted(self.records.items()):
            if rec not in gone:
                out.setdefault(snap, []).append(rec)
        return out

    def retired(self) -> set[str]:
        return set(self.active())

    def unretired(self) -> set[str]:
        """Snapshots whose retirement was withdrawn and that no other record retires."""
        active = self.active()
        return {self.records[r] for r in self.withdrawn()} - set(active)


def make_condemnation(packs: list[str], signer: SigningKey, cert: str) -> bytes:
    """A GC phase-1 record: these packs are unreferenced and will be deleted after the grace."""
    return make_signed(MAGIC_GC, {"packs": sorted(packs), "time": time.time()}, signer, cert)


def parse_condemnation(data: bytes) -> list[str]:
    obj = parse_signed(data, MAGIC_GC)
    return [check_ref(f"packs/{p}", "packs")[6:] for p in encoding.field(obj.body, "packs", list)]
