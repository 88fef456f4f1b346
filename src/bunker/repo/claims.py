"""Claims of sequence numbers (docs/format.md section 15): two runs of one client never sign two
snapshots with one number, on one machine or on two.

Before a run signs snapshot #n of its certificate's chain it creates the claim
``sessions/<claim id>.<round>`` with the storage's create-if-absent. The claim id is derived from
the certificate and n, so every run that wants #n tries the same name and only one creates it. A
claim is a lease (kind ``claim``, signed by the chain's certificate) whose ``base`` is the head it
extends and whose ``claim`` names the number and the session that holds it. The holder then reads
the chain head again and withdraws if #n appeared meanwhile; it deletes the claim once its
snapshot is listed. A run that finds #n claimed by a live session waits for it, then takes the
next number.

A claim whose holder died is superseded by the next round, ``<claim id>.<round + 1>``, created
the same way: nobody breaks or removes anything to take over. The holder is dead when its session
ended (no lease of it is listed, or its lease expired by the storage's time), or when the machine
it ran on knows its process is gone (the caller decides, see backup/link.py). An object under a
claim's name that is not a claim of that number by the chain's own certificate holds nothing.
Dead claims are leases without a checkpoint: prune and the client's next run remove them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from bunker import encoding
from bunker.crypto.sign import BadSignature, SigningKey, verify
from bunker.errors import BunkerError, ObjectMissing
from bunker.repo.certs import Certificate
from bunker.repo.objects import MAGIC_SESSION, parse_signed
from bunker.repo.records import ChainBase, lease_name, make_lease, parse_lease
from bunker.repo.repository import Repository

CLAIM_KIND = "claim"
# Storage without a conditional write (B2, WebDAV, a FAT disk) checks, then writes: two runs may
# both write the same claim, the later one replacing the earlier. Each reads its claim back after
# this pause, and only the one whose claim is still there goes on.
READ_BACK_PAUSE = 1.0


def claim_id(cert: str, seq: int) -> str:
    """The session part of the name of every claim of #``seq`` in the chain of ``cert``."""
    material = b"bunker chain claim v1\x00" + cert.encode() + b"\x00" + str(seq).encode()
    return blake3.blake3(material).hexdigest()[:24]


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: the claim object and the session named in it ("" when the object is
    no valid claim of that number: it holds nothing)."""

    name: str
    session: str


class Claims:
    """The claims of ``session`` on the chain of ``cert`` in ``repo``."""

    def __init__(self, repo: Repository, signer: SigningKey, cert: Certificate, session: str) -> None:
        self.repo, self.signer, self.cert, self.session = repo, signer, cert, session

    def take(self, seq: int, prev: str, dead: Callable[[Holder], bool]) -> str | Holder:
        """Claim #``seq`` (extending ``prev``): the claim's name, or the live holder of the
        number (``dead`` tells whether a holder's run has ended)."""
        cid = claim_id(self.cert.name, seq)
        rounds = self._rounds(cid)
        k = rounds[-1] if rounds else 0
        while True:
            name, data = make_lease(
                cid,
                k,
                self.cert.client,
                CLAIM_KIND,
                self.signer,
                self.cert.name,
                base=ChainBase(seq - 1, prev),
                claim={"seq": seq, "session": self.session},
            )
            if self.repo.backend.put(name, data, if_absent=True) and self._still_mine(name, data):
                return name
            holder = self.holder(name, seq)
            if holder is None:
                continue  # withdrawn meanwhile: try the same round again
            if holder.session == self.session:
                return name  # our own (a retried write whose answer was lost)
            if not dead(holder):
                return holder
            k += 1

    def holder(self, name: str, seq: int) -> Holder | None:
        """The holder of the claim object ``name`` of #``seq`` (None when there is no object)."""
        try:
            data = self.repo.backend.get(name)
        except ObjectMissing:
            return None
        return Holder(name, self._claimant(data, name, seq))

    def release(self, seq: int, mine: str = "") -> None:
        """Delete every round of the claim of #``seq`` (``mine`` too, should the listing not show
        it yet): its snapshot is listed, or the run withdrew."""
        cid = claim_id(self.cert.name, seq)
        names = {lease_name(cid, k) for k in self._rounds(cid)} | ({mine} if mine else set())
        for n in sorted(names, reverse=True):
            with contextlib.suppress(BunkerError, OSError):
                self.repo.backend.delete(n)

    def _rounds(self, cid: str) -> list[int]:
        out = []
        for info in self.repo.backend.list("sessions/"):
            sid, _, counter = info.name.split("/", 1)[1].rpartition(".")
            if sid == cid and counter.isdigit():
                out.append(int(counter))
        return sorted(out)

    def _still_mine(self, name: str, data: bytes) -> bool:
        """On storage without a conditional write, read the claim back after a pause."""
        if self.repo.backend.capabilities().create_if_absent:
            return True
        time.sleep(READ_BACK_PAUSE)
        try:
            return self.repo.backend.get(name) == data
        except ObjectMissing:
            return False

    def _claimant(self, data: bytes, name: str, seq: int) -> str:
        """The session a claim object names, if it is a claim of #``seq`` signed by this chain's
        certificate ("" otherwise: such an object holds nothing)."""
        try:
            body, signer = parse_lease(data, name)
            obj = parse_signed(data, MAGIC_SESSION)
            verify(self.cert.verify_key, MAGIC_SESSION, obj.body_bytes, obj.sig)
            claim = encoding.expect_map(encoding.field(body, "claim", dict), "seq", "session")
            number = claim["seq"]
            if signer != self.cert.name or body.get("kind") != CLAIM_KIND or type(number) is not int or number != seq:
                return ""
            return str(encoding.field(claim, "session", str))
        except (encoding.FormatError, BadSignature):
            return ""
