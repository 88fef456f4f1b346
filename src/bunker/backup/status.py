"""The status record a backup run leaves, whatever its outcome (repo/status_records.py).

Numbers follow on per client certificate on this machine (``status.json`` in the client's state
directory: the last number and record). A machine that lost its state starts again at #1: the
records then show two chains, which `bunker status` reports, and the newest run is still the
one with the latest time among the verified records.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from bunker import dirs
from bunker.crypto.keyfile import PutKey
from bunker.errors import BunkerError
from bunker.private_files import write_private_file
from bunker.repo.objects import content_hash
from bunker.repo.repository import Repository
from bunker.repo.status_records import make_status

STATE_FILE = "status.json"
COUNTED = ("files", "bytes", "bytes_new", "errors", "duration_ms", "files_new", "files_changed")


def leave_status(
    repo: Repository,
    put: PutKey,
    *,
    started: float,
    level: str,
    exit_code: int,
    snapshot: str = "",
    snapshot_seq: int = 0,
    complete: bool = False,
    stats: Mapping[str, int] | None = None,
    events: Iterable[Mapping[str, Any]] = (),
    policy: int = 0,
) -> str:
    """Sign and store this run's status record (``policy``: the policy version the run
    applied, 0 for none); returns its name, or "" when it could not be stored (the storage
    failed too: the run's own report says what happened)."""
    cert = f"clients/{content_hash(put.certificate)}"
    state = os.path.join(dirs.state_dir(repo.repo_id, content_hash(put.certificate)[:16]), STATE_FILE)
    try:
        with open(state, encoding="utf-8") as f:
            last = json.load(f)
        seq, prev = int(last["seq"]) + 1, str(last["name"])
    except (OSError, ValueError, KeyError, TypeError):
        seq, prev = 1, ""
    data = make_status(
        repo_id=repo.repo_id,
        cert=cert,
        signer=put.client_key,
        data_public=put.data_public,
        seq=seq,
        prev=prev,
        run="backup",
        started=started,
        ended=time.time(),
        level=level,
        exit_code=exit_code,
        snapshot=snapshot,
        snapshot_seq=snapshot_seq,
        complete=complete,
        counts={k: int(v) for k, v in (stats or {}).items() if k in COUNTED},
        events=events,
        policy=policy,
    )
    try:
        name = repo.put_object("status", data)
    except (BunkerError, OSError):
        return ""
    with contextlib.suppress(OSError):  # a full disk here: the next record starts a new chain
        os.makedirs(os.path.dirname(state), mode=0o700, exist_ok=True)
        write_private_file(state, json.dumps({"seq": seq, "name": name}))
    return name
