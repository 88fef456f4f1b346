"""This machine's copies of the retention records it signed (retirements and their withdrawals).

A retirement is withdrawn only by a signed unretire record, never by deleting it, and bunker
never deletes either kind. So a record that vanished from ``retired/`` was deleted outside
bunker: by someone with access to the storage, who would thereby un-retire a snapshot (deleting
a retirement) or retire it again (deleting its withdrawal, after which prune frees its data).
Like a client's chain head (backup/chain.py), the copy kept here is a witness outside the
storage: `forget`, `unforget` and `prune` on this machine count a missing record as present and
put back the same bytes (so the same name), saying so, and `check` reports it. A machine that
signed none of the records cannot tell (docs/security.md, section 6.1).
"""

from __future__ import annotations

import contextlib
import os

from bunker import dirs
from bunker.private_files import write_private_file
from bunker.repo.objects import content_hash, is_hash_name
from bunker.repo.repository import Repository


def _root(repo_id: str) -> str:
    # beside the clients' state directories (dirs.state_dir), which are named by 16 hex digits
    return os.path.join(dirs.data_dir(), "state", repo_id[:32], "retention-records")


def remember(repo_id: str, name: str, data: bytes) -> None:
    """Keep a copy of a record this machine just wrote (``retired/<hash>``). A failure to keep it
    is not fatal: the record is in the repository, only the witness is missing."""
    with contextlib.suppress(OSError):
        write_private_file(os.path.join(_root(repo_id), name.split("/", 1)[1]), data)


def witnessed(repo_id: str) -> dict[str, bytes]:
    """Every record this machine remembers writing (``retired/<hash>`` -> bytes); a copy whose
    bytes do not match its name is damaged and left out."""
    root = _root(repo_id)
    try:
        leaves = sorted(os.listdir(root))
    except OSError:
        return {}
    out = {}
    for leaf in leaves:
        name = f"retired/{leaf}"
        if not is_hash_name(name):
            continue
        try:
            with open(os.path.join(root, leaf), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if content_hash(data) == leaf:
            out[name] = data
    return out


def missing_in(repo_id: str, listed: set[str]) -> dict[str, bytes]:
    """The records this machine remembers for ``repo_id`` that ``listed`` (a listing of
    ``retired/``) lacks."""
    return {n: d for n, d in witnessed(repo_id).items() if n not in listed}


def missing_records(repo: Repository, listed: set[str]) -> dict[str, bytes]:
    """``missing_in`` for an open repository. A spool lists only what was written offline:
    nothing counts as missing there."""
    if repo.backend.capabilities().partial:
        return {}
    return missing_in(repo.repo_id, listed)


def put_back(repo: Repository, records: dict[str, bytes]) -> list[str]:
    """Store ``records`` again (the same bytes: the same names); returns those stored."""
    return [repo.put_object("retired", data) for _, data in sorted(records.items())]


def restore_witnessed(repo: Repository, dry_run: bool) -> list[str]:
    """The records this machine signed that the repository no longer lists: from now on
    ``repo`` counts them as present (Repository.witnessed), and unless ``dry_run`` they are put
    back. Returns their names (say so with ``warning``)."""
    listed = {i.name for i in repo.backend.list("retired/")}
    missing = missing_records(repo, listed)
    repo.witnessed = missing
    if missing and not dry_run:
        put_back(repo, missing)
    return sorted(missing)


def warning(names: list[str], dry_run: bool) -> str:
    """What a command says when ``restore_witnessed`` found records gone."""
    shown = ", ".join(n.split("/", 1)[1][:12] for n in names[:5]) + (" …" if len(names) > 5 else "")
    return (
        f"warning: {len(names)} retention record(s) this machine signed are gone from the repository ({shown}). "
        "Bunker never deletes them: someone with access to the storage did, which un-forgets or re-forgets "
        + (
            "snapshots. This dry run counts them as present; a real run puts them back"
            if dry_run
            else "snapshots. They were put back (the same bytes)"
        )
        + "; find out who can write to the repository, and run `bunker check`"
    )
