"""Status records (docs/format.md section 25; docs/hierarchy.md, "Status of the clients").

Every backup run, a failed one included, leaves one record under ``status/``, signed by the
client's certificate: which run it was, when, its level and exit code, its snapshot, numbers and
event codes. Nothing in the readable part is text a user wrote or a path: those (the run's
messages) are sealed to the master key. Records of one certificate form a chain (``seq`` and
``prev``), so an old ``ok`` cannot be passed off as the newest: the newest is the highest number
whose signature verifies. Records travel up through nodes with the data, so the top (and every
node on the way) can tell which clients ran, how it went, and which fell silent, without a key.

A client that could not run at all (its put key unusable: it cannot sign) tells the node it
backs up through, and the node signs the record for it (``reporter``: the node's id; verified
with the node's certificate). Such reports are numbered per node and client, apart from the
client's own chain, and show as the client's last run when they are newer than its own record.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bunker import encoding
from bunker.crypto import aead
from bunker.crypto.kem import DataPrivateKey, DataPublicKey, OpenFailed
from bunker.crypto.sign import BadSignature, Signer, verify
from bunker.errors import CorruptObject, ObjectMissing
from bunker.repo.node_certs import trusted_node
from bunker.repo.objects import check_ref, make_signed, parse_signed
from bunker.repo.policy import read_policies
from bunker.repo.repository import Repository
from bunker.runlog import LEVELS

MAGIC_STATUS = b"BKST"
TEXT_INFO = b"bunker status text v1\x00"
RUNS = ("backup",)  # the runs that leave status records
MAX_CODES = 64  # distinct event codes a record counts (the rest are counted under "other")


@dataclass(frozen=True)
class StatusRecord:
    """A decoded status record (``verified``: its signature checked against its certificate)."""

    name: str  # status/<hex>
    cert: str  # clients/<hex>
    seq: int
    prev: str  # status/<hex>, "" exactly for seq 1
    run: str
    started: float
    ended: float
    level: str
    exit: int
    snapshot: str  # snapshots/<hex>, "" when the run stored none
    snapshot_seq: int
    complete: bool
    counts: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    policy: int = 0  # the policy version the run applied (0: none)
    sealed_key: bytes = b""
    text: bytes = b""
    reporter: str = ""  # the id of the node that signed it for a client that could not run ("": the client)

    def aad(self, repo_id: str) -> bytes:
        """What the sealed text is bound to: this repository, certificate and number."""
        return TEXT_INFO + encoding.pack([repo_id, self.cert, self.seq])


def make_status(
    *,
    repo_id: str,
    cert: str,
    signer: Signer,
    data_public: DataPublicKey,
    seq: int,
    prev: str,
    run: str,
    started: float,
    ended: float,
    level: str,
    exit_code: int,
    snapshot: str = "",
    snapshot_seq: int = 0,
    complete: bool = False,
    counts: Mapping[str, int] | None = None,
    events: Iterable[Mapping[str, Any]] = (),
    policy: int = 0,
    reporter: str = "",
) -> bytes:
    """One signed status record. ``events``: the run's events (level, code, message, path):
    their codes are counted in the readable part, their messages sealed to the master key.
    ``reporter``: the id of the node whose key ``signer`` is, reporting for a client that could
    not run."""
    events = list(events)
    codes: dict[str, int] = {}
    for e in events:
        code = str(e.get("code", "other"))
        key = code if code in codes or len(codes) < MAX_CODES else "other"
        codes[key] = codes.get(key, 0) + 1
    probe = StatusRecord("", cert, seq, prev, run, started, ended, level, exit_code, snapshot, snapshot_seq, complete)
    text_key = os.urandom(32)
    body = {
        "v": 1,
        "repo": repo_id,
        "cert": cert,
        "seq": seq,
        "prev": prev,
        "run": run,
        "started": float(started),
        "ended": float(ended),
        "level": level,
        "exit": int(exit_code),
        "snapshot": snapshot,
        "snapshot_seq": int(snapshot_seq),
        "complete": bool(complete),
        "counts": {str(k): int(v) for k, v in sorted((counts or {}).items())},
        "codes": dict(sorted(codes.items())),
        "policy": int(policy),
        "sealed_key": data_public.seal(text_key, TEXT_INFO + repo_id.encode()),
        "text": aead.encrypt(text_key, encoding.pack([dict(e) for e in events]), probe.aad(repo_id)),
    }
    if reporter:
        body["reporter"] = reporter
    return make_signed(MAGIC_STATUS, body, signer, cert)


def parse_status(name: str, data: bytes) -> tuple[StatusRecord, Any]:
    """Decode a status record without a key (FormatError when malformed). Returns the record and
    its signed frame (for ``verify_status``)."""
    obj = parse_signed(data, MAGIC_STATUS)
    b = encoding.expect_map(obj.body)
    if encoding.field(b, "v", int) != 1:
        raise encoding.FormatError("a status record of an unknown version")
    seq = encoding.field(b, "seq", int)
    prev = encoding.field(b, "prev", str)
    if seq < 1 or (prev == "") != (seq == 1):
        raise encoding.FormatError(f"status record #{seq} with previous record {prev!r}")
    if prev:
        check_ref(prev, "status")
    level = encoding.field(b, "level", str)
    if level not in LEVELS:
        raise encoding.FormatError(f"status record with unknown level {level!r}")
    snapshot = encoding.field(b, "snapshot", str)
    if snapshot:
        check_ref(snapshot, "snapshots")
    counts = encoding.field(b, "counts", dict)
    codes = encoding.field(b, "codes", dict)
    for m in (counts, codes):
        if not all(isinstance(k, str) and type(v) is int for k, v in m.items()):
            raise encoding.FormatError("status record with a malformed count")
    cert = check_ref(encoding.field(b, "cert", str), "clients")
    if obj.signer != cert:
        raise encoding.FormatError("status record signed by another certificate than it names")
    rec = StatusRecord(
        name=name,
        cert=cert,
        seq=seq,
        prev=prev,
        run=encoding.field(b, "run", str)[:32],
        started=float(encoding.field(b, "started", (int, float))),
        ended=float(encoding.field(b, "ended", (int, float))),
        level=level,
        exit=encoding.field(b, "exit", int),
        snapshot=snapshot,
        snapshot_seq=encoding.field(b, "snapshot_seq", int),
        complete=encoding.field(b, "complete", bool),
        counts=dict(counts),
        codes=dict(codes),
        policy=_policy_version(b),
        sealed_key=encoding.field_bytes(b, "sealed_key"),
        text=encoding.field_bytes(b, "text"),
        reporter=_reporter(b),
    )
    return rec, obj


def _reporter(body: dict[str, Any]) -> str:
    """The node that signed a record for a client that could not run ("": the client itself)."""
    v = body.get("reporter", "")
    if not isinstance(v, str) or (v and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v))):
        raise encoding.FormatError("status record with a malformed reporter")
    return v


def _policy_version(body: dict[str, Any]) -> int:
    """The policy version a run applied (0: none, or a record written before runs reported it)."""
    v = body.get("policy", 0)
    if type(v) is not int or v < 0:
        raise encoding.FormatError("status record with a malformed policy version")
    return v


def verify_status(repo: Repository, name: str, data: bytes) -> StatusRecord:
    """A status record whose signature verifies with the certificate it names, for this
    repository. Raises FormatError (CorruptObject/ObjectMissing for the certificate) saying why
    it cannot be trusted."""
    rec, obj = parse_status(name, data)
    if obj.body.get("repo") != repo.repo_id:
        raise encoding.FormatError("the status record belongs to another repository")
    cert = repo.certificate(rec.cert)
    try:
        if rec.reporter:
            node = trusted_node(repo, rec.reporter)
            if node is None:
                raise encoding.FormatError(
                    f"it says node {rec.reporter[:16]} signed it, and no certificate of that node that is not revoked "
                    "is in the repository"
                )
            node.public.verify(MAGIC_STATUS, obj.body_bytes, obj.sig)
        else:
            verify(cert.verify_key, MAGIC_STATUS, obj.body_bytes, obj.sig)
    except BadSignature:
        raise encoding.FormatError("its signature does not verify (forged or altered)") from None
    return rec


def open_text(rec: StatusRecord, repo_id: str, data_private: DataPrivateKey) -> list[dict[str, Any]]:
    """The run's events, messages and paths included (master key)."""
    try:
        key = data_private.open(rec.sealed_key, TEXT_INFO + repo_id.encode())
        plain = aead.decrypt(key, rec.text, rec.aad(repo_id))
    except (OpenFailed, aead.DecryptionFailed):
        raise encoding.FormatError("its sealed text does not open with the master key (altered or moved)") from None
    events = encoding.unpack(plain)
    if not isinstance(events, list):
        raise encoding.FormatError("its sealed text is malformed")
    return [e for e in events if isinstance(e, dict)]


