"""Where a client keeps its local files: the directory names of its state and its caches
(apart from run.py so that commands which only read them, such as `check`, `prune` and
`forward`, do not load the backup's machinery)."""

from __future__ import annotations

import contextlib
import os
import shutil

from bunker import dirs
from bunker.crypto.keyfile import PutKey
from bunker.private_files import SQLITE_SIDE_FILES, private_dirs
from bunker.repo.objects import content_hash
from bunker.repo.repository import Repository


def client_tag(put: PutKey) -> str:
    """Directory name for this client's local state (from its certificate, not secret)."""
    return content_hash(put.certificate)[:16]


def client_cache(repo: Repository, put: PutKey) -> str:
    """This client's cache directory (files cache, index cache). Chunk ids depend on the put
    secret, so the caches are kept per secret as well as per certificate: a run with another
    secret (a damaged put key) never trusts this one's records, nor this one its. A cache kept
    per certificate only (older versions) gives its files cache over, whose entries count only
    for chunks the index shows, and drops its index cache, which is rebuilt from the repository."""
    parent = dirs.client_cache_dir(repo.repo_id, client_tag(put))
    path = dirs.client_cache_dir(repo.repo_id, client_tag(put), put.secrets.domain_id)
    if os.path.exists(os.path.join(parent, "files.sqlite")) and not os.path.exists(path):
        private_dirs(path)
        for suffix in ("", *SQLITE_SIDE_FILES):
            with contextlib.suppress(OSError):  # a run beside this one moved it first
                os.rename(os.path.join(parent, "files.sqlite" + suffix), os.path.join(path, "files.sqlite" + suffix))
        shutil.rmtree(os.path.join(parent, "index"), ignore_errors=True)
    return path
