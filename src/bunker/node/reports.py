"""Status records a node signs for a client that could not run (docs/hierarchy.md, "Status of
the clients"; repo/status_records.py).

A backup whose put key cannot be used (missing, unreadable, damaged) cannot sign its own status
record. It still reaches its node, and tells it: which certificate it backs up as (the machine
remembers it beside its chain head), the error's code and exit code, and the message. The node
signs a ``fatal`` record for that client with its own key and sends it up with the other status
records, so the top sees a failed run instead of silence.

The node cannot tell who is asking (the connection is the client's, not its key's), so a
report proves only that someone who reaches the node said the client failed: it can raise a
false alarm, never hide a failure (a node's record is always ``fatal``, and the client's own
newer record wins). A node signs at most one report per client per ``MIN_INTERVAL``, for a
certificate of its store that is not revoked.

State: ``state/<repository>/reports.json``, certificate -> {seq, name, time} of the last report.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from bunker.errors import BunkerError, CorruptObject, ExitCode, ObjectMissing
from bunker.node.node_dir import NodeDir, read_json, write_json
from bunker.node.requests import locked_state
from bunker.repo.objects import content_hash
from bunker.repo.repository import Repository
from bunker.repo.status_records import make_status

MIN_INTERVAL = 600.0
MAX_MESSAGE = 4096
CODE = re.compile(r"[a-z][a-z0-9-]{0,63}")


def report_failure(
    nd: NodeDir, repo_id: str, cert: str, code: str, exit_code: int, message: str, started: float
) -> dict[str, Any]:
    """Sign and store a ``fatal`` status record for client certificate ``cert`` that could not
    run. Returns {status: its name, new: whether this call wrote it}."""
    if not CODE.fullmatch(code) or not 1 <= exit_code <= 255:
        raise BunkerError(f"a malformed failure report (code {code!r}, exit {exit_code})", "report it as a bug")
    store = nd.store(repo_id)
    repo = Repository.open(store, repo_id, floor=False)
    try:
        certificate = repo.certificate(cert)
    except (CorruptObject, ObjectMissing):
        raise BunkerError(
            f"node {nd.name} holds no certificate {cert} of this repository: it cannot report for it",
            "the client's certificate reaches the node with the records from the top (`bunker node forward` or "
            "`bunker node import` on the node)",
            exit_code=ExitCode.USAGE,
        ) from None
    if cert in repo.revoked:
        raise BunkerError(
            f"client {certificate.client!r} ({cert}) is revoked: the node reports nothing for it",
            "a revoked client does not back up any more",
            exit_code=ExitCode.USAGE,
        )
    path = os.path.join(nd.state_dir(repo_id), "reports.json")
    now = time.time()
    with locked_state(nd, repo_id, "reports"):
        state: dict[str, dict[str, Any]] = read_json(path, {})
        last = state.get(cert)
        if last is not None and now - float(last.get("time", 0.0)) < MIN_INTERVAL:
            return {"status": last["name"], "new": False}
        seq = int(last["seq"]) + 1 if last else 1
        event = {"level": "fatal", "code": code, "message": message[:MAX_MESSAGE]}
        data = make_status(
            repo_id=repo_id,
            cert=cert,
            signer=nd.keys,
            data_public=repo.config.data_public,
            seq=seq,
            prev=str(last["name"]) if last else "",
            run="backup",
            started=min(max(started, now - 86400.0), now),
            ended=now,
            level="fatal",
            exit_code=exit_code,
            events=[event],
            reporter=nd.keys.node_id,
        )
        name = f"status/{content_hash(data)}"
        store.put(name, data, if_absent=True)
        state[cert] = {"seq": seq, "name": name, "time": now}
        write_json(path, state)
    return {"status": name, "new": True}
