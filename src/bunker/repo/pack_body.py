"""The bytes of a pack being built: in a staged file when the backend gives one, else in memory.

A backup's open packs and those on their way up were ~45 MB of its main process when held in
memory (docs/performance.md, "Another machine"); a staged file (storage/staged.py) takes each
blob as it comes instead. A file that cannot take more (its disk filled up, an I/O error) is
read back and the pack goes on in memory: the repository may have room the staging disk lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import blake3

from bunker.errors import BunkerError, ExitCode
from bunker.storage.staged import StagedFile


class FinishedPack(NamedTuple):
    """A sealed pack: its name and either its bytes or the sealed file that holds them."""

    name: str
    data: bytes | None
    staged: StagedFile | None
    size: int


class PackBody:
    """Collects a pack's bytes in order. Not thread-safe: the caller serializes ``append``."""

    def __init__(self, staged: StagedFile | None = None) -> None:
        self._staged = staged
        # a staged body is hashed as it is written: reading it back at the seal (a map of the
        # file) counted the whole pack in the process's memory once more
        self._hasher = blake3.blake3() if staged is not None else None
        self._parts: list[bytes | bytearray] = []
        self.size = 0

    @property
    def staged(self) -> bool:
        """True while the bytes go to a staged file."""
        return self._staged is not None

    def append(self, data: bytes | bytearray) -> None:
        """Add ``data`` after what is there (kept by reference when in memory)."""
        if self._staged is not None:
            try:
                self._staged.write(data)
            except OSError:
                self._to_memory(self.size)
            else:
                assert self._hasher is not None
                self._hasher.update(data)
                self.size += len(data)
                return
        self._parts.append(data)
        self.size += len(data)

    def seal(self, tail_for: Callable[[bytes], bytes]) -> FinishedPack:
        """Append ``tail_for(body hash)`` and name the pack by the hash of all of it (the
        staged file is closed, for Backend.put_staged, which makes it durable where it is kept)."""
        staged, hasher = self._staged, self._hasher
        if staged is not None and hasher is not None:
            try:
                tail = tail_for(hasher.digest())
                staged.write(tail)
                staged.seal()
                hasher.update(tail)
                self._staged = None
                return FinishedPack(hasher.hexdigest(), None, staged, self.size + len(tail))
            except OSError:
                self._to_memory(self.size)
        hasher = blake3.blake3()
        for part in self._parts:
            hasher.update(part)  # large parts are hashed with the GIL released
        tail = tail_for(hasher.digest())
        hasher.update(tail)
        parts, self._parts = self._parts, []
        parts.append(tail)
        return FinishedPack(hasher.hexdigest(), b"".join(parts), None, self.size + len(tail))

    def discard(self) -> None:
        """Drop what was collected (an empty pack, an interrupted run)."""
        self._parts = []
        if self._staged is not None:
            self._staged.discard()
            self._staged = self._hasher = None

    def _to_memory(self, keep: int) -> None:
        staged = self._staged
        assert staged is not None
        self._staged = self._hasher = None
        try:
            data = staged.read_back()[:keep]
        except OSError as exc:
            raise BunkerError(
                f"a pack being built in {staged.path} could not be read back ({exc}): the backup cannot go on",
                "check the disk that holds that folder (free space, `dmesg` for I/O errors), then run the "
                "backup again: it resumes from its last checkpoint",
                exit_code=ExitCode.FATAL,
            ) from None
        finally:
            staged.discard()
        self._parts = [data]
