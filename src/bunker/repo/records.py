"""Small signed records: session leases (``sessions/``), retirement (``retired/``) and GC
condemnation (``gc/``). Issue 2 writes leases; prune and GC use the others (format fixed now).

Leases are named ``sessions/<session id>.<counter>``: a refresh writes a new object (counter+1)
and deletes the old one; a lease's age is judged by the storage's own time for the object.
"""

from __future__ import annotations

import secrets as pysecrets
import time
from typing import Any

from bunker import encoding
from bunker.crypto.sign import SigningKey
from bunker.repo.objects import MAGIC_GC, MAGIC_RETIRED, MAGIC_SESSION, check_ref, make_signed, parse_signed

LEASE_SECONDS = 15 * 60


def new_session_id() -> str:
    return pysecrets.token_hex(12)


def make_lease(
    session: str,
    counter: int,
    client: str,
    kind: str,
    signer: SigningKey,
    cert: str,
    checkpoint: dict[str, Any] | None = None,
) -> tuple[str, bytes]:
    """A lease object (name, bytes) valid LEASE_SECONDS after the storage stored it; a backup's
    lease may carry its latest checkpoint (what it finished so far, see backup/checkpoint.py)."""
    body = {
        "session": session,
        "counter": counter,
        "client": client,
        "kind": kind,
        "expires_after": LEASE_SECONDS,
        "written": time.time(),
        "checkpoint": checkpoint,
    }
    return f"sessions/{session}.{counter}", make_signed(MAGIC_SESSION, body, signer, cert)


def parse_lease(data: bytes) -> tuple[dict[str, Any], str]:
    """(body, signer certificate name) of a lease; the caller verifies the signature if it acts
    on the lease's content (a checkpoint), not just on its existence."""
    obj = parse_signed(data, MAGIC_SESSION)
    encoding.field(obj.body, "session", str)
    encoding.field(obj.body, "expires_after", int)
    return obj.body, obj.signer


def make_retirement(snapshot: str, reason: str, signer: SigningKey, cert: str) -> bytes:
    """A signed record that ``snapshot`` was forgotten by prune (needs the prune capability)."""
    return make_signed(MAGIC_RETIRED, {"snapshot": snapshot, "reason": reason, "time": time.time()}, signer, cert)


def parse_retirement(data: bytes) -> tuple[str, str]:
    """(snapshot name, signer certificate) of a retirement record; the caller verifies."""
    obj = parse_signed(data, MAGIC_RETIRED)
    return check_ref(obj.body.get("snapshot"), "snapshots"), obj.signer


def make_condemnation(packs: list[str], signer: SigningKey, cert: str) -> bytes:
    """A GC phase-1 record: these packs are unreferenced and will be deleted after the grace."""
    return make_signed(MAGIC_GC, {"packs": sorted(packs), "time": time.time()}, signer, cert)


def parse_condemnation(data: bytes) -> list[str]:
    obj = parse_signed(data, MAGIC_GC)
    return [check_ref(f"packs/{p}", "packs")[6:] for p in encoding.field(obj.body, "packs", list)]
