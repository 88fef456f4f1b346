"""Azure Blob repositories through OpenDAL against a real Azurite process (npm, installed by
scripts/test into .cache/azurite; skipped where it is absent): credentials, errors, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from bunker.errors import ExitCode, StorageError
from bunker.storage.services import open_azblob
from helpers import (
    AZURE_SCRUB,
    AzuriteServer,
    compare_trees,
    init_repo,
    js,
    make_tree,
    restored_path,
)

A = "packs/" + "a" * 64


def test_conditional_put_and_single_put_blob(azurite: AzuriteServer, s3_prefix: str) -> None:
    b = open_azblob(azurite.url(s3_prefix), env=azurite.env())
    assert b.capabilities().create_if_absent  # Put Blob with If-None-Match: *
    assert b.put(A, b"first", if_absent=True) is True
    assert b.put(A, b"second", if_absent=True) is False
    assert b.get(A) == b"first"
    assert b.url == f"azblob://{azurite.bucket}/{s3_prefix}?account=devstoreaccount1&endpoint={azurite.endpoint}"


def test_missing_container_and_wrong_key(azurite: AzuriteServer, s3_prefix: str) -> None:
    b = open_azblob(f"azblob://no-such-container/{s3_prefix}", env=azurite.env())
    with pytest.raises(StorageError) as exc:
        b.put(A, b"data")
    assert exc.value.exit_code == ExitCode.NO_REPOSITORY and "does not exist" in exc.value.message, exc.value
    env = azurite.env()
    env["AZURE_STORAGE_CONNECTION_STRING"] = env["AZURE_STORAGE_CONNECTION_STRING"].replace(
        "AccountKey=Eby8", "AccountKey=Xby8"
    )
    with pytest.raises(StorageError) as exc:
        open_azblob(azurite.url(s3_prefix), env=env).put(A, b"data")
    assert exc.value.exit_code == ExitCode.FATAL and "AZURE_STORAGE_KEY" in exc.value.hint, exc.value


def test_init_backup_restore_on_azurite(azurite: AzuriteServer, s3_prefix: str, tmp_path: Path) -> None:
    base = tmp_path / "r"
    extra = {k: "" for k in AZURE_SCRUB} | azurite.env()
    repo = init_repo(base, url=azurite.url(s3_prefix), env_extra=extra)
    src = tmp_path / "src"
    files = make_tree(src)
    doc = repo.backup(src)
    assert doc["stats"]["files"] == len(files) and doc["stats"]["errors"] == 0
    target = tmp_path / "target"
    rdoc = js(repo.ok("restore", "latest", "--target", target, "--json"))
    assert rdoc["stats"]["failed"] == 0
    compare_trees(src, restored_path(target, src))
    # every object went up with one Put Blob: no blocks (Put Block / Put Block List) anywhere
    reqs = [r for r in azurite.requests() if f"/{s3_prefix}/" in r]
    assert any(r.startswith("PUT ") and "/packs/" in r for r in reqs)
    assert not [r for r in reqs if "comp=block" in r], reqs
