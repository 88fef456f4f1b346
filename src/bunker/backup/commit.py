"""Turning a finished (or interrupted) session into a snapshot: flush packs and index, write
the pack set and chunk set, seal the body, sign the envelope, extend the client's chain."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import blake3

from bunker.backup.chain import ChainHead, load_head, save_head
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, ExitCode, ObjectMissing
from bunker.repo import refs
from bunker.repo.certs import Certificate
from bunker.repo.objects import name_for
from bunker.repo.other_secret import certificate_domains, snapshot_with_other_secret
from bunker.repo.records import ChainBase
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.snapshot import FINAL, BodyBinding, Envelope, make_snapshot, path_set_id, seal_body
from bunker.runlog import RunLog


@dataclass(frozen=True)
class Committed:
    name: str
    seq: int
    level: str
    stats: dict[str, int]
    head_problem: str = ""  # why this machine could not remember the new chain head, if it could not


def chain_head(repo: Repository, cert: Certificate, state_dir: str) -> tuple[ChainBase, tuple[str, str] | None]:
    """The head of this client's chain (what its next snapshot extends), and a warning (code,
    message) when the repository is behind the head the client remembers: snapshots were deleted
    or the repository was rolled back (the chain keeps pointing at the remembered head), or the
    remembered head was written with a damaged put key."""
    mine = load_head(state_dir)
    if mine is not None and repo.backend.capabilities().partial:
        # the repository is unreachable and its spool holds only this client's offline
        # snapshots: the remembered head is the chain's head
        return ChainBase(mine.seq, mine.name), None
    repo_head = repo.client_head(cert.name)
    rseq = repo_head.snap.env.seq if repo_head else 0
    if mine is not None and mine.seq > rseq and _with_other_secret(repo, mine.name):
        return ChainBase(mine.seq, mine.name), (
            "damaged-key-snapshot",
            f"this client's last snapshot #{mine.seq} ({mine.name}) was written with another secret: its put key was "
            "damaged then (an older bunker did not check), so nobody can restore it; this run stores again what it "
            "held, and `bunker prune` with a prune-capable key retires it",
        )
    if mine is not None and mine.seq > rseq:
        return ChainBase(mine.seq, mine.name), (
            "chain-rollback",
            f"the repository's newest snapshot of this client is #{rseq}, but this client wrote #{mine.seq} "
            f"({mine.name}): snapshots were deleted or the repository was rolled back. Run `bunker check` and "
            "compare with a mirror; the new snapshot continues the remembered chain",
        )
    if repo_head is None:
        return ChainBase(0, ""), None
    return ChainBase(rseq, repo_head.name), None


def _with_other_secret(repo: Repository, name: str) -> bool:
    """Whether the snapshot ``name`` is listed and was written with a damaged put key."""
    try:
        snap = repo.parsed_snapshot(name)
    except ObjectMissing:
        return False
    return snap is not None and snapshot_with_other_secret(repo, snap, certificate_domains(repo))


def next_link(repo: Repository, cert: Certificate, state_dir: str, log: RunLog) -> tuple[int, str]:
    """(sequence number, previous snapshot name) for this client's next snapshot (chain_head;
    a rollback is reported in the run's log)."""
    head, warning = chain_head(repo, cert, state_dir)
    if warning:
        log.add("warn", *warning)
    return head.seq + 1, head.prev


def commit_snapshot(
    repo: Repository,
    put: PutKey,
    cert: Certificate,
    writer: SessionWriter,
    *,
    root: bytes,
    chunk_ids: set[bytes],
    stats: dict[str, int],
    log: RunLog,
    body_extra: dict[str, Any],
    state_dir: str,
    session: str,
    complete: bool = True,
    master_on_client: bool = False,
) -> Committed:
    """Write everything the snapshot needs, then the snapshot itself (the final one of
    ``session``)."""
    writer.flush()
    locs = writer.index.locations
    missing = [c for c in chunk_ids if c not in locs]
    if missing:
        raise BunkerError(
            f"{len(missing)} chunks of this backup are not in the index after flushing",
            "this is a bug in bunker; please report it. No snapshot was written",
            exit_code=ExitCode.FATAL,
        )
    pack_names = {locs[c].pack for c in chunk_ids}
    packset = refs.build_packset(pack_names)
    chunkset = refs.build_chunkset(chunk_ids, put.secrets)
    for objs in (packset, chunkset):
        for name, data in objs.items():
            if name != "top":
                repo.put_object("refs", data)
    seq, prev = next_link(repo, cert, state_dir, log)
    stats = dict(stats)
    stats.update(
        chunks=len(chunk_ids),
        chunks_new=writer.chunks_added,
        bytes_new=writer.raw_added,
        stored_new=writer.bytes_added,
        packs_new=len(writer.packs_written),
        packs=len(pack_names),
    )
    body = {
        "root": root,
        "log": [e.to_dict() for e in log.events],
        **body_extra,
    }
    binding = BodyBinding(repo.repo_id, cert.name, put.secrets.domain_id, session, FINAL)
    sealed, body_ct = seal_body(body, put.data_public, binding)
    env = Envelope(
        repo_id=repo.repo_id,
        client=cert.client,
        cert=cert.name,
        seq=seq,
        prev=prev,
        time=time.time(),
        level=log.level,
        complete=complete,
        stats=stats,
        packset=refs.top_name(packset),
        chunkset=refs.top_name(chunkset),
        domain=put.secrets.domain_id,
        body_hash=blake3.blake3(body_ct).digest(),
        sealed_key=sealed,
        master_on_client=master_on_client,
        session=session,
        counter=FINAL,
        path_set=path_set_id(put.secrets, body_extra["paths"]),
    )
    return write_snapshot(repo, put, env, body_ct, state_dir)


def write_snapshot(repo: Repository, put: PutKey, env: Envelope, body_ct: bytes, state_dir: str) -> Committed:
    """Sign and store a snapshot, and remember it as this client's chain head."""
    data = make_snapshot(env, body_ct, put.client_key)
    name = name_for("snapshots", data)
    repo.backend.put(name, data)
    try:
        save_head(state_dir, ChainHead(env.seq, name, env.cert))
    except OSError as exc:
        # the snapshot is stored: only this machine's witness of it is missing (a full disk)
        return Committed(
            name,
            env.seq,
            env.level,
            env.stats,
            f"this machine could not remember snapshot #{env.seq} as its chain head in {state_dir} "
            f"({exc.strerror or exc}): the snapshot is stored, but deleting it from the repository would go "
            "unnoticed here until the next run; free space on that disk",
        )
    return Committed(name, env.seq, env.level, env.stats)
