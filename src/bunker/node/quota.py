"""Per-certificate quotas (docs/hierarchy.md, "Quotas"): how much one writer may leave undelivered
on a node.

`bunker node quota DIR CLIENT SIZE` bounds, per client certificate (or per client name: every
certificate of that client), the bytes of packs the node holds for it that some upstream of the
repository does not hold yet (not in that upstream's delivered set: node/holdings.py). A pack
that would take its writer over the bound is refused like a full store (wire KIND_NODE_FULL):
the client keeps the backup in its own spool and a later run or `bunker forward` sends it, once
the node forwarded what it holds. So one machine with a large backup cannot fill a node that
other machines rely on.

The writer is known keylessly from the pack's footer (its signer: a certificate name). A pack
that names a writer with a quota must carry that writer's signature, or it is refused: nobody
uses up another writer's quota by naming it.

Each connection counts its store's undelivered packs once, on the first pack it is sent (only
undelivered packs are read: their footers), then adds what it accepts.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

from bunker import encoding
from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.node.holdings import UpstreamState
from bunker.node.node_dir import NodeDir, NodeError
from bunker.node.node_settings import node_settings
from bunker.repo.certs import Certificate, parse_certificate
from bunker.repo.pack import FOOTER_FIRST_READ, NeedMoreBytes, fetch_footer, parse_footer, verify_footer
from bunker.repo.repository import Repository
from bunker.storage.local import LocalBackend

FULL, REFUSED = "full", "refused"


def find_client(nd: NodeDir, client: str) -> str:
    """The quota key of ``client`` in the certificates of the repositories ``nd`` relays: the
    client name when a certificate has it (an exact name wins), else the full name of the one
    certificate whose id starts with it."""
    certs: list[Certificate] = []
    for repo_id in nd.repositories():
        certs += Repository.open(nd.store(repo_id), repo_id, floor=False).certificates()
    if any(c.client == client for c in certs):
        return client
    wanted = client.split("/", 1)[1] if client.startswith("clients/") else client
    found = {c.name for c in certs if len(wanted) >= 8 and c.name.split("/", 1)[1].startswith(wanted)}
    if len(found) != 1:
        known = ", ".join(sorted({c.client for c in certs})) or "none"
        raise NodeError(
            f"{'no' if not found else 'more than one'} client certificate in node {nd.name}'s repositories "
            f"matches {client!r}",
            "name the client exactly, or give at least 8 hex digits of its certificate id (`bunker key info` on the "
            f"client); clients here: {known}. A client certified since the node was seeded reaches it with the "
            "next records from upstream (`bunker node forward`)",
            exit_code=ExitCode.USAGE,
        )
    return found.pop()


def undelivered_by_writer(nd: NodeDir, repo_id: str, store: LocalBackend) -> dict[str, int]:
    """Certificate name -> bytes of its packs in ``store`` that some upstream does not hold."""
    ups = [u.name for u in nd.config.upstreams if u.kind == "link" or u.repo == repo_id]
    delivered = [set(UpstreamState(nd, repo_id, up).delivered) for up in ups]
    out: dict[str, int] = defaultdict(int)
    for info in store.list("packs/"):
        if delivered and all(info.name in d for d in delivered):
            continue
        try:
            out[fetch_footer(store, info.name).signer] += info.size
        except (encoding.FormatError, ObjectMissing, CorruptObject):
            continue  # not a pack anyone wrote: `check` on the node names it
    return out


class QuotaGate:
    """One connection's judge of the packs it is sent (see the module's docstring)."""

    def __init__(self, nd: NodeDir, store_dir: str) -> None:
        self.nd = nd
        self.repo_id = os.path.basename(store_dir.rstrip("/"))
        self.quotas = dict(nd.config.quotas)
        # the owner's policy may give every client a quota (node/node_settings.py); node.json's own win
        self.default_quota = node_settings(nd, self.repo_id).client_quota
        self.store_dir = store_dir
        self._lock = threading.Lock()
        self._undelivered: dict[str, int] | None = None
        self._certs: dict[str, Certificate | None] = {}
        self._repo: Repository | None = None

    def _cert(self, name: str) -> Certificate | None:
        if name not in self._certs:
            store = LocalBackend(self.store_dir)
            try:
                if self._repo is None:
                    self._repo = Repository.open(store, self.repo_id, floor=False)
                self._certs[name] = parse_certificate(store.get(name), self._repo.config.master_verify, self.repo_id)
            except (encoding.FormatError, ObjectMissing, CorruptObject, BunkerError):
                self._certs[name] = None
        return self._certs[name]

    def __call__(self, name: str, data: bytes | memoryview) -> tuple[str, str] | None:
        """None when the pack ``name`` may be stored; else (FULL or REFUSED, why)."""
        if not self.quotas and self.default_quota is None:
            return None
        try:
            try:
                footer = parse_footer(bytes(data[-FOOTER_FIRST_READ:]), len(data))
            except NeedMoreBytes as more:
                footer = parse_footer(bytes(data[-more.needed :]), len(data))
        except encoding.FormatError:
            return None  # not a pack of any writer: no writer's quota to count it against
        with self._lock:
            cert = self._cert(footer.signer)
            quota = self.quotas.get(footer.signer)
            if quota is None and cert is not None:
                quota = self.quotas.get(cert.client)
            if quota is None and cert is not None:
                quota = self.default_quota  # (a writer the node knows no certificate of: as before)
            if quota is None:
                return None
            try:
                if cert is None:
                    raise encoding.FormatError("its certificate is not in the node's store")
                verify_footer(footer, cert.verify_key)
            except encoding.FormatError as exc:
                return REFUSED, f"refused to store {name}: it names writer {footer.signer} but {exc}"
            if self._undelivered is None:
                self._undelivered = undelivered_by_writer(self.nd, self.repo_id, LocalBackend(self.store_dir))
            held = self._undelivered.get(footer.signer, 0)
            if held + len(data) > quota:
                who = f"client {cert.client!r} ({footer.signer})"
                return FULL, (
                    f"{who} has {held} bytes on node {self.nd.name} that its upstreams do not hold yet; this pack "
                    f"({len(data)} bytes) would take it over its quota of {quota} bytes"
                )
            self._undelivered[footer.signer] = held + len(data)
        return None
