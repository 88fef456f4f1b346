"""Turning a finished (or interrupted) session into a snapshot: flush packs and index, write
the pack set and chunk set, seal the body, sign the envelope, extend the client's chain."""

from __future__ import annotations

import time
from typing import Any

import blake3

from bunker.backup import chunkset_memo
from bunker.backup.link import ChainWriter, Committed, chain_head
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError, ExitCode
from bunker.repo import refs
from bunker.repo.certs import Certificate
from bunker.repo.chunk_id_set import ChunkIdSet
from bunker.repo.leases import Lease
from bunker.repo.repository import Repository
from bunker.repo.session_writer import SessionWriter
from bunker.repo.snapshot import FINAL, BodyBinding, Envelope, make_snapshot, path_set_id, seal_body
from bunker.runlog import RunLog

__all__ = ["Committed", "chain_head", "commit_snapshot"]


def commit_snapshot(
    repo: Repository,
    put: PutKey,
    cert: Certificate,
    writer: SessionWriter,
    *,
    root: bytes,
    chunk_ids: ChunkIdSet,
    stats: dict[str, int],
    log: RunLog,
    body_extra: dict[str, Any],
    state_dir: str,
    session: str,
    complete: bool = True,
    master_on_client: bool = False,
    lease: Lease | None = None,
    cache_dir: str | None = None,
) -> Committed:
    """Write everything the snapshot needs, then the snapshot itself (the final one of
    ``session``, whose lease is ``lease``) as the next link of the client's chain. With the
    client's ``cache_dir``, the chunk set of the last snapshot is named again when its root is
    this one's, and its parts that this set shares are (backup/chunkset_memo.py)."""
    writer.flush()
    pack_names, missing = writer.index.locations.locate_many(chunk_ids.sorted_ids())
    if missing:
        raise BunkerError(
            f"{len(missing)} chunks of this backup are not in the index after flushing",
            "this is a bug in bunker; please report it. No snapshot was written",
            exit_code=ExitCode.FATAL,
        )
    packset = refs.build_packset(pack_names)
    _put_refs(repo, packset)
    count = len(chunk_ids)
    memo = chunkset_memo.recall(cache_dir) if cache_dir else None
    if memo is not None and memo.usable(repo, root, count):
        chunkset_name = memo.top
    else:
        chunkset, layout = chunkset_memo.build(repo, chunk_ids, put.secrets, memo)
        _put_refs(repo, chunkset)
        chunkset_name = refs.top_name(chunkset)
        if cache_dir:
            chunkset_memo.remember(cache_dir, root, chunkset_name, layout, count)
    stats = dict(stats)
    stats.update(
        chunks=count,
        chunks_new=writer.chunks_added,
        bytes_new=writer.raw_added,
        stored_new=writer.bytes_added,
        packs_new=len(writer.packs_written),
        packs=len(pack_names),
    )
    with ChainWriter(repo, put, cert, state_dir, session, log, lease) as chain:
        chain.head()  # a rollback is reported in the run's log before the log is sealed
        body = {
            "root": root,
            "log": [e.to_dict() for e in log.events],
            **body_extra,
        }
        level = log.level  # of the sealed log: a wait for another run of this client is reported outside it
        binding = BodyBinding(repo.repo_id, cert.name, put.secrets.domain_id, session, FINAL)
        sealed, body_ct = seal_body(body, put.data_public, binding)

        def make(seq: int, prev: str) -> tuple[Envelope, bytes]:
            env = Envelope(
                repo_id=repo.repo_id,
                client=cert.client,
                cert=cert.name,
                seq=seq,
                prev=prev,
                time=time.time(),
                level=level,
                complete=complete,
                stats=stats,
                packset=refs.top_name(packset),
                chunkset=chunkset_name,
                domain=put.secrets.domain_id,
                body_hash=blake3.blake3(body_ct).digest(),
                sealed_key=sealed,
                master_on_client=master_on_client,
                session=session,
                counter=FINAL,
                path_set=path_set_id(put.secrets, body_extra["paths"]),
            )
            return env, make_snapshot(env, body_ct, put.client_key)

        return chain.append(make)


def _put_refs(repo: Repository, objects: dict[str, bytes]) -> None:
    """Store a set's objects (built by refs.build_packset or refs.build_chunkset)."""
    for name, data in objects.items():
        if name != "top":
            repo.put_object("refs", data)
