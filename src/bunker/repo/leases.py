"""Session leases (``sessions/``): the only coordination between writers (docs/format.md section 15).

A session writes ``sessions/<id>.0`` when it starts and keeps it until it ends: the storage's time
for that object is when the session began. While it runs it writes ``sessions/<id>.<n>`` about
every LEASE_SECONDS/3 (deleting the previous refresh): the storage's time for the newest one says
it is alive. A session whose newest lease object is older than its ``expires_after`` (capped, so a
hostile lease cannot block GC forever) is dead; nobody needs to remove it, and nothing waits for it.
All ages are judged by the storage's own object times, never by a client clock.

Only leases that verify count, each against a certificate that is not revoked, and each must
name itself (a lease copied under another name is refused); a session's whole life is capped
from the storage's time for its first object, so no lease pins packs forever.

Storage whose listings show new objects only after a while (eventual consistency) must never see
a session vanish while what it did is not visible yet, or a prune could take it for gone and
delete packs it relies on: a refresh deletes the previous one only once the new one is listed,
and a session removes its lease only once what it committed (its snapshot) is listed; otherwise
the lease stays and expires.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bunker import encoding, interrupt
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import BunkerError, CorruptObject, ObjectMissing
from bunker.repo.objects import MAGIC_SESSION, parse_signed
from bunker.repo.records import LEASE_SECONDS, ChainBase, lease_base, make_lease, new_session_id, parse_lease
from bunker.repo.repository import Repository

MAX_LEASE_SECONDS = 6 * 3600  # a lease claiming longer is treated as this long
# a session older than this (from the storage's time for its first object) is dead whatever it
# refreshes: a run of a month is far beyond any backup, and a lease kept alive by a hostile or
# stuck client must not keep condemned packs forever
MAX_SESSION_SECONDS = 30 * 86400
LISTING_WAIT = 30.0  # how long a session waits at its end for its snapshot to show in listings


class Lease:
    """This process's lease: ``write()`` first, ``refresh_if_due()`` while working, ``release()``."""

    def __init__(
        self,
        repo: Repository,
        signer: SigningKey,
        client: str,
        cert_name: str,
        kind: str,
        base: ChainBase | None = None,
    ) -> None:
        self.repo, self.signer, self.client, self.cert_name, self.kind = repo, signer, client, cert_name, kind
        self.base = base  # the head of the signer's chain when the session started
        self.session = new_session_id()
        self.counter = 0
        self.start_name = ""
        self.name = ""
        self.written = 0.0
        self.checkpoint: dict[str, Any] | None = None
        self._stale: list[str] = []  # refreshes kept until a newer one is listed

    def write(self, checkpoint: dict[str, Any] | None = None) -> None:
        """Write the next lease object (the first one marks the session's start and stays);
        ``checkpoint``: what the session finished so far (kept until the next one)."""
        if checkpoint is None:
            checkpoint = self.checkpoint
        self.checkpoint = checkpoint
        name, data = make_lease(
            self.session, self.counter, self.client, self.kind, self.signer, self.cert_name, checkpoint, self.base
        )
        with interrupt.deferred():  # a lease object stored is one this lease knows to remove
            self._put(name, data)

    def _put(self, name: str, data: bytes) -> None:
        self.repo.backend.put(name, data)
        old, self.name, self.written = self.name, name, time.monotonic()
        if self.counter == 0:
            self.start_name = name
        self.counter += 1
        if old and old != self.start_name:
            self._stale.append(old)
        if self._stale and listed(self.repo, [name]):
            for n in self._stale:
                with contextlib.suppress(BunkerError, OSError):
                    self.repo.backend.delete(n)
            self._stale = []

    def refresh_if_due(self) -> None:
        if time.monotonic() - self.written >= LEASE_SECONDS / 3:
            self.write()

    def storage_time(self) -> float:
        """The storage's time for this session's newest lease object: "now" as the storage sees it."""
        info = self.repo.backend.stat(self.name)
        return info.mtime if info is not None else time.time()

    def release(self, committed: Iterable[str] = ()) -> None:
        """End the session: remove its lease objects once every name in ``committed`` (what
        others must see, e.g. its snapshot) shows in the storage's listing, waiting up to
        LISTING_WAIT for it; else leave the lease to expire. A signal meanwhile is acted on once
        the lease is gone (interrupt.deferred)."""
        with interrupt.deferred():
            self._release(committed)

    def _release(self, committed: Iterable[str]) -> None:
        try:
            if not wait_until_listed(self.repo, committed):
                # the lease stays until it expires, without a checkpoint: the run completed, so
                # nobody may turn its last checkpoint into an incomplete snapshot
                self.checkpoint = None
                self.write()
                return
        except BunkerError:
            return  # the storage went away: the lease expires
        for n in [*self._stale, self.name, self.start_name]:
            if n:
                with contextlib.suppress(BunkerError, OSError):
                    self.repo.backend.delete(n)


