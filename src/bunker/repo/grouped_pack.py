"""Packs whose blobs were encrypted and wrapped by other processes (a backup's small-file workers).

Each worker process keeps one key group (pack.KeyGroup) for its life and wraps every blob key it
makes under it; for a batch of files it hands over a :class:`GroupRun`: its sealed group key, the
encrypted blobs back to back and one trailer row per blob. The main process only drops blobs it
already holds and appends runs to a :class:`GroupedPackWriter`, which lays the pack out as one
key group per worker (FORMAT.md 10.1: the sealed key, then that group's blobs). So a blob costs
the main process a dedup check and a row, not a pickled copy of its bytes and a key wrap.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import blake3

from bunker.crypto.derive import PutSecrets
from bunker.crypto.sign import SigningKey
from bunker.repo.pack import HEADER, KeyGroup, seal_tail

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
    """Builds one pack out of runs of worker-made blobs: one key group per sealed key, in the
    order the groups were first added, each group's blobs in the order added. Offsets are known
    only when the pack is finished. Not thread-safe: the caller serializes ``add``."""

    def __init__(self, kind: str, secrets: PutSecrets, signer: SigningKey, cert_name: str) -> None:
        self.kind = kind
        self._secrets, self._signer, self._cert = secrets, signer, cert_name
        self._groups: dict[bytes, tuple[list[bytes], list[Row]]] = {}
        self.size = len(HEADER)
        self._count = 0
        self._locations: list[tuple[bytes, int, int, int]] = []

    def __len__(self) -> int:
        return self._count

    def add(self, sealed: bytes, data: bytes, rows: list[Row]) -> None:
        """Append blobs (``data``, back to back, described by ``rows``) under group ``sealed``."""
        if sum(r[1] for r in rows) != len(data):
            raise ValueError("the blobs' lengths do not add up to the run's data")
        group = self._groups.get(sealed)
        if group is None:
            group = self._groups[sealed] = ([], [])
            self.size += len(sealed)
        group[0].append(data)
        group[1].extend(rows)
        self.size += len(data)
        self._count += len(rows)

    def locations(self) -> list[tuple[bytes, int, int, int]]:
        """(chunk id, offset, length, raw length) of each blob, in pack order (after finish)."""
        return self._locations

    def finish(self) -> tuple[str, bytes]:
        """Lay the groups out, seal the trailer, sign, and return (hex name, pack bytes)."""
        parts: list[bytes] = [HEADER]
        groups: list[list[object]] = []
        locations: list[tuple[bytes, int, int, int]] = []
        pos = len(HEADER)
        for sealed, (datas, rows) in self._groups.items():
            groups.append([pos, len(sealed), rows])
            parts.append(sealed)
            pos += len(sealed)
            for row in rows:
                locations.append((row[0], pos, row[1], row[2]))
                pos += row[1]
            parts.extend(datas)
        hasher = blake3.blake3()
        for part in parts:
            hasher.update(part)
        tail = seal_tail(hasher.digest(), self.kind, groups, self._secrets, self._signer, self._cert)
        hasher.update(tail)
        parts.append(tail)
        self._groups = {}
        self._locations = locations
        return hasher.hexdigest(), b"".join(parts)