@dataclass
class ClientStatus:
    """What the status records of one certificate say."""

    cert: str
    client: str
    newest: StatusRecord | None = None
    reported: StatusRecord | None = None  # the newest record a node signed for it (it could not run)
    records: int = 0
    problems: list[str] = field(default_factory=list)  # records that do not verify or link
    problem_objects: list[str] = field(default_factory=list)  # the record each problem is about


def client_statuses(repo: Repository) -> dict[str, ClientStatus]:
    """Per client certificate: its newest verified status record and the problems found (a
    record that does not verify, two records with one number, a link to a record not there)."""
    out: dict[str, ClientStatus] = {}
    by_cert: dict[str, dict[int, list[StatusRecord]]] = {}
    reports: dict[str, list[StatusRecord]] = {}
    for info in repo.backend.list("status/"):
        try:
            rec = verify_status(repo, info.name, repo.backend.get(info.name))
        except ObjectMissing:
            continue
        except (encoding.FormatError, CorruptObject) as exc:
            msg = exc.message if isinstance(exc, CorruptObject) else str(exc)
            bad = out.setdefault("", ClientStatus("", ""))
            bad.problems.append(f"{info.name}: {msg}")
            bad.problem_objects.append(info.name)
            continue
        if rec.reporter:  # a node's report for a client that could not run: numbered apart
            reports.setdefault(rec.cert, []).append(rec)
            continue
        by_cert.setdefault(rec.cert, {}).setdefault(rec.seq, []).append(rec)
    for cert, recs in reports.items():
        st = out.setdefault(cert, ClientStatus(cert, _client_of(repo, cert)))
        st.reported = max(recs, key=lambda r: (r.ended, r.seq, r.name))
    for cert, chain in by_cert.items():
        st = out.setdefault(cert, ClientStatus(cert, _client_of(repo, cert)))
        st.records = sum(len(v) for v in chain.values())
        for seq, recs in sorted(chain.items()):
            if len(recs) > 1:
                st.problems.append(f"two status records #{seq} ({', '.join(r.name for r in recs)})")
                st.problem_objects.append(recs[-1].name)
            for r in recs:
                if r.seq > 1 and (r.seq - 1) in chain and r.prev not in {p.name for p in chain[r.seq - 1]}:
                    st.problems.append(f"{r.name} (#{r.seq}) does not link to the record #{r.seq - 1} there")
                    st.problem_objects.append(r.name)
                elif r.seq > 1 and (r.seq - 1) not in chain:
                    # a machine that lost its state starts again at #1: it never leaves a gap; the
                    # record it names was deleted, or is withheld (or still on its way up)
                    missing = f"record #{r.seq - 1} ({r.prev}), which is not here"
                    st.problems.append(f"{r.name} (#{r.seq}) links to {missing}")
                    st.problem_objects.append(r.name)
        # the newest run by its time: a machine that lost its state starts again at #1, and its
        # new records must not hide behind the old chain's higher numbers
        st.newest = max((r for recs in chain.values() for r in recs), key=lambda r: (r.ended, r.seq, r.name))
    return out