def wait_until_listed(repo: Repository, names: Iterable[str]) -> bool:
    """Wait up to LISTING_WAIT until every one of ``names`` shows in the storage's listings (on
    storage whose listings lag, usually a moment; at once elsewhere). True if they do."""
    names = list(names)
    wait = 0.05
    deadline = time.monotonic() + LISTING_WAIT
    while not listed(repo, names):
        if time.monotonic() + wait >= deadline:
            return False
        time.sleep(wait)
        wait = min(wait * 2, 2.0)
    return True


def listed(repo: Repository, names: Iterable[str]) -> bool:
    """True if every one of ``names`` shows in a listing of its prefix."""
    by_prefix: dict[str, set[str]] = {}
    for n in names:
        by_prefix.setdefault(n.split("/", 1)[0] + "/", set()).add(n)
    return all(want <= {i.name for i in repo.backend.list(prefix)} for prefix, want in by_prefix.items())


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
    checkpoint: dict[str, Any] | None  # from its newest lease (format 2 only)
    counter: int = 0  # of its newest lease
    base: ChainBase | None = None  # the chain head it started from (format 2 only)

    def alive(self, now: float) -> bool:
        return now - self.refreshed < self.expires_after and now - self.started < MAX_SESSION_SECONDS


def sessions(repo: Repository, problems: list[tuple[str, str]] | None = None) -> list[Session]:
    """Every session whose newest lease object verifies: signed by a certificate of this
    repository that is not revoked, and named as its body says. Others protect nothing and
    are skipped (``problems`` collects (object, why) for `bunker check`)."""
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
            body, signer = parse_lease(data, newest[1])
        except ObjectMissing:
            continue  # just replaced by a refresh: the next listing sees it
        except encoding.FormatError as exc:
            if problems is not None:
                problems.append((newest[1], f"lease not usable: {exc}"))
            continue
        why = _not_authentic(repo, data, signer)
        if why:
            if problems is not None:
                problems.append((newest[1], why))
            continue
        base = lease_base(body)
        # a format-1 lease (written before the migration) still says its session is alive, but its
        # checkpoint was sealed without the format-2 binding and is never turned into a snapshot
        cp = body.get("checkpoint") if base is not None else None
        expires = float(min(max(int(body["expires_after"]), 60), MAX_LEASE_SECONDS))
        started = objs[0][2] if objs[0][0] == 0 else min(o[2] for o in objs)
        refreshed = max(o[2] for o in objs)
        kind, client = str(body.get("kind", "")), str(body.get("client"))
        names = tuple(o[1] for o in objs)
        out.append(
            Session(
                sid,
                started,
                refreshed,
                expires,
                kind,
                client,
                names,
                signer,
                cp if isinstance(cp, dict) else None,
                newest[0],
                base,
            )
        )
    return out


def lease_problem(repo: Repository, data: bytes, signer: str) -> str:
    """Why a lease's bytes do not count ("" when signed by ``signer``, a valid certificate that
    is not revoked): for leases carried in other records (repo/checkpoint_roots.py)."""
    return _not_authentic(repo, data, signer)


def _not_authentic(repo: Repository, data: bytes, signer: str) -> str:
    """Why the lease ``data`` does not count ("" when it is signed by the valid, not revoked
    certificate ``signer``)."""
    if not signer:
        return "lease not signed by a client"
    if signer in repo.revoked:
        return "lease of a revoked client: it protects nothing"
    try:
        obj = parse_signed(data, MAGIC_SESSION)
        verify(repo.certificate(signer).verify_key, MAGIC_SESSION, obj.body_bytes, obj.sig)
    except (encoding.FormatError, BadSignature) as exc:
        return f"lease not authentic: {exc}"
    except (CorruptObject, ObjectMissing) as exc:
        return f"lease signed by an unusable certificate: {exc.message}"
    return ""
