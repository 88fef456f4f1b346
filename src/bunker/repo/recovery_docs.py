"""The plaintext documents every repository carries: RECOVERY.md and FORMAT.md (no secrets)."""

from __future__ import annotations

from importlib import resources


def recovery_md(repo_id: str) -> str:
    """Step-by-step recovery instructions for a stranger holding the master key or its shares."""
    return f"""# Recovering this Bunker repository

Repository id (fingerprint of the master verify key):

    {repo_id}

Whoever holds this directory can rewrite this file, so the id above proves nothing by itself.
The trusted copy is the one you kept: the first comment line of the master key file or of a put
key file, or what `bunker init` or `bunker key info` printed and you stored offline with the key
or its shares. Compare the two, and give your own copy to `--expect` in step 2.

This directory (or bucket) is an encrypted, deduplicating backup made by Bunker. Nothing in it is
secret except through the **master key**; with the master key (or enough of its SLIP-39 shares)
a stranger with a fresh machine can restore everything.

## 1. Install Bunker

    pip install bunker-backup        # Python 3.11 or newer; needs cryptography >= 50

## 2. Check the copy is complete and authentic (no key needed)

    bunker check --keyless --repo PATH_OR_URL --expect THE_ID_YOU_KEPT

Every object's bytes must match its name, every signature must chain to the master verify key
whose fingerprint is the id you gave, and each client's snapshot chain must have no gap. If it
says the repository is not the one your key is for, this is not your repository, or it was
replaced.

## 3. Get the master key

- You have the master key file and its passphrase: pass it with `--master-key FILE`.
- You have SLIP-39 shares: `bunker key recover --out master.key` asks for the shares and a new
  passphrase and writes the master key file.

## 4. Restore

    bunker snapshots --repo PATH_OR_URL --master-key master.key
    bunker restore latest --repo PATH_OR_URL --master-key master.key --target /restore/here

`--client NAME`, `--host H`, `--path P` and `--tag T` choose among snapshots; `restore` takes
paths inside the snapshot to restore only part of it. Set BUNKER_PASSPHRASE to run unattended.

## 5. If Bunker cannot be installed

FORMAT.md, next to this file, describes every object so a new reader can be written from it.
"""


def format_md() -> str:
    """The on-disk format description (the same text as docs/format.md)."""
    return resources.files("bunker.repo").joinpath("FORMAT.md").read_text(encoding="utf-8")
