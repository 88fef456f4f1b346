"""Packs whose blobs were encrypted and wrapped by other processes (a backup's small-file workers).

Each worker process keeps one key group (pack.KeyGroup) for its life and wraps every blob key it
makes under it; for a batch of files it hands over a :class:`GroupRun`: its sealed group key, the
encrypted blobs back to back and one trailer row per blob. The main process only drops blobs it
already holds and appends runs to the :class:`GroupedPackWriter` of that worker: each worker's
blobs fill packs of their own, one key group each (FORMAT.md 10.1: the sealed key, then its
blobs), so a pack is written out run by run as the runs come. So a blob costs the main process a
dedup check and a row, not a pickled copy of its bytes and a key wrap.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import SigningKey
from bunker.repo.pack import HEADER, KeyGroup, seal_tail
from bunker.repo.pack_body import FinishedPack, PackBody
from bunker.storage.staged import StagedFile

# a trailer row (FORMAT.md 10.3): [chunk id, length, raw length, wrapped key]
Row = list[Any]


class GroupRun(NamedTuple):
    """Blobs one worker made for one batch, all under the key group sealed as ``sealed``."""

    sealed: bytes
    data: bytes  # the encrypted blobs back to back, in ``rows`` order
    rows: list[Row]


class GroupRunBuilder:
    """Collects a batch's blobs in a worker process (each chunk at most once per batch)."""

    def __init__(self, group: KeyGroup) -> None:
        self._group = group
        self._parts: list[bytes | bytearray] = []
        self._rows: list[Row] = []
        self._seen: set[bytes] = set()

    def __contains__(self, cid: bytes) -> bool:
        return cid in self._seen

    def add(self, cid: bytes, ct: bytes | bytearray, raw_length: int, k_blob: bytes) -> None:
        """Add one encrypted blob (a chunk already added is ignored)."""
        if cid in self._seen:
            return
        self._seen.add(cid)
        self._parts.append(ct)
        self._rows.append([cid, len(ct), raw_length, self._group.wrap(k_blob)])

    def take(self) -> GroupRun:
        """The run so far; the builder starts empty again."""
        run = GroupRun(self._group.sealed, b"".join(self._parts), self._rows)
        self._parts, self._rows, self._seen = [], [], set()
        return run


class GroupedPackWriter:
    """Builds one pack out of runs of one worker's blobs: a single key group, its sealed key
    first, the runs in the order added (each worker fills packs of its own, so a pack can be
    written out run by run: in ``staged``, see repo/pack_body.py, or in memory). Not
    thread-safe: the caller serializes ``add``."""

    def __init__(
        self,
        kind: str,
        secrets: PutSecrets,
        signer: SigningKey,
        cert_name: str,
        sealed: bytes,
        staged: StagedFile | None = None,
    ) -> None:
        self.kind = kind
        self._secrets, self._signer, self._cert = secrets, signer, cert_name
        self.sealed = sealed
        self._body = PackBody(staged)
        self._body.append(HEADER)
        self._body.append(sealed)
        self._rows: list[Row] = []
        self._locations: list[tuple[bytes, int, int, int]] = []

    @property
    def size(self) -> int:
        return self._body.size

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, sealed: bytes, data: bytes, rows: list[Row]) -> None:
        """Append blobs (``data``, back to back, described by ``rows``) made under ``sealed``."""
        if sealed != self.sealed:
            raise ValueError("a run of another key group: each worker's blobs go into packs of their own")
        if sum(r[1] for r in rows) != len(data):
            raise ValueError("the blobs' lengths do not add up to the run's data")
        pos = self._body.size
        for row in rows:
            self._locations.append((row[0], pos, row[1], row[2]))
            pos += row[1]
        self._rows.extend(rows)
        self._body.append(data)

    def locations(self) -> list[tuple[bytes, int, int, int]]:
        """(chunk id, offset, length, raw length) of each blob, in pack order."""
        return self._locations

    def seal(self) -> FinishedPack:
        """Seal the trailer and sign: the pack's name and its bytes or its sealed file."""
        groups: list[list[object]] = [[len(HEADER), len(self.sealed), self._rows]]
        return self._body.seal(
            lambda body_hash: seal_tail(body_hash, self.kind, groups, self._secrets, self._signer, self._cert)
        )

    def discard(self) -> None:
        """Drop the pack (nothing of it is stored)."""
        self._body.discard()
