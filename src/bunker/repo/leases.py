"""Session leases (``sessions/``): the only coordination between writers (DESIGN.md §3, §6).

A session writes ``sessions/<id>.0`` when it starts and keeps it until it ends: the storage's time
for that object is when the session began. While it runs it writes ``sessions/<id>.<n>`` about
every LEASE_SECONDS/3 (deleting the previous refresh): the storage's time for the newest one says
it is alive. A session whose newest lease object is older than its ``expires_after`` (capped, so a
hostile lease cannot block GC forever) is dead; nobody needs to remove it, and nothing waits for it.
All ages are judged by the storage's own object times, never by a client clock.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from bunker import encoding
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.repo.objects import MAGIC_SESSION, parse_signed
from bunker.repo.records import LEASE_SECONDS, make_lease, new_session_id, parse_lease
from bunker.repo.repository import Repository

MAX_LEASE_SECONDS = 6 * 3600  # a lease claiming longer is treated as this long


class Lease:
    """This process's lease: ``write()`` first, ``refresh_if_due()`` while working, ``release()``."""

    def __init__(self, repo: Repository, signer: SigningKey, client: str, cert_name: str, kind: str) -> None:
        self.repo, self.signer, self.client, self.cert_name, self.kind = repo, signer, client, cert_name, kind
        self.session = new_session_id()
        self.counter = 0
        self.start_name = ""
        self.name = ""
        self.written = 0.0
        self.checkpoint: dict[str, Any] | None = None

    def write(self, checkpoint: dict[str, Any] | None = None) -> None:
        """Write the next lease object (the first one marks the session's start and stays);
        ``checkpoint``: what the session finished so far (kept until the next one)."""
        if checkpoint is None:
            checkpoint = self.checkpoint
        self.checkpoint = checkpoint
        name, data = make_lease(
            self.session, self.counter, self.client, self.kind, self.signer, self.cert_name, checkpoint
        )
        self.repo.backend.put(name, data)
        old, self.name, self.written = self.name, name, time.monotonic()
        if self.counter == 0:
            self.start_name = name
        self.counter += 1
        if old and old != self.start_name:
            with contextlib.suppress(BunkerError, OSError):
                self.repo.backend.delete(old)

    def refresh_if_due(self) -> None:
        if time.monotonic() - self.written >= LEASE_SECONDS / 3:
            self.write()

    def storage_time(self) -> float:
        """The storage's time for this session's newest lease object: "now" as the storage sees it."""
        info = self.repo.backend.stat(self.name)
        return info.mtime if info is not None else time.time()

    def release(self) -> None:
        for n in {self.name, self.start_name} - {""}:
            with contextlib.suppress(BunkerError, OSError):
                self.repo.backend.delete(n)


@dataclass(frozen=True)
class Session:
    """A session seen in ``sessions/``: when it started and was last refreshed (storage times)."""

    session: str
    started: float
    refreshed: float
    expires_after: float
    kind: str
    client: str
    names: tuple[str, ...]  # its lease objects
    cert: str  # the certificate that signed its newest lease
    checkpoint: dict[str, Any] | None  # from its newest lease

    def alive(self, now: float) -> bool:
        return now - self.refreshed < self.expires_after


def sessions(repo: Repository) -> list[Session]:
    """Every session with a readable lease in ``sessions/``."""
    groups: dict[str, list[tuple[int, str, float]]] = {}
    for info in repo.backend.list("sessions/"):
        sid, _, counter = info.name.split("/", 1)[1].rpartition(".")
        if not sid or not counter.isdigit():
            continue
        groups.setdefault(sid, []).append((int(counter), info.name, info.mtime))
    out = []
    for sid, objs in groups.items():
        objs.sort()
        newest = objs[-1]
        try:
            data = repo.backend.get(newest[1])
            body, signer = parse_lease(data)
        except (encoding.FormatError, ObjectMissing):
            continue  # damaged or just replaced by a refresh: the next listing sees it
        cp = body.get("checkpoint")
        if cp is not None and not _signed_by_client(repo, data, signer):
            cp = None  # a checkpoint is acted on (kept by GC, made a snapshot) only if authentic
        expires = float(min(max(int(body["expires_after"]), 60), MAX_LEASE_SECONDS))
        started = objs[0][2] if objs[0][0] == 0 else min(o[2] for o in objs)
        refreshed = max(o[2] for o in objs)
        kind, client = str(body.get("kind", "")), str(body.get("client"))
        names = tuple(o[1] for o in objs)
        out.append(
            Session(sid, started, refreshed, expires, kind, client, names, signer, cp if isinstance(cp, dict) else None)
        )
    return out


def _signed_by_client(repo: Repository, data: bytes, signer: str) -> bool:
    """True if the lease ``data`` is signed by the valid, not revoked certificate ``signer``."""
    if not signer or signer in repo.config.revoked_clients():
        return False
    try:
        obj = parse_signed(data, MAGIC_SESSION)
        verify(repo.certificate(signer).verify_key, MAGIC_SESSION, obj.body_bytes, obj.sig)
    except (encoding.FormatError, BadSignature, CorruptObject, ObjectMissing):
        return False
    return True
