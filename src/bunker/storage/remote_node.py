"""What a client asks only a node's server (docs/format.md section 22: the node-only flags of
LIST, and STAT's recorded time): what it evicted, its witness statement, restore requests and
listings, restore leases, and reports for a client that could not run. Every question answers
"nothing" (None, empty) from a server that is not a node, or a node too old to know it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bunker import encoding
from bunker.errors import BunkerError
from bunker.storage import wire
from bunker.storage.backend import validate_name, validate_prefix


class NodeQueries:
    """Mixed into RemoteBackend (storage/remote.py), which provides the connection."""

    server_node: str  # the node's name when the server is a node ("" otherwise)
    # (what, name, op, meta, payload=b"", *, io=False) -> the answer's frame; raises when lost
    _call: Callable[..., wire.Frame]
    _status_error: Callable[[wire.Frame, str, str], BunkerError]

    def upstream_names(self, prefix: str) -> set[str]:
        """Objects under ``prefix`` a node lists but no longer holds: evicted under record
        receipts, held by the repository of record (empty for a server that is not a node)."""
        return set(self.upstream_sizes(prefix))

    def witness_statement(self) -> bytes | None:
        """A node's signed witness statement for this repository (the newest snapshot per client
        it knows the repository of record holds; repo/witnesses.py verifies it); None for a
        server that is not a node, or a node too old to give one."""
        payload = self._node_answer("h")
        return bytes(payload) if payload is not None else None

    def _node_answer(self, flag: str, fields: dict[str, Any] | None = None) -> bytes | memoryview | None:
        """The payload of a LIST that only a node answers (meta ``flag`` true, format.md section
        22); None from a server that is not a node, or a node too old to know ``flag``."""
        if not self.server_node:
            return None
        # (config/: a node too old to know the flag answers a listing, the shortest there is)
        f = self._call("list", "config/", wire.LIST, {"p": "config/", "a": "", flag: True, **(fields or {})})
        if f.code == wire.INVALID:
            return None
        if f.code != wire.OK:
            raise self._status_error(f, "list", "config/")
        return f.payload if f.meta.get(flag) is True else None

    def restore_requests(self, listing: str = "") -> list[dict[str, Any]] | None:
        """A node's restore requests for this repository (node/requests.py: object, state, since,
        route, tries, why; node/listing.py: listing requests, by client); with ``listing``, a
        listing request for that client (``*``: every client) is made first. None for a server
        that is not a node, or a node too old to say."""
        payload = self._node_answer("r", {"rl": listing} if listing else None)
        if payload is None:
            return None
        try:
            rows = encoding.unpack(payload)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError("not a list of maps")
        except (encoding.FormatError, ValueError) as exc:
            raise wire.ProtocolError(f"the node sent malformed restore requests ({exc})", "") from None
        return rows

    def restore_lease(
        self, snapshot: str, lease_id: str, seconds: float, released: list[str], end: bool = False, done: bool = False
    ) -> dict[str, Any] | None:
        """Take, renew or end a node's restore lease on ``snapshot`` (node/leases.py; ``released``
        packs are done with, ``done``: the restore completed): {until, room}; None from a server
        that is not a node, or a node too old to lease."""
        fields = {"ls": snapshot, "li": lease_id, "lt": seconds, "lr": released, "le": end, "ld": done}
        payload = self._node_answer("l", fields)
        if payload is None:
            return None
        try:
            got = encoding.unpack(payload)
            if not isinstance(got, dict) or not isinstance(got.get("until"), (int, float)):
                raise ValueError("not a lease")
            room = got.get("room")
            if room is not None and (not isinstance(room, int) or isinstance(room, bool)):
                raise ValueError("room is not a number")
        except (encoding.FormatError, ValueError) as exc:
            raise wire.ProtocolError(f"the node sent a malformed restore lease ({exc})", "") from None
        return got

    def report_failure(self, cert: str, code: str, exit_code: int, message: str, started: float) -> str | None:
        """Tell a node that the client with certificate ``cert`` could not run: the node signs
        its status record (node/reports.py). The record's name; None from a server that is not a
        node, or a node too old to report."""
        fields = {"fc": cert, "fk": code, "fx": exit_code, "fm": message, "fs": started}
        payload = self._node_answer("f", fields)
        if payload is None:
            return None
        try:
            got = encoding.unpack(payload)
            if not isinstance(got, dict) or not isinstance(got.get("status"), str):
                raise ValueError("not a report")
        except (encoding.FormatError, ValueError) as exc:
            raise wire.ProtocolError(f"the node sent a malformed answer to a failure report ({exc})", "") from None
        return str(got["status"])

    def upstream_sizes(self, prefix: str) -> dict[str, int]:
        """``upstream_names`` with each object's size."""
        if not self.server_node:
            return {}
        out: dict[str, int] = {}
        after = ""
        while True:
            f = self._call("list", prefix, wire.LIST, {"p": validate_prefix(prefix), "a": after, "u": True})
            if f.code != wire.OK:
                raise self._status_error(f, "list", prefix)
            try:
                rows = encoding.unpack(f.payload)
                page = {prefix + str(r[0]): int(r[1]) for r in rows}
            except (encoding.FormatError, TypeError, IndexError, ValueError) as exc:
                raise wire.ProtocolError(f"the server sent a malformed listing of {prefix} ({exc})", "") from None
            out.update(page)
            if not f.meta.get("more") or not page:
                return out
            after = max(page)

    def snapshot_recorded(self, name: str) -> tuple[float, float | None] | None:
        """For a snapshot on a node: (when the node stored it, when the repository of record
        recorded it: 0.0 not yet, None when the server does not say: not a node, or an older
        one); None when the server does not hold it."""
        f = self._call("stat", name, wire.STAT, {"n": validate_name(name)})
        if f.code == wire.MISSING:
            return None
        if f.code != wire.OK:
            raise self._status_error(f, "stat", name)
        mtime, recorded = f.meta.get("t"), f.meta.get("r")
        if not isinstance(mtime, (int, float)):
            raise wire.ProtocolError(f"the server sent a malformed answer for {name}", "")
        if not self.server_node or not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
            return float(mtime), None
        return float(mtime), float(recorded)