def _client_of(repo: Repository, cert: str) -> str:
    try:
        return repo.certificate(cert).client
    except (CorruptObject, ObjectMissing):
        return cert


SILENT_AFTER = 3 * 86400.0  # a client whose newest record is older than this has fallen silent


def status_rows(
    repo: Repository, now: float, silent_after: float | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per client certificate (those with no record yet too) for `bunker status` and
    `bunker node status`, and the records that could not be trusted. A row's ``silent`` is true
    when its newest record ended more than ``silent_after`` seconds before ``now`` (or there is
    none); without ``silent_after``, each client's limit is the policy's ``silent-after`` for it
    (repo/policy.py), else ``SILENT_AFTER``."""
    policy = read_policies(repo).current if silent_after is None else None
    statuses = client_statuses(repo)
    bad = statuses.pop("", ClientStatus("", "")).problems
    revoked = repo.revoked
    rows: list[dict[str, Any]] = []
    certs = {c.name: c for c in repo.certificates()}
    for name in sorted(set(certs) | set(statuses)):
        st = statuses.get(name)
        client = certs[name].client if name in certs else (st.client if st else name)
        row: dict[str, Any] = {"client": client, "cert": name, "revoked": name in revoked, "records": 0}
        if st is not None and (st.newest is not None or st.reported is not None):
            r = st.newest
            if st.reported is not None and (r is None or st.reported.ended > r.ended):
                r = st.reported  # the client could not run since its own last record: its node said so
                node = trusted_node(repo, r.reporter)
                row["reported_by"] = node.node if node is not None else r.reporter
            assert r is not None
            row.update(
                records=st.records,
                seq=r.seq,
                run=r.run,
                ended=r.ended,
                level=r.level,
                exit=r.exit,
                snapshot=r.snapshot,
                snapshot_seq=r.snapshot_seq,
                complete=r.complete,
                codes=r.codes,
                counts=r.counts,
                policy=r.policy,
            )
        row["problems"] = list(st.problems) if st else []
        ended = row.get("ended")
        limit = silent_after
        if limit is None:
            limit = float(policy.settings_for(client).get("silent-after", SILENT_AFTER)) if policy else SILENT_AFTER
        row["silent_after"] = limit
        row["silent"] = not row["revoked"] and (ended is None or now - float(ended) > limit)
        rows.append(row)
    return rows, bad


def status_problems(repo: Repository) -> list[tuple[str, str, str]]:
    """What `bunker check` reports of status records: (object, problem, level). A record that
    does not verify is refused (err: altered, forged or another repository's); a broken chain
    of one client's records is a warning (a machine that lost its state starts again at #1)."""
    out = []
    for cert, st in client_statuses(repo).items():
        for obj, why in zip(st.problem_objects, st.problems, strict=True):
            if cert == "":
                out.append((obj, f"status record refused: {why.split(': ', 1)[1]}", "err"))
            else:
                out.append((obj, f"client {st.client!r}: {why} (a machine that lost its state, or a copy)", "warn"))
    return out
